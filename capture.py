"""The training step made static, and run eager, compiled, or replayed as CUDA graphs.

At CIFAR's batch of 128 a step launches hundreds of small kernels, so the GPU
mostly waits for Python. Every step of the project (baselines, each KD
method and its pre-training phases, DML, evaluation) is therefore written
as a function of the batch alone that touches only persistent tensors:

- gradients come from `torch.autograd.grad` and the update is this module's
  `SGD.update` (or `DOT.update_both`, the task and distillation gradients
  apart, for --optimizer dot), whose learning rate is a device tensor and
  whose momentum buffers exist from the start: an lr drop is a write, not a
  new step;
- KD weights, curricula and epoch statistics live in device tensors updated
  in place; nothing in a step reads a value back to the host.

`StepRunner` then runs such a step one of these ways (`--compile`):

- `off`: eagerly, as written;
- `graphs`: on CUDA, each step variant (e.g. KD on/off) and batch size is
  captured once as a CUDA graph after a few eager warm-up steps (cuDNN
  autotuning, lazy allocations), then replayed: one launch per step and no
  compile time. Input-gradient methods (Sobolev, LwM, BSS's attack) capture
  like any other, since capture records kernels, not Python;
- `auto`: `graphs` on CUDA, eager on any other device;
- `inductor`: `torch.compile(fullgraph=True, dynamic=False)` fuses the
  step's kernels first (minutes of compile time per variant and batch
  size), and on CUDA the compiled step is captured as above.

Whatever was asked, the runner records what really ran (`record()`: the step
path `eager`, `graphs` or `inductor` of the steps since `begin_epoch()`, and
why it is not the path asked for), which every run writes per epoch.

Explicit capture is the default way to graphs because it needs no compile
time and handles `autograd.grad` inside the step; inductor is there for
whoever measures it faster on their GPU (bench.py compares them).
"""
import torch

import versions
from distributed import WORLD, average_gradients_of

MODES = ('off', 'auto', 'graphs', 'inductor')
PATHS = {'off': 'eager', 'graphs': 'graphs', 'inductor': 'inductor'}  # mode -> the step path it runs


def restore_buffers(state_dict, key, saved, buffers):
    """Copy each parameter's saved `key` buffer (in the order of `saved`, the
    state dict's parameter indices) into `buffers` in place, so a captured step
    keeps reading the same tensors; a parameter saved without one starts at zero."""
    for index, buf in zip(saved, buffers):
        value = state_dict['state'].get(index, {}).get(key)
        if value is None:
            buf.zero_()
        else:
            buf.copy_(value)


class SGD(torch.optim.Optimizer):
    """SGD with momentum, optional Nesterov and weight decay, computing what
    torch.optim.SGD computes, in a form a CUDA graph or torch.compile can
    hold: the learning rate is a device tensor (`set_lr` writes it), the
    momentum buffers are allocated here (zero: the first update sets them to
    the gradient, as torch's SGD does) and gradients are passed to `update`
    rather than read from `.grad`. Its state_dict is torch.optim.SGD's, and
    `load_state_dict` copies into the existing buffers, so a captured step
    keeps pointing at them. Under torchrun the gradients are averaged over
    processes first."""

    def __init__(self, params, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        # trainable parameters only (a frozen head inside a student wrapper has no gradient),
        # each once (a wrapper and its parts), in parameter groups listed here (generators
        # would be used up)
        groups = [dict(g, params=[p for p in g['params'] if p.requires_grad]) if isinstance(g, dict)
                  else g for g in params]
        if not any(isinstance(g, dict) for g in groups):
            groups = list({id(p): p for p in groups if p.requires_grad}.values())
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      nesterov=nesterov, dampening=0, maximize=False,
                                      foreach=None, differentiable=False, fused=None))
        self.params = [p for g in self.param_groups for p in g['params']]
        device = self.params[0].device if self.params else torch.device('cpu')
        self.lr_tensor = torch.tensor(float(lr), device=device)
        self.momentum, self.weight_decay, self.nesterov = momentum, weight_decay, nesterov
        self.buffers = []
        for p in self.params:
            self.state[p]['momentum_buffer'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.buffers.append(self.state[p]['momentum_buffer'])
        # one fused kernel for the whole update where every parameter is on a GPU
        self.fused = bool(self.params) and all(p.is_cuda for p in self.params)

    def set_lr(self, lr):
        for group in self.param_groups:
            group['lr'] = lr
        self.lr_tensor.fill_(lr)
        return lr

    @torch.no_grad()
    def update(self, grads):
        """One step from `grads`, aligned with `self.params`; a None gradient
        (a parameter the loss did not use) leaves that parameter and its
        momentum as they are, as torch.optim.SGD skips a parameter without .grad."""
        used = [i for i, g in enumerate(grads) if g is not None]
        if not used:
            return
        params = [self.params[i] for i in used]
        bufs = [self.buffers[i] for i in used]
        grads = [grads[i] for i in used]
        if WORLD.size > 1:
            grads = average_gradients_of(grads)
        if self.momentum == 0:
            if self.weight_decay:
                grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
            torch._foreach_sub_(params, torch._foreach_mul(grads, self.lr_tensor))
            return
        if self.fused:
            torch._fused_sgd_(params, grads, bufs, weight_decay=self.weight_decay,
                              momentum=self.momentum, lr=self.lr_tensor, dampening=0.0,
                              nesterov=self.nesterov, maximize=False, is_first_step=False)
            return
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        torch._foreach_mul_(bufs, self.momentum)
        torch._foreach_add_(bufs, grads)
        step = torch._foreach_add(grads, bufs, alpha=self.momentum) if self.nesterov else bufs
        torch._foreach_sub_(params, torch._foreach_mul(step, self.lr_tensor))

    @torch.no_grad()
    def step(self, closure=None):
        """The torch.optim interface: one update from the parameters' .grad."""
        loss = closure() if closure is not None else None
        self.update([p.grad for p in self.params])
        return loss

    def load_state_dict(self, state_dict):
        """Momentum buffers and lr from a torch.optim.SGD-format state dict,
        copied into this optimiser's own buffers."""
        groups = state_dict['param_groups']
        saved = [i for g in groups for i in g['params']]
        if len(saved) != len(self.params):
            raise ValueError(f'the saved optimiser holds {len(saved)} parameters, this one '
                             f'{len(self.params)}')
        restore_buffers(state_dict, 'momentum_buffer', saved, self.buffers)
        self.set_lr(groups[0]['lr'])


class DOT(SGD):
    """Distillation-oriented trainer (Zhao, Cui, Song, Liang: "DOT: A
    Distillation-Oriented Trainer", ICCV 2023, https://arxiv.org/abs/2307.08436;
    mdistiller engine/dot.py): SGD whose task (cross-entropy) and distillation
    gradients run through momentum buffers of their own, the task's with
    momentum - delta, the distillation's with momentum + delta, so the
    distillation gradient carries more of the past.

    `update_both(task_grads, kd_grads)` applies one step as mdistiller's
    `step_kd()` then `step()` do, parameter by parameter:
    - one with a task gradient: b = m_task * b + (g_task + wd * p) where it
      also has a distillation gradient, else momentum (m_task + m_kd) / 2;
      then p -= lr * b;
    - one with a distillation gradient: b_kd = m_kd * b_kd + g_kd where it
      also has a task gradient (weight decay is the task's), else
      b_kd = (m_task + m_kd) / 2 * b_kd + (g_kd + wd * p), without the weight
      decay in the very first distillation step (mdistiller starts that buffer
      from the bare gradient); then p -= lr * b_kd.
    `update(grads)` is a step with a task gradient alone (a cross-entropy-only
    epoch, a pre-training phase): plain SGD with momentum (m_task + m_kd) / 2.
    With delta 0 the two buffers sum to plain SGD's. The distillation
    buffers are saved as `momentum_kd_buffer` beside torch's `momentum_buffer`
    (mdistiller's names), and restored into the existing tensors."""

    def __init__(self, params, lr, momentum, delta, weight_decay=0.0):
        if not 0.0 <= momentum - delta and momentum + delta < 1.0:
            raise ValueError(f'DOT: the momenta {momentum} - {delta} and {momentum} + {delta} must '
                             f'lie in [0, 1)')
        super().__init__(params, lr, momentum=momentum, weight_decay=weight_decay, nesterov=False)
        self.fused = False  # the two-buffer update is written with foreach kernels
        self.delta, self.task_momentum, self.kd_momentum = delta, momentum - delta, momentum + delta
        self.kd_buffers = []
        for p in self.params:
            self.state[p]['momentum_kd_buffer'] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.kd_buffers.append(self.state[p]['momentum_kd_buffer'])
        # 0 until the first distillation step: that step's KD-only parameters skip weight decay
        self.kd_started = torch.zeros((), device=self.lr_tensor.device)

    def update(self, grads):
        self.update_both(grads, [None] * len(grads))

    @torch.no_grad()
    def update_both(self, task_grads, kd_grads):
        task = [i for i, g in enumerate(task_grads) if g is not None]
        kd = [i for i, g in enumerate(kd_grads) if g is not None]
        if WORLD.size > 1 and (task or kd):  # one all-reduce for both gradients
            averaged = iter(average_gradients_of([task_grads[i] for i in task] + [kd_grads[i] for i in kd]))
            task_grads, kd_grads = list(task_grads), list(kd_grads)
            for i in task:
                task_grads[i] = next(averaged)
            for i in kd:
                kd_grads[i] = next(averaged)
        in_task, in_kd = set(task), set(kd)
        # the task step, in two groups by momentum (both gradients, the task's alone)
        for momentum, group in ((self.task_momentum, [i for i in task if i in in_kd]),
                                (self.momentum, [i for i in task if i not in in_kd])):
            if group:
                self._momentum_step(group, [task_grads[i] for i in group], self.buffers, momentum,
                                    self.weight_decay)
        # the distillation step (its weight decay only where there is no task gradient)
        both = [i for i in kd if i in in_task]
        if both:
            self._momentum_step(both, [kd_grads[i] for i in both], self.kd_buffers, self.kd_momentum, 0.0)
        alone = [i for i in kd if i not in in_task]
        if alone:
            self._momentum_step(alone, [kd_grads[i] for i in alone], self.kd_buffers, self.momentum,
                                self.weight_decay, decay_scale=self.kd_started)
        if kd:
            self.kd_started.fill_(1.0)

    def _momentum_step(self, index, grads, buffers, momentum, weight_decay, decay_scale=None):
        """b = momentum * b + (g + weight_decay [* decay_scale] * p); p -= lr * b."""
        params = [self.params[i] for i in index]
        bufs = [buffers[i] for i in index]
        if weight_decay:
            decay = torch._foreach_mul(params, weight_decay)
            if decay_scale is not None:
                torch._foreach_mul_(decay, decay_scale)
            grads = torch._foreach_add(grads, decay)
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        torch._foreach_sub_(params, torch._foreach_mul(bufs, self.lr_tensor))

    def state_dict(self):
        state = super().state_dict()
        state['dot_kd_started'] = self.kd_started.clone()
        return state

    def load_state_dict(self, state_dict):
        """Both momenta's buffers and lr, copied into this optimiser's own tensors."""
        super().load_state_dict(state_dict)
        if 'dot_kd_started' not in state_dict:
            raise ValueError('the saved optimiser is not DOT (it has no distillation momentum)')
        saved = [i for g in state_dict['param_groups'] for i in g['params']]
        restore_buffers(state_dict, 'momentum_kd_buffer', saved, self.kd_buffers)
        self.kd_started.copy_(state_dict['dot_kd_started'])


def grads_of(loss, params, retain_graph=None):
    """d loss / d params, None for a parameter the loss does not use
    (`retain_graph`: the graph serves another gradient after this one)."""
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain_graph)


def configure_dynamo():
    """What tracing a whole step needs: autograd calls inside the traced
    function (the backward pass, input gradients) and one compiled graph per
    step variant and batch size. (torch._dynamo is imported here, not at the
    top: it costs seconds at every start of a script that never compiles.)
    Stops with a one-line error on a torch too old to trace autograd calls."""
    versions.require('compile')
    import torch._dynamo
    torch._dynamo.config.trace_autograd_ops = True
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)


class StepRunner:
    """Runs `step(batch)` eagerly, compiled, or as CUDA graphs (`mode`), and
    records how its steps really ran.

    `step` is a callable of the batch alone (it updates persistent tensors:
    weights, optimiser, statistics) or an object with `current()` returning
    the callable for the present variant (e.g. KD on or off); each variant
    and batch size gets its own graph. `warmup` eager steps of each come
    before its capture. `backend` overrides torch.compile's (tests trace with
    'eager'); on the CPU, `inductor` compiles without capturing.

    A fast path that cannot run falls back to eager, with its reason kept in
    `fallback`: a step whose `capturable` is False (it needs the host inside
    it), `graphs` or `auto` on a device other than CUDA (the training scripts
    refuse `--compile graphs` there before anything runs; `auto` is the mode
    that allows it), and, once running, a step variant whose capture fails
    (`log` says so when it happens). `record()` gives the path of the steps run
    since `begin_epoch()`."""

    def __init__(self, step, mode='off', device='cpu', warmup=3, backend='inductor', log=print):
        if mode not in MODES:
            raise ValueError(f'unknown step mode {mode!r} (one of {", ".join(MODES)})')
        self.requested, self.device = mode, torch.device(device)
        self.fallback = None  # why the whole step runs eagerly although `mode` asks otherwise
        if mode != 'off' and not getattr(step, 'capturable', True):
            self.fallback = (f'--compile {mode}: the step needs the host inside it '
                             f'({getattr(step, "why_not_capturable", "a host sync")})')
            mode = 'off'
        elif mode in ('graphs', 'auto') and self.device.type != 'cuda':
            self.fallback = f'--compile {mode}: CUDA graphs need a CUDA device, this step runs on {self.device.type}'
            mode = 'off'
        elif mode == 'auto':
            mode = 'graphs'
        self.step, self.mode, self.warmup = step, mode, warmup
        self.path = PATHS[mode]
        self.use_graphs = self.device.type == 'cuda' and mode in ('graphs', 'inductor')
        self.backend = backend
        self.compiled = {}      # variant callable -> compiled callable
        self.graphs = {}        # (variant, batch size) -> (CUDAGraph, static batch)
        self.eager_steps = {}   # (variant, batch size) -> eager steps run so far
        self.eager_keys = set()  # (variant, batch size) whose capture failed: eager for good
        self.capture_failures = {}  # (variant, batch size) -> why its capture failed
        self.ran = {}  # since begin_epoch(): path, 'warm-up' or a failed key -> steps run
        self.pool, self.log = None, log

    def begin_epoch(self):
        """Start counting how steps run afresh (`record()` covers the steps since)."""
        self.ran = {}

    def _ran(self, how):
        self.ran[how] = self.ran.get(how, 0) + 1

    def record(self):
        """(path, reason) for the steps run since `begin_epoch()`: the path
        that ran them (`eager`, `graphs` or `inductor`) and, where that is not
        the path asked for in every step, why ('' otherwise). Eager warm-up
        steps before a capture count as the graphs path unless the epoch held
        nothing else."""
        reasons = [self.fallback] if self.fallback else []
        failed = [key for key in self.ran if key in self.capture_failures]
        reasons += [self.capture_failures[key] for key in failed]
        if self.ran.get(self.path) or not self.ran:
            path = self.path
        elif failed:  # the compiled step still runs where inductor's capture failed
            path = 'inductor' if self.mode == 'inductor' else 'eager'
        else:
            path = 'eager'
            reasons.append(f'only eager warm-up steps ran (the first {self.warmup} of each batch size, '
                           f'before its capture)')
        return path, '; '.join(reasons)

    def function(self):
        fn = self.step.current() if hasattr(self.step, 'current') else self.step
        if self.mode != 'inductor':
            return fn
        if fn not in self.compiled:
            configure_dynamo()
            self.compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=False, backend=self.backend)
        return self.compiled[fn]

    def __call__(self, batch):
        fn = self.function()
        if not self.use_graphs:
            self._ran(self.path)
            return fn(batch)
        key = (fn, batch[0].shape[0])
        if key in self.graphs:
            graph, static = self.graphs[key]
            for dst, src in zip(static, batch):
                dst.copy_(src)
            graph.replay()
            self._ran(self.path)
            return None
        done = self.eager_steps.get(key, 0)
        if done < self.warmup:  # real training steps, on a side stream as capture wants
            self.eager_steps[key] = done + 1
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                fn(batch)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._ran('inductor' if self.mode == 'inductor' else 'warm-up')
            return None
        if key in self.eager_keys:
            self._ran(key)
            return fn(batch)
        static = type(batch)(*(t.clone() for t in batch))
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()  # graphs of one runner share memory
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                fn(static)  # recorded, not run: the replay below trains on this batch
        except Exception as e:  # noqa: BLE001  (whatever stops a capture, training goes on eagerly)
            self.eager_keys.add(key)
            first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else ''
            self.capture_failures[key] = (f'--compile {self.requested}: the step (batch of {key[1]}) '
                                          f'could not be captured ({type(e).__name__}: {first_line})')
            self.log(f'{self.capture_failures[key]}; it runs eagerly')
            torch.cuda.synchronize(self.device)
            self._ran(key)
            return fn(batch)
        self.graphs[key] = (graph, static)
        graph.replay()
        self._ran(self.path)
        return None
