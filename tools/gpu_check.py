"""The GPU check of the captured training step: is it right, and how fast is it?

    python tools/gpu_check.py --img_root DIR --out OUT [--minutes 7] [--parts steps accuracy]

DIR holds CIFAR-10 in the standard python layout (cifar-10-batches-py/; only
the accuracy part reads it). About --minutes plus half a minute of start-up on
one H100 or H200. OUT receives three small files: summary.md (one Markdown
table: configuration, eager and graphs s/epoch, speed-up, peak memory,
verdict; then what failed and what was skipped), summary.json (everything
measured) and gpu_check.log (everything printed). The last line printed is
the verdict, and the exit status says it too:

    0  PASS        every check asked for ran and passed
    1  FAIL        a check failed or raised an error
    3  INCOMPLETE  nothing failed, but something was skipped (out of time,
                   or graphs on a machine without CUDA)
    2  bad flags (one `error: ...` line)

steps     Every configuration bench.py knows (baselines, every --kd_mode,
          DML) is built twice from the same start (seed 0, the same batches of
          learnable synthetic CIFAR-sized data): once eager (bf16,
          channels-last) and once with each step replayed as a CUDA graph
          (--compile graphs). Each trains every stage a run of it has: the
          method's pre-training phases, its distillation step, its CE-only
          step (the variant of epochs whose KD weight is 0), each with full
          batches and with the smaller last batch of an epoch (its own graph),
          an lr written after capture, then the test pass (its own graph).
          Checked, per stage: the step is captured (no eager fallback); no
          host sync, seen two ways: one eager step of each stage and of the
          evaluation under a recorder of the ops that read a value back to
          the host (.item(), nonzero, copies to the host; this part runs on
          any device), and, on CUDA, every replay under
          torch.cuda.set_sync_debug_mode('error'); the two loss curves agree
          (medians of 10 steps within 20% + 0.05: training from random
          weights is jumpy and bf16 steps differ at random, so single steps
          and short means do not match, while a step that stops learning,
          trains on a stale batch or drops its statistics is far outside);
          the losses stay finite; an lr written
          after capture takes effect (lr 0: the weights stay exactly); the
          graphs path is not slower (within 5%); and the test metrics of
          the captured evaluation match the eager one on the same weights.
          cudnn.benchmark is on, as in the training scripts.
accuracy  resnet20 on the real CIFAR-10 (train_base.py) for --epochs epochs
          with the fast path and graphs, and in plain fp32 eager, both at
          once: final test top-1 within 0.5 points.

Seconds per epoch are those of a real CIFAR epoch: 50,000 training images at
the batch size (at 128: 390 full batches and a last batch of 80) and the test
pass over 10,000 images. Only a few steps are timed, so the figure is
extrapolated, and the output says so: 390 x the mean time of the timed full
steps + the timed step of the last batch (its own graph) + the test pass
(10,000 images through every network a run evaluates, timed whole; on
--n_test fewer images, per batch and scaled). Pre-training stages have no test
pass (the training scripts evaluate in the main schedule only).

Time: --minutes is split between the parts (steps 70%, accuracy 30%, or all to
the one asked for). Each part has a deadline, checked between any two steps:
the steps part gives each configuration an equal share of what is left
(timing fewer steps where a step is slow; the most expensive configurations
go first so that the cheap ones at the end still fit), and at its deadline it
stops and lists the configurations it did not finish as skipped. The
accuracy runs are stopped at theirs (skipped, with the epoch they reached).

--device cpu rehearses the script without a GPU (in CI, on tiny data): the
same trials run, both eager in fp32, so every comparison runs and must agree
exactly, but graphs figures and the checks that need CUDA are reported as
skipped ("needs CUDA"), so the verdict is INCOMPLETE at best.
--plant_host_sync PATTERN makes the matching configurations' main step read
its result back to the host (.item()), which the check must report: it is
how the check's own tests see it fail.
"""
import argparse
import csv
import fnmatch
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# after the path: this script runs from tools/
import bench  # noqa: E402
import train_base  # noqa: E402
import train_dml  # noqa: E402
import train_kd  # noqa: E402
from capture import StepRunner  # noqa: E402
from dataset import DATASETS, DeviceLoader  # noqa: E402
from errors import ArgumentParser, UserError, cli  # noqa: E402
from records import describe_device  # noqa: E402
from utils import Evaluator  # noqa: E402

CIFAR_TRAIN, CIFAR_TEST = 50000, 10000  # the images of one real epoch and of its test pass
EXIT_STATUS = {'PASS': 0, 'FAIL': 1, 'INCOMPLETE': 3}
SHARES = {'steps': 0.7, 'accuracy': 0.3}
# The slowest steps (input gradients, resnet110 trained, two networks trained) go first: see the docstring.
EXPENSIVE = ('kd-bss', 'kd-sobolev', 'kd-lwm', 'base-r110', 'dml')
CURVE_WINDOW, CURVE_REL, CURVE_ABS = 10, 0.2, 0.05  # see the docstring
SLOWER_ALLOWED = 1.05  # graphs s/epoch may exceed eager by this factor (timing noise)
NEEDS_CUDA = 'needs CUDA'
TABLE_HEADER = '| config | eager s/epoch | graphs s/epoch | speed-up | peak MiB (eager / graphs) | verdict |'

LOG_LINES = []


def say(text):
    print(text, flush=True)
    LOG_LINES.append(text)


class OutOfTime(Exception):
    """A part's deadline passed: what it had not finished is skipped."""


# ----------------------------------------------------------------------------- the epoch

def epoch_seconds(step_s, last_step_s, test_batch_s, batch_size, eval_batch_size,
                  train_images=CIFAR_TRAIN, test_images=CIFAR_TEST):
    """One real epoch from per-step times: every full batch at `step_s`, the
    last, smaller batch (if the batch size does not divide the split) at
    `last_step_s`, and the test pass at `test_batch_s` per test batch of
    `eval_batch_size` (through every network the run evaluates; 0: no test
    pass). Returns the breakdown and its sum, 's_per_epoch'."""
    if test_images % eval_batch_size:
        raise ValueError(f'the test split of {test_images} does not divide into batches of {eval_batch_size}')
    full, last = divmod(train_images, batch_size)
    test_batches = test_images // eval_batch_size
    train_s = full * step_s + (last_step_s if last else 0.0)
    test_s = test_batches * test_batch_s
    return {'full_batches': full, 'last_batch': last, 'test_batches': test_batches,
            'train_s': train_s, 'test_s': test_s, 's_per_epoch': train_s + test_s}


# ----------------------------------------------------------------------------- host syncs

# Ops that make the host wait for the device: a value read back (.item(),
# bool(), float() all end in _local_scalar_dense), shapes that depend on data.
SYNCING_OPS = frozenset({'_local_scalar_dense', 'nonzero', 'masked_select', 'is_nonzero', 'equal',
                         'unique', '_unique', '_unique2', 'unique_dim', 'unique_consecutive'})


class HostSyncRecorder(TorchDispatchMode):
    """Records every op run within that reads a value back to the host: the
    ops of SYNCING_OPS, and copies from a device to the host. It sees the ops
    themselves, so it works on any device (on the CPU nothing waits, but the
    same step on a GPU would)."""

    def __init__(self):
        super().__init__()
        self.found = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS or self.copies_to_host(name, args, kwargs):
            self.found[name] += 1
        return func(*args, **kwargs)

    @staticmethod
    def copies_to_host(name, args, kwargs):
        if name == '_to_copy' and args and isinstance(args[0], torch.Tensor):
            target = kwargs.get('device')
            return args[0].device.type != 'cpu' and target is not None and torch.device(target).type == 'cpu'
        if name == 'copy_' and len(args) > 1 and isinstance(args[1], torch.Tensor):
            return args[0].device.type == 'cpu' and args[1].device.type != 'cpu'
        return False


def host_syncs(fn, *args):
    """{op: count} of the host syncs that calling fn(*args) makes (fn runs, eagerly)."""
    with HostSyncRecorder() as recorder:
        fn(*args)
    return dict(recorder.found)


class WithHostSync:
    """A step that also reads its result back to the host (`.item()`), as a
    careless edit of a step would: what the no-host-sync check must catch
    (--plant_host_sync, for this script's own tests)."""

    def __init__(self, step):
        self.step, self.wrapped = step, {}

    @property
    def capturable(self):
        return getattr(self.step, 'capturable', True)

    def current(self):
        fn = self.step.current() if hasattr(self.step, 'current') else self.step
        if fn not in self.wrapped:  # one callable per variant: the runner keys its graphs on it
            def synced(batch, fn=fn):
                sums = fn(batch)
                sums[0].item()
                return sums
            self.wrapped[fn] = synced
        return self.wrapped[fn]

    def __call__(self, batch):
        return self.current()(batch)


@contextmanager
def syncs_raise(device, on):
    """Within: any host sync on the CUDA `device` raises."""
    if not (on and device.type == 'cuda'):
        yield
        return
    torch.cuda.set_sync_debug_mode('error')
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode('default')


# ----------------------------------------------------------------------------- configurations

def config_args(name, device, path, batch_size, nets):
    """The resolved flags of the training script for this configuration, as
    bench.py builds them, with the (teacher, student) pair `nets` for KD and DML."""
    teacher, student = nets
    common = ['--data_name', 'cifar10', '--device', device, '--batch_size', str(batch_size),
              *bench.PATHS[path]]
    if name.startswith('base-'):
        return train_base.parse_args(common + ['--net_name', 'resnet' + name[len('base-r'):]])
    if name == 'dml':
        return train_dml.parse_args(common + ['--net1_name', teacher, '--net2_name', student,
                                              '--net1_init', 'random', '--net2_init', 'random'])
    args, _, _ = train_kd.parse_args(common + ['--kd_mode', name[len('kd-'):], '--t_name', teacher,
                                               '--s_name', student, '--t_model', 'random',
                                               '--s_init', 'random'])
    return args


@dataclass
class Stage:
    """One kind of epoch a run of a configuration trains: the step of `phase`
    at its epoch `epoch` (its lr, its variant: distillation or CE only)."""
    label: str            # 'main', 'distill', 'ce-only', or a pre-training phase's name
    phase: object         # utils.Phase
    epoch: int
    in_run: bool          # a run with the default flags has epochs of this kind
    test_pass: bool       # its epochs end with a test pass (the main schedule's do)
    after_begin: Optional[Callable] = None  # e.g. CE only where no epoch of the schedule is
    step: object = None   # what runs: the phase's step (or it with a planted host sync)

    def __post_init__(self):
        self.step = self.phase.step

    def begin(self):
        """What the training loop does before an epoch of this kind."""
        self.phase.optimizer.set_lr(self.phase.lr(self.epoch))
        if self.phase.begin_epoch is not None:
            self.phase.begin_epoch(self.epoch)
        if self.after_begin is not None:
            self.after_begin()
        self.phase.stats.reset()

    def function(self):
        return self.step.current() if hasattr(self.step, 'current') else self.step


def build_stages(name, args, device, labels):
    """(stages in training order, the networks a run evaluates) of a
    configuration, from the training scripts' own builders, random weights."""
    if name.startswith('base-'):
        net, phase = train_base.build_baseline(args, device)
        return [Stage('main', phase, 1, True, True)], [net]
    if name == 'dml':
        nets, phase = train_dml.build_mutual(args, device)
        return [Stage('main', phase, 1, True, True)], [nets['net1'], nets['net2']]
    model, _, distiller, pretrain, main, step = train_kd.build_distillation(
        args, device, len(labels), labels, load_weights=False)
    stages = [Stage(p.name, p, 1, True, False) for p in pretrain]
    weights = [distiller.kd_weight(e, args.epochs) for e in range(1, args.epochs + 1)]
    kd_epochs = [e for e, w in enumerate(weights, 1) if w]
    ce_epochs = [e for e, w in enumerate(weights, 1) if not w]
    ce_only = Stage('ce-only', main, ce_epochs[0] if ce_epochs else 1, bool(ce_epochs), True,
                    after_begin=None if ce_epochs else (lambda: step.set_kd_scale(0.0)))
    if kd_epochs:  # the distillation step first: it is what a main-schedule epoch trains
        stages += [Stage('distill', main, kd_epochs[0], True, True), ce_only]
    else:  # e.g. AB, FSP: the main schedule is cross-entropy alone
        stages.append(ce_only)
    return stages, [model]


def primary(stages):
    """The stage whose epochs are the configuration's main schedule."""
    return next(s for s in stages if s.label in ('main', 'distill', 'ce-only'))


# ----------------------------------------------------------------------------- synthetic data

PALETTE = torch.tensor([[r, g, b] for r in (40, 215) for g in (40, 215) for b in (40, 215)]
                       + [[128, 128, 40], [40, 128, 215]])


def learnable_images(n, seed):
    """n CIFAR-sized uint8 images, image i of class i % 10 (a colour per
    class, under strong noise): the loss falls within tens of steps, so a
    step that stopped learning shows in its loss curve."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    noise = torch.randint(-60, 61, (n, 3, 32, 32), generator=g)
    images = (PALETTE[labels][:, :, None, None] + noise).clamp(0, 255).to(torch.uint8)
    return images, labels


# ----------------------------------------------------------------------------- one trial

class Clock:
    """The steps part's deadline, checked between any two steps."""

    def __init__(self, deadline):
        self.deadline = deadline

    def left(self):
        return self.deadline - time.time()

    def check(self):
        if time.time() >= self.deadline:
            raise OutOfTime()


def synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def endless(loader):
    while True:
        yield from loader


class LossCurve:
    """Each step's loss per sample (the first statistic of the stage's
    EpochStats), kept on the device until read: a copy of the running sums
    after each step (one small kernel, no sync), differenced when read."""

    def __init__(self, stats):
        self.stats, self.n_index = stats, stats.names.index('n')
        self.sums = [stats.total.clone()]

    def after_step(self):
        self.sums.append(self.stats.total.clone())

    def values(self):
        sums = torch.stack(self.sums).tolist()
        return [(b[0] - a[0]) / max(b[self.n_index] - a[self.n_index], 1) for a, b in zip(sums, sums[1:])]


def run_stage(stage, runner_mode, ctx, clock, plan, timing_budget_s, log=say):
    """Train one stage: warm-up (the runner's eager steps and capture, then a
    replay), timed full batches, the last batch (warm-up, capture, timed
    replays), one step at lr 0. Returns its measurements; `plan` holds the
    number of timed steps (chosen here from `timing_budget_s` when absent,
    so that the second trial of a configuration repeats the first's)."""
    device = ctx.device
    stage.begin()
    runner = StepRunner(stage.step, runner_mode, device, log=log)
    capturing = runner.use_graphs
    curve = LossCurve(stage.phase.stats)
    fn = stage.function()

    def call(batch):
        clock.check()
        key = (fn, batch[0].shape[0])
        replay = capturing and (key in runner.graphs or key in runner.eager_keys)
        with syncs_raise(device, replay):
            runner(batch)
        curve.after_step()

    full = endless(ctx.train_loader)
    warm = ctx.runner_warmup + 1  # eager warm-up steps, then the capture (and its first replay)
    for _ in range(warm):
        call(next(full))
    synchronize(device)
    start = time.perf_counter()
    call(next(full))  # a replay: its time sizes the timed window
    synchronize(device)
    one_step_s = time.perf_counter() - start
    if stage.label not in plan:
        wanted = int(timing_budget_s / max(one_step_s, 1e-6))
        plan[stage.label] = max(ctx.min_steps, min(ctx.max_steps, wanted))
    steps = plan[stage.label]

    cuda = device.type == 'cuda'
    if cuda:
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
    start = time.perf_counter()
    for _ in range(steps):
        call(next(full))
    if cuda:
        end.record()
    synchronize(device)
    step_s = (time.perf_counter() - start) / steps
    gpu_step_ms = begin.elapsed_time(end) / steps if cuda else None

    last_step_s, repeats = 0.0, ctx.last_batch_repeats
    if ctx.last_loader is not None:  # the epoch's last, smaller batch: its own graph
        last = endless(ctx.last_loader)
        for _ in range(warm):
            call(next(last))
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            call(next(last))
        synchronize(device)
        last_step_s = (time.perf_counter() - start) / repeats

    optimizer = stage.phase.optimizer  # an lr written after capture takes effect: 0 freezes the weights
    lr = optimizer.param_groups[0]['lr']
    optimizer.set_lr(0.0)
    before = [p.detach().clone() for p in optimizer.params]
    call(next(full))
    lr_write_ok = all(torch.equal(a, b) for a, b in zip(before, optimizer.params))
    optimizer.set_lr(lr)

    sizes = {ctx.batch_size} | ({ctx.last_loader.batch_size} if ctx.last_loader is not None else set())
    # == rather than `is`: a step's variants are bound methods, equal but made anew at each access
    captured_sizes = sorted(size for f, size in runner.graphs if f == fn)
    return {'timed_steps': steps, 'step_ms': 1000 * step_s, 'gpu_step_ms': gpu_step_ms,
            'last_batch_ms': 1000 * last_step_s if ctx.last_loader is not None else None,
            'last_batch_repeats': repeats if ctx.last_loader is not None else 0,
            'curve': curve.values(), 'lr_write_ok': lr_write_ok,
            'captured': capturing and sorted(sizes) == captured_sizes and not runner.eager_keys,
            'graphs': captured_sizes, 'eager_fallback': bool(runner.eager_keys),
            'fallback': getattr(runner, 'fallback', None)}


def time_test_pass(nets, args, runner_mode, ctx, clock, compare):
    """The test pass through every network a run evaluates: a first pass (the
    capture), on CUDA one replay with host syncs made errors, then a timed
    pass. With `compare`, also an eager pass on the same weights. Returns
    seconds per test batch (all networks) and the metrics."""
    device, total_s, out = ctx.device, 0.0, {'metrics': [], 'eager_metrics': [], 'captured': []}
    for net in nets:
        clock.check()
        evaluator = Evaluator(net, ctx.test_loader, args.amp, runner_mode)
        evaluator()
        runner = evaluator.runner
        out['captured'].append(any(size == ctx.eval_batch_size for _, size in runner.graphs)
                               and not runner.eager_keys)
        if runner.use_graphs:
            batch = next(iter(ctx.test_loader))
            was_training = net.training
            net.eval()
            with syncs_raise(device, True):
                runner(batch)
            net.train(was_training)
        clock.check()
        synchronize(device)
        start = time.perf_counter()
        out['metrics'].append(evaluator())
        synchronize(device)
        total_s += time.perf_counter() - start
        if compare:
            out['eager_metrics'].append(Evaluator(net, ctx.test_loader, args.amp, 'off')())
    out['test_batch_s'] = total_s / len(ctx.test_loader)
    return out


def run_trial(name, path, ctx, clock, plan, share_s):
    """Build a configuration from seed 0 and train each of its stages on the
    `path` ('eager' or 'graphs'), then time the test pass. The eager trial
    also records the host syncs of one eager step of each stage and of the
    evaluation, and fills `plan` (timed steps per stage)."""
    device, cuda = ctx.device, ctx.device.type == 'cuda'
    # off CUDA both trials run eagerly in fp32 (the CPU default): a rehearsal of the script
    args = config_args(name, str(device), path if cuda else 'fp32', ctx.batch_size, ctx.nets)
    runner_mode = 'graphs' if (path == 'graphs' and cuda) else 'off'
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    ctx.rewind()
    stages, nets = build_stages(name, args, device, ctx.build_labels)
    if any(fnmatch.fnmatch(name, p) for p in ctx.plant_host_sync):
        primary(stages).step = WithHostSync(primary(stages).step)
    main = primary(stages)
    trial = {'path': path, 'stages': {}, 'main_stage': main.label,
             'capturable': getattr(main.step, 'capturable', True)}
    for stage in stages:
        # the configuration's main stage gets most of the timing; the others a few steps
        budget = 0.25 * share_s if stage is main else 0.0
        trial['stages'][stage.label] = run_stage(stage, runner_mode, ctx, clock, plan, budget)
        trial['stages'][stage.label]['in_run'] = stage.in_run
        trial['stages'][stage.label]['test_pass'] = stage.test_pass
    trial['test'] = time_test_pass(nets, args, runner_mode, ctx, clock, compare=path == 'graphs')
    if path == 'eager':
        syncs = {}
        batch = next(iter(ctx.train_loader))
        for stage in stages:
            clock.check()
            stage.begin()
            syncs[stage.label] = host_syncs(stage.function(), batch)
        for i, net in enumerate(nets):
            evaluator = Evaluator(net, ctx.test_loader, args.amp, 'off')
            net.eval()
            syncs[f'test {i + 1}' if len(nets) > 1 else 'test'] = host_syncs(
                evaluator.step, next(iter(ctx.test_loader)))
        trial['host_syncs'] = syncs
    trial['peak_mib'] = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None
    return trial


# ----------------------------------------------------------------------------- verdicts

def check(status, detail=''):
    """A check's result: status 'pass', 'fail', 'skip' (not run: the detail
    says why) or 'n/a' (does not apply, e.g. graphs of a step that runs
    eagerly by design)."""
    return {'status': status, 'detail': detail}


def passed(ok, detail=''):
    return check('pass' if ok else 'fail', detail)


def window_medians(curve, window=CURVE_WINDOW):
    """The median of each `window` steps (the last window may be shorter): a
    spike of one step does not move it."""
    parts = (curve[i:i + window] for i in range(0, len(curve), window))
    return [sorted(part)[len(part) // 2] for part in parts]


def curves_agree(a, b):
    """(agree, worst relative difference, the window medians): medians of
    CURVE_WINDOW steps within CURVE_REL relative + CURVE_ABS absolute."""
    if len(a) != len(b):
        return False, float('inf'), ([], [])
    ma, mb = window_medians(a), window_medians(b)
    ok = all(abs(x - y) <= CURVE_REL * max(abs(x), abs(y)) + CURVE_ABS for x, y in zip(ma, mb))
    worst = max((abs(x - y) / max(abs(x), abs(y), 1e-12) for x, y in zip(ma, mb)), default=0.0)
    return ok, worst, (ma, mb)


def compare(name, eager, graphs, ctx):
    """Per stage and for the test pass: the checks, and the s/epoch of each path."""
    cuda = ctx.device.type == 'cuda'
    by_design = not eager['capturable']
    stages = {}
    for label, e in eager['stages'].items():
        g = graphs['stages'][label]
        checks = {}
        finite = all(math.isfinite(v) for v in e['curve'] + g['curve'])
        checks['finite'] = passed(finite, '' if finite else 'a loss went non-finite')
        agree, worst, (me, mg) = curves_agree(e['curve'], g['curve'])
        checks['curves_agree'] = passed(agree, f'worst {CURVE_WINDOW}-step median differs by '
                                               f'{100 * worst:.1f}%')
        lr_ok = e['lr_write_ok'] and g['lr_write_ok']
        checks['lr_write'] = passed(lr_ok, '' if lr_ok else 'a step at lr 0 changed the weights')
        syncs = eager['host_syncs'].get(label, {})
        if by_design:
            checks['no_host_sync'] = check('n/a', 'the step declares capturable = False')
            checks['captured'] = check('n/a', g['fallback'] or 'runs eagerly by design')
        else:
            checks['no_host_sync'] = passed(not syncs, ', '.join(f'{op} x{n}' for op, n in syncs.items()))
            if cuda:
                checks['captured'] = passed(g['captured'], f"graphs for batch sizes {g['graphs']}"
                                            + ('; a capture failed' if g['eager_fallback'] else ''))
            else:
                checks['captured'] = check('skip', NEEDS_CUDA)
        test_e = eager['test']['test_batch_s'] if e['test_pass'] else 0.0
        test_g = graphs['test']['test_batch_s'] if g['test_pass'] else 0.0
        epoch_e = epoch_seconds(e['step_ms'] / 1000, (e['last_batch_ms'] or 0) / 1000, test_e,
                                ctx.batch_size, ctx.eval_batch_size)
        epoch_g = epoch_seconds(g['step_ms'] / 1000, (g['last_batch_ms'] or 0) / 1000, test_g,
                                ctx.batch_size, ctx.eval_batch_size)
        if by_design or not e['in_run']:
            checks['not_slower'] = check('n/a', 'runs eagerly by design' if by_design else
                                         'no epoch of a run is of this kind')
        elif cuda:
            ratio = epoch_g['s_per_epoch'] / epoch_e['s_per_epoch']
            checks['not_slower'] = passed(ratio <= SLOWER_ALLOWED, f'graphs take {ratio:.2f}x the eager time')
        else:
            checks['not_slower'] = check('skip', NEEDS_CUDA)
        stages[label] = {'in_run': e['in_run'], 'checks': checks,
                         'eager': {**timing(e), 'epoch': epoch_e},
                         'graphs': {**timing(g), 'epoch': epoch_g},
                         'window_medians': {'eager': [round(v, 5) for v in me],
                                          'graphs': [round(v, 5) for v in mg]}}
    test_checks = {}
    same = all(abs(a['loss'] - b['loss']) <= 0.01 * abs(b['loss']) + 1e-3
               and abs(a['top1'] - b['top1']) <= 0.5
               for a, b in zip(graphs['test']['metrics'], graphs['test']['eager_metrics']))
    test_checks['test_agrees'] = passed(same, f"graphs {graphs['test']['metrics']} vs eager "
                                              f"{graphs['test']['eager_metrics']} on the same weights")
    syncs = {k: v for k, v in eager['host_syncs'].items() if k.startswith('test')}
    found = {k: v for k, v in syncs.items() if v}
    test_checks['test_no_host_sync'] = passed(not found, json.dumps(found) if found else '')
    test_checks['test_captured'] = (passed(all(graphs['test']['captured'])) if cuda
                                    else check('skip', NEEDS_CUDA))
    return stages, test_checks


def timing(t):
    return {k: t[k] for k in ('timed_steps', 'step_ms', 'gpu_step_ms', 'last_batch_ms', 'last_batch_repeats')}


def verdict_of(checks):
    """'FAIL' if any check failed, 'SKIP' if any was skipped, else 'PASS'."""
    statuses = {c['status'] for c in checks}
    return 'FAIL' if 'fail' in statuses else 'SKIP' if 'skip' in statuses else 'PASS'


def check_config(name, ctx, clock, share_s):
    """Both trials of a configuration and their comparison: its summary entry."""
    result = {'config': name}
    plan = {}
    started = time.time()
    trials = {}
    try:
        for path in ('eager', 'graphs'):
            result['during'] = f'the {path} trial'
            trials[path] = run_trial(name, path, ctx, clock, plan, share_s)
        del result['during']
    except OutOfTime:
        result.update(verdict='SKIP', why=f"out of time during {result.pop('during')}")
        return result
    except Exception as e:  # noqa: BLE001  (one configuration failing must not end the check)
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ''
        result.update(verdict='FAIL', why=f"error during {result.pop('during')}: {type(e).__name__}: {first}",
                      trace=traceback.format_exc()[-2000:])
        if 'eager' in trials and trials['eager'].get('host_syncs'):
            result['host_syncs'] = trials['eager']['host_syncs']
        return result
    stages, test_checks = compare(name, trials['eager'], trials['graphs'], ctx)
    main_label = trials['eager']['main_stage']
    failed, skipped = [], set()
    for label, stage in stages.items():
        stage['verdict'] = verdict_of(stage['checks'].values())
        failed += [f"{label}: {k}" + (f" ({c['detail']})" if c['detail'] else '')
                   for k, c in stage['checks'].items() if c['status'] == 'fail']
        skipped |= {c['detail'] for c in stage['checks'].values() if c['status'] == 'skip'}
    failed += [f"{k} ({c['detail']})" for k, c in test_checks.items() if c['status'] == 'fail']
    skipped |= {c['detail'] for c in test_checks.values() if c['status'] == 'skip'}
    every_check = [c for s in stages.values() for c in s['checks'].values()] + list(test_checks.values())
    test = {'checks': test_checks, 'metrics': trials['graphs']['test']['metrics'],
            **{f'{p}_test_batch_ms': 1000 * trials[p]['test']['test_batch_s'] for p in trials}}
    result.update(verdict=verdict_of(every_check), why='; '.join(failed) or ', '.join(sorted(skipped)),
                  main_stage=main_label, capturable=trials['eager']['capturable'], stages=stages, test=test,
                  host_syncs=trials['eager']['host_syncs'],
                  peak_mib={p: trials[p]['peak_mib'] for p in trials}, seconds=round(time.time() - started, 1))
    return result


# ----------------------------------------------------------------------------- the parts

@dataclass
class Context:
    device: torch.device
    batch_size: int
    eval_batch_size: int
    nets: tuple
    max_steps: int
    min_steps: int
    runner_warmup: int
    last_batch_repeats: int
    plant_host_sync: tuple
    build_labels: torch.Tensor = None
    train_loader: DeviceLoader = None
    last_loader: Optional[DeviceLoader] = None
    test_loader: DeviceLoader = None

    def rewind(self):
        """The loaders back to their first batch: every trial sees the same batches."""
        for seed, loader in enumerate((self.train_loader, self.last_loader, self.test_loader)):
            if loader is not None:
                loader.generator.manual_seed(seed)


def make_context(args):
    device = args.device
    cuda = device.type == 'cuda'
    info = DATASETS['cifar10']
    ctx = Context(device=device, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
                  nets=tuple(args.nets), max_steps=args.steps, min_steps=min(5, args.steps),
                  # StepRunner's eager steps before a capture; none off CUDA, where nothing is captured
                  runner_warmup=StepRunner(lambda batch: None).warmup if cuda else 0,
                  last_batch_repeats=min(2, args.steps), plant_host_sync=tuple(args.plant_host_sync))
    images, labels = learnable_images(20 * args.batch_size, seed=0)
    # the step's builders size what depends on the data (CRD's memory bank) for the real split
    ctx.build_labels = torch.arange(CIFAR_TRAIN) % 10
    ctx.train_loader = DeviceLoader(images, labels, info, args.batch_size, device, train=True,
                                    channels_last=cuda)
    last = CIFAR_TRAIN % args.batch_size
    if last:
        ctx.last_loader = DeviceLoader(images[:4 * last], labels[:4 * last], info, last, device,
                                       train=True, channels_last=cuda)
    test_images, test_labels = learnable_images(args.n_test, seed=1)
    ctx.test_loader = DeviceLoader(test_images, test_labels, info, args.eval_batch_size, device,
                                   train=False, channels_last=cuda)
    ctx.rewind()
    return ctx


def config_order(names):
    """The most expensive configurations first: a share of what is left shrinks
    towards the end, and the cheap ones fit in a smaller one."""
    return sorted(names, key=lambda n: (n not in EXPENSIVE, EXPENSIVE.index(n) if n in EXPENSIVE else 0))


def check_steps(args, names, deadline):
    ctx = make_context(args)
    clock = Clock(deadline)
    results = {}
    ordered = config_order(names)
    for i, name in enumerate(ordered):
        if clock.left() <= 0:
            results[name] = {'config': name, 'verdict': 'SKIP', 'why': 'out of time (not started)'}
            say(f'{name}: SKIP, out of time (not started)')
            continue
        share_s = clock.left() / (len(ordered) - i)
        results[name] = check_config(name, ctx, clock, share_s)
        say(config_line(results[name], ctx))
    if ctx.device.type == 'cuda':  # the accuracy runs want the memory this process kept cached
        gc.collect()
        torch.cuda.empty_cache()
    return {name: results[name] for name in names}  # in bench.py's order


def config_line(r, ctx):
    line = f"{r['config']}: {r['verdict']}"
    if 'stages' in r:
        s = r['stages'][r['main_stage']]
        eager, graphs = s['eager']['epoch']['s_per_epoch'], s['graphs']['epoch']['s_per_epoch']
        line += f", eager {eager:.2f} s/epoch"
        line += (f", graphs {graphs:.2f} s/epoch ({eager / graphs:.2f}x)" if ctx.device.type == 'cuda'
                 else f', graphs skipped ({NEEDS_CUDA})')
        line += f" [{s['eager']['timed_steps']} timed steps]"
    return line + (f" - {r['why']}" if r.get('why') else '')


def read_metrics(path):
    try:
        with open(path, newline='') as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def stop(process):
    """End a training run this script started, with its children."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()


def check_accuracy(args, deadline):
    """Both resnet20 runs at once (separate processes, one device), each
    stopped at the deadline."""
    cuda = args.device.type == 'cuda'
    # off CUDA the scripts refuse graphs: the fast run rehearses eagerly
    runs = {'fast+graphs': ['--amp', '--channels_last', '--compile', 'graphs' if cuda else 'off'],
            'fp32 eager': ['--no-amp', '--no-channels_last', '--compile', 'off']}
    results = {}
    if time.time() >= deadline:
        for label in runs:
            results[label] = {'skipped': 'out of time (not started)'}
        results['within_0.5'] = check('skip', 'out of time (not started)')
        return results
    scratch = tempfile.mkdtemp(prefix='gpu_check_runs_')
    processes, outputs = {}, {}
    try:
        for label, flags in runs.items():
            note = label.replace(' ', '-').replace('+', '-')
            cmd = [sys.executable, os.path.join(ROOT, 'train_base.py'), '--data_name', 'cifar10',
                   '--net_name', 'resnet20', '--img_root', args.img_root, '--save_root', scratch,
                   '--note', note, '--epochs', str(args.epochs), '--batch_size', str(args.batch_size),
                   '--device', str(args.device), '--no_download', '--no_progress', '--overwrite', *flags]
            outputs[label] = open(os.path.join(scratch, f'{note}.out'), 'w+')
            processes[label] = (subprocess.Popen(cmd, stdout=outputs[label], stderr=subprocess.STDOUT,
                                                 cwd=ROOT, start_new_session=True), note, time.time())
        while any(p.poll() is None for p, _, _ in processes.values()) and time.time() < deadline:
            time.sleep(0.5)
        for label, (process, note, started) in processes.items():
            finished = process.poll() is not None
            stop(process)
            rows = read_metrics(os.path.join(scratch, note, 'metrics.csv'))
            r = {'exit': process.returncode if finished else None, 'seconds': round(time.time() - started, 1),
                 'epochs_done': len(rows),
                 'top1_per_epoch': [round(float(row['test_top1']), 2) for row in rows]}
            if rows and rows[-1].get('step_path'):
                r['step_path'] = rows[-1]['step_path']
            if not finished:
                r['skipped'] = f'out of time after epoch {len(rows)} of {args.epochs}'
            elif process.returncode != 0 or len(rows) != args.epochs:
                outputs[label].seek(0)
                r['error'] = (outputs[label].read().strip().splitlines() or ['no output'])[-1][:300]
            else:
                r['final_top1'] = float(rows[-1]['test_top1'])
            if not cuda and label == 'fast+graphs':
                r['rehearsal'] = 'eager: graphs need CUDA'
            results[label] = r
            say(f'accuracy {label}: {json.dumps(r)[:400]}')
    finally:
        for handle in outputs.values():
            handle.close()
        shutil.rmtree(scratch, ignore_errors=True)
    fast, plain = results['fast+graphs'], results['fp32 eager']
    if 'error' in fast or 'error' in plain:
        results['within_0.5'] = check('fail', f"a run failed: {fast.get('error') or plain.get('error')}")
    elif 'skipped' in fast or 'skipped' in plain:
        results['within_0.5'] = check('skip', fast.get('skipped') or plain.get('skipped'))
    else:
        gap = abs(fast['final_top1'] - plain['final_top1'])
        detail = f"top-1 {fast['final_top1']:.2f} (fast, graphs) vs {plain['final_top1']:.2f} (fp32 eager)"
        if not cuda:
            results['within_0.5'] = check('skip', f'{NEEDS_CUDA} (rehearsal: {detail})')
        elif fast.get('step_path', 'graphs') != 'graphs':
            results['within_0.5'] = check('fail', f"the fast run's steps ran {fast['step_path']}, not graphs")
        else:
            results['within_0.5'] = passed(gap <= 0.5, detail)
    say(f"accuracy: final top-1 within 0.5 points: {results['within_0.5']['status']} "
        f"({results['within_0.5']['detail']})")
    return results


# ----------------------------------------------------------------------------- the summary

def overall(configs, accuracy, crashed=()):
    """(verdict, failed, skipped): lists of 'what: why'; `crashed`: errors of
    the check itself, which fail it."""
    failed, skipped = list(crashed), []
    for name, r in configs.items():
        if r['verdict'] == 'FAIL':
            failed.append(f"{name}: {r['why']}")
        elif r['verdict'] == 'SKIP':
            skipped.append(f"{name}: {r['why']}")
    if accuracy is not None:
        c = accuracy['within_0.5']
        if c['status'] == 'fail':
            failed.append(f"accuracy: {c['detail']}")
        elif c['status'] == 'skip':
            skipped.append(f"accuracy: {c['detail']}")
    verdict = 'FAIL' if failed else 'INCOMPLETE' if skipped else 'PASS'
    return verdict, failed, skipped


def verdict_line(verdict, failed, skipped):
    def some(items):
        names = [i.split(':')[0] for i in items]
        return ', '.join(names[:6]) + (f' and {len(names) - 6} more' if len(names) > 6 else '')
    parts = [f'{len(failed)} failed: {some(failed)}'] if failed else []
    parts += [f'{len(skipped)} skipped: {some(skipped)}'] if skipped else []
    return f"gpu_check: {verdict}" + (f" ({'; '.join(parts)})" if parts else ' (every check passed)')


def markdown(summary):
    cuda = summary['device_type'] == 'cuda'
    e = summary['epoch']
    lines = [f"# gpu_check: {summary['verdict']}", '',
             f"{summary['device']} | torch {summary['torch']} | {summary['date']} | "
             f"`{summary['command']}`", '']
    if summary['configs']:
        lines += [TABLE_HEADER, '|---|---|---|---|---|---|']
        for name, r in summary['configs'].items():
            if 'stages' not in r:
                lines.append(f"| {name} | | | | | {r['verdict']}: {r['why'].replace('|', '/')} |")
                continue
            for label, s in r['stages'].items():
                if not s['in_run']:
                    continue  # checked, but no epoch of a run is of this kind
                row = name if label == r['main_stage'] else f'{name} ({label})'
                eager, graphs = s['eager']['epoch']['s_per_epoch'], s['graphs']['epoch']['s_per_epoch']
                peak = r['peak_mib']
                memory = f"{peak['eager']:.0f} / {peak['graphs']:.0f}" if cuda else '-'
                graph_cells = f'{graphs:.2f} | {eager / graphs:.2f}x' if cuda else f'skipped ({NEEDS_CUDA}) | -'
                failed = [k for k, c in s['checks'].items() if c['status'] == 'fail']
                if label == r['main_stage']:
                    failed += [k for k, c in r['test']['checks'].items() if c['status'] == 'fail']
                verdict = s['verdict'] if not failed else 'FAIL: ' + ', '.join(failed)
                lines.append(f'| {row} | {eager:.2f} | {graph_cells} | {memory} | {verdict} |')
        lines += ['', f"s/epoch is extrapolated from timed steps: {e['full_batches']} full batches of "
                      f"{e['batch_size']} x the mean time of the timed steps (per configuration in "
                      f"summary.json, at most {summary['max_steps']}) + the last batch of {e['last_batch']} "
                      f"(its own step, timed) + the test pass ({e['test_images']} images in batches of "
                      f"{e['eval_batch_size']}, {e['test_note']}); pre-training stages have no test pass. "
                      f"Rows in parentheses are the other kinds of epoch a run trains."]
    if summary.get('accuracy'):
        a = summary['accuracy']
        lines += ['', f"Accuracy (resnet20, {summary['accuracy_epochs']} epochs): "
                      f"{a['within_0.5']['status']} - {a['within_0.5']['detail']}"]
    for title, items in (('Failed', summary['failed']), ('Skipped', summary['skipped'])):
        if items:
            lines += ['', f'{title}:', ''] + [f'- {item}' for item in items]
    lines += ['', summary['line']]
    return '\n'.join(lines) + '\n'


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--img_root', default='./datasets', help='accuracy: holds cifar-10-batches-py/')
    parser.add_argument('--out', default=os.environ.get('OUT', './gpu_check'), help='the results folder')
    parser.add_argument('--parts', nargs='+', choices=tuple(SHARES), default=list(SHARES))
    parser.add_argument('--configs', nargs='+', default=['*'], metavar='PATTERN',
                        help=f'configurations (shell patterns) among: {" ".join(bench.config_names())}')
    parser.add_argument('--minutes', type=float, default=7.0, help="the whole check's time")
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--steps', type=int, default=60,
                        help='most timed full-batch steps of a configuration (fewer where time is short)')
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--eval_batch_size', type=int, default=None,
                        help="test batch (default: the training scripts' --eval_batch_size); divides 10,000")
    parser.add_argument('--n_test', type=int, default=CIFAR_TEST,
                        help='synthetic test images timed (default: a whole test pass; fewer are scaled up)')
    parser.add_argument('--nets', nargs=2, default=[bench.TEACHER, bench.STUDENT],
                        metavar=('TEACHER', 'STUDENT'),
                        help='the network pair of the KD and DML configurations')
    parser.add_argument('--epochs', type=int, default=15, help='accuracy: epochs of each run')
    parser.add_argument('--plant_host_sync', nargs='+', default=[], metavar='PATTERN',
                        help="the matching configurations' main step reads its result back to the host "
                             '(.item()): the check must fail (for its own tests)')
    args = parser.parse_args(argv)
    if args.minutes < 0 or args.steps < 1 or args.batch_size < 1 or args.epochs < 1:
        parser.error('--minutes must be >= 0, --steps, --batch_size and --epochs >= 1')
    if args.eval_batch_size is None:  # the training scripts' default
        args.eval_batch_size = config_args('base-r20', 'cpu', 'fp32', args.batch_size,
                                           args.nets).eval_batch_size
    if args.eval_batch_size < 1 or CIFAR_TEST % args.eval_batch_size:
        parser.error(f'--eval_batch_size {args.eval_batch_size} must divide the {CIFAR_TEST:,} test images')
    if args.n_test < args.eval_batch_size or args.n_test % args.eval_batch_size or args.n_test > CIFAR_TEST:
        parser.error(f'--n_test {args.n_test} must be a multiple of the test batch ({args.eval_batch_size}) '
                     f'up to {CIFAR_TEST:,}')
    args.names = [n for n in bench.config_names() if any(fnmatch.fnmatch(n, p) for p in args.configs)]
    if not args.names:
        parser.error(f'--configs {" ".join(args.configs)} matches no configuration')
    args.device = torch.device(args.device)
    if args.device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError('this check needs a CUDA GPU (--device cpu rehearses the script without one)')
    return args


@cli
def main(argv=None):
    started = time.time()
    args = parse_args(argv)
    torch.backends.cudnn.benchmark = True  # as the training scripts run (utils.configure_backend)
    os.makedirs(args.out, exist_ok=True)
    command = 'python tools/gpu_check.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
    device = describe_device(args.device)
    say(f'{device} | torch {torch.__version__} | {time.strftime("%Y-%m-%d %H:%M")} | {command}')
    total = sum(SHARES[p] for p in args.parts)
    end = started + 60 * args.minutes
    configs, accuracy, crashed = {}, None, []
    try:
        if 'steps' in args.parts:
            deadline = started + 60 * args.minutes * SHARES['steps'] / total
            until = time.strftime('%H:%M:%S', time.localtime(deadline))
            say(f'--- steps: {len(args.names)} configurations until {until}')
            configs = check_steps(args, args.names, deadline)
        if 'accuracy' in args.parts:
            say(f'--- accuracy until {time.strftime("%H:%M:%S", time.localtime(end))}')
            accuracy = check_accuracy(args, end)
    except Exception as e:  # noqa: BLE001  (the check itself broke: still a summary, and FAIL)
        say(traceback.format_exc())
        crashed.append(f'gpu_check: {type(e).__name__}: {str(e).strip()[:300]}')
    finally:
        verdict, failed, skipped = overall(configs, accuracy, crashed)
        line = verdict_line(verdict, failed, skipped)
        n_test_note = ('timed whole' if args.n_test == CIFAR_TEST
                       else f'timed over {args.n_test} images and scaled per batch')
        summary = {'verdict': verdict, 'exit_status': EXIT_STATUS[verdict], 'line': line,
                   'failed': failed, 'skipped': skipped, 'device': device, 'device_type': args.device.type,
                   'torch': torch.__version__, 'date': time.strftime('%Y-%m-%d %H:%M'), 'command': command,
                   'cudnn_benchmark': torch.backends.cudnn.benchmark, 'minutes': args.minutes,
                   'seconds': round(time.time() - started, 1), 'max_steps': args.steps,
                   'epoch': {'train_images': CIFAR_TRAIN, 'test_images': CIFAR_TEST,
                             'batch_size': args.batch_size, 'full_batches': CIFAR_TRAIN // args.batch_size,
                             'last_batch': CIFAR_TRAIN % args.batch_size,
                             'eval_batch_size': args.eval_batch_size, 'test_note': n_test_note},
                   'configs': configs, 'accuracy': accuracy, 'accuracy_epochs': args.epochs}
        with open(os.path.join(args.out, 'summary.json'), 'w') as f:
            json.dump(summary, f, indent=1, default=str)
        with open(os.path.join(args.out, 'summary.md'), 'w') as f:
            f.write(markdown(summary))
        say(line)
        with open(os.path.join(args.out, 'gpu_check.log'), 'w') as f:
            f.write('\n'.join(LOG_LINES) + '\n')
    raise SystemExit(EXIT_STATUS[verdict])


if __name__ == '__main__':
    main()
