"""The training scripts' shared pieces: precision and layout, seeding, the
learning-rate schedule and optimiser, device-side metrics and evaluation,
and the phase/epoch loop that every script runs, from start-up checks to the
final line.

A run is a list of `Phase`s (a method's pre-training phases, then the main
schedule); each epoch trains, evaluates, logs one line and one metrics row,
then checkpoints, so that a kill at any moment resumes exactly.
"""
import importlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from capture import DOT, SGD, StepRunner
from checkpoints import file_digest, load_checkpoint
from distributed import WORLD, init_distributed, min_over_processes, sum_over_processes
from errors import UserError
from records import LOG, Checkpointer, Run, describe_device, json_args, reset_logger


# ----------------------------------------------------------------------------- precision and layout

def autocast(args):
    """The forward passes' precision: bf16 autocast with --amp, else float32.
    A captured step re-casts weights every replay anyway, and autocast's cache
    must not outlive a CUDA-graph capture, so it is off unless the step runs eagerly."""
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.amp,
                          cache_enabled=getattr(args, 'compile', 'off') == 'off')


def cast_frozen_weights(net, args):
    """With --amp, a frozen network's convolution weights stored in bf16 once,
    instead of cast by autocast at every forward (identical numbers: autocast
    casts them to bf16 for the convolution anyway). BatchNorm and the
    classifier keep float32, as autocast runs them."""
    if args.amp:
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.to(torch.bfloat16)
    return net


def memory_layout(module, args):
    """Channels-last weights with --channels_last (convolutions run faster on GPUs)."""
    return module.to(memory_format=torch.channels_last) if args.channels_last else module


# ----------------------------------------------------------------------------- seeding, RNG state

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def configure_backend(args):
    """cuDNN autotuning for speed, or deterministic kernels with --deterministic."""
    if args.deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def rng_state():
    """Python, numpy and torch (CPU and CUDA) RNG states, storable with weights_only loading."""
    np_state = np.random.get_state()
    state = {'python': random.getstate(),
             'numpy': (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
             'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(_tuplify(state['python']))
    name, keys, *rest = state['numpy']
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------- schedule and optimiser

def lr_at(epoch, epochs, base_lr, decay_epochs=None, decay_rate=0.1):
    """The learning rate of epoch `epoch` (from 1): `base_lr` times
    `decay_rate` for each of `decay_epochs` already passed. Without
    `decay_epochs`, the seed's step schedule (epochs 1-100 lr, 101-150 lr/10,
    151-200 lr/100) with its milestones scaled to `epochs` (rounded up, so a
    one-epoch run keeps lr)."""
    lr = base_lr
    for e in decay_milestones(epochs, decay_epochs):
        if epoch > e:
            lr *= decay_rate  # one multiplication per decay, as the seed computes it
    return lr


def decay_milestones(epochs, decay_epochs=None):
    """The epochs after which lr decays: `decay_epochs`, or the seed's 50% and
    75% of `epochs` (rounded up) when None."""
    if decay_epochs is None:
        return [math.ceil(epochs * 0.5), math.ceil(epochs * 0.75)]
    return list(decay_epochs)


def main_schedule(args):
    """lr(epoch) of the main schedule, from --lr, --lr_decay_epochs, --lr_decay_rate."""
    return lambda epoch: lr_at(epoch, args.epochs, args.lr, args.lr_decay_epochs, args.lr_decay_rate)


def make_optimizer(params, args):
    """The main optimiser of a distillation run: make_sgd's, or with
    --optimizer dot the distillation-oriented trainer (capture.DOT: momentum
    minus / plus --dot_delta for the task / distillation gradients)."""
    if getattr(args, 'optimizer', 'sgd') == 'dot':
        return DOT(params, lr=args.lr, momentum=args.momentum, delta=args.dot_delta,
                   weight_decay=args.weight_decay)
    return make_sgd(params, args)


def make_sgd(params, args, lr=None, nesterov=None):
    """The shared optimiser: SGD with momentum (Nesterov as --nesterov unless
    `nesterov` is given) and weight decay, in the capturable form every step
    uses (capture.SGD); under torchrun it averages the gradients over
    processes first."""
    return SGD(params, lr=args.lr if lr is None else lr, momentum=args.momentum,
               weight_decay=args.weight_decay, nesterov=args.nesterov if nesterov is None else nesterov)


# ----------------------------------------------------------------------------- metrics and evaluation

def topk_correct(logits, target, ks=(1, 5)):
    """Number of samples whose target is among the top-k logits, per k, as a device tensor."""
    maxk = min(max(ks), logits.shape[1])
    hit = logits.topk(maxk, dim=1).indices == target[:, None]
    cum = hit.cumsum(dim=1).sum(dim=0)  # correct within top-1, top-2, ...
    return torch.stack([cum[min(k, maxk) - 1] for k in ks]).float()


class EpochStats:
    """Sums of a step's statistics, kept on the device: the step returns one
    vector (loss terms weighted by batch size first, then correct counts and
    the sample count) and no value crosses to the host until `values()` at a
    logging point. The first step at which each loss term went non-finite is
    recorded too. Every update is in place and index-free: no host copies."""

    def __init__(self, names, loss_names, device):
        self.names = list(names)
        if self.names[:len(loss_names)] != list(loss_names):
            raise ValueError('the loss terms must come first in the step statistics')
        self.n_losses = len(loss_names)
        self.total = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        self.first_bad = torch.full((self.n_losses,), -1, dtype=torch.long, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)

    def reset(self):
        """Start a new epoch, in place (a captured step keeps writing these tensors)."""
        self.total.zero_()
        self.first_bad.fill_(-1)
        self.step.zero_()

    def add(self, sums):
        self.step += 1
        newly_bad = (self.first_bad < 0) & ~torch.isfinite(sums[:self.n_losses])
        torch.where(newly_bad, self.step, self.first_bad, out=self.first_bad)
        self.total.add_(sums)

    def values(self):
        """Host dict of averages (losses per sample, accuracies in percent) over
        every process; syncs."""
        total = sum_over_processes(self.total).tolist()
        n = max(total[self.names.index('n')], 1)
        out = {}
        for name, v in zip(self.names, total):
            if name == 'n':
                out['n'] = int(v)
            elif 'correct' in name:  # correct1 -> top1, net1_correct5 -> net1_top5
                out[name.replace('correct', 'top')] = 100.0 * v / n
            else:
                out[name] = v / n
        return out

    def non_finite(self):
        """(loss name, step) of the earliest non-finite loss term on any process, or None; syncs."""
        never = torch.iinfo(torch.long).max  # -1 (never) counts as last
        first_bad = min_over_processes(torch.where(self.first_bad < 0, never, self.first_bad))
        bad = [(s, name) for s, name in zip(first_bad.tolist(), self.names) if s != never]
        return None if not bad else min(bad)[::-1]


def stat_columns(names):
    """metrics.csv's train columns for a step's statistic names (no 'n')."""
    return [f"train_{n.replace('correct', 'top')}" for n in names if n != 'n']


def cross_entropy_stats(logits, target, *losses):
    """[loss * B for each loss, correct@1, correct@5, B]: a step's sums for
    EpochStats, built on the device (no host sync)."""
    b = target.shape[0]
    sums = [(loss.detach().float() * b).reshape(1) for loss in losses]
    return torch.cat(sums + [topk_correct(logits.detach(), target), logits.new_full((1,), b).float()])


TEST_METRICS = ('loss', 'top1', 'top5')


class Evaluator:
    """Test loss, top-1 and top-5 of `net` over `loader`, one sync at the end.
    Kept per network: its sums live in one tensor and its step runs as
    `mode` says (`--compile`: captured once, replayed every epoch);
    `runners` is how it ran (see fit)."""

    def __init__(self, net, loader, amp=False, mode='off', progress=False, desc='test'):
        self.net, self.loader, self.amp, self.progress, self.desc = net, loader, amp, progress, desc
        self.total = torch.zeros(4, dtype=torch.float64, device=loader.device)
        self.runner = StepRunner(self.step, mode, loader.device, warmup=1, log=LOG.info)
        self.runners = {desc: self.runner}

    @torch.no_grad()
    def step(self, batch):
        with torch.autocast(self.loader.device.type, dtype=torch.bfloat16, enabled=self.amp,
                            cache_enabled=self.runner.mode == 'off'):
            out = self.net(batch.img).out.float()
        loss = F.cross_entropy(out, batch.target, reduction='sum')
        self.total.add_(torch.cat([loss.reshape(1), topk_correct(out, batch.target),
                                   out.new_full((1,), batch.target.shape[0])]))

    def __call__(self):
        was_training = self.net.training
        self.net.eval()
        self.total.zero_()
        batches = self.loader
        if self.progress:
            from tqdm import tqdm
            batches = tqdm(self.loader, desc=self.desc, leave=False, dynamic_ncols=True, file=sys.stdout)
        for batch in batches:
            self.runner(batch)
        self.net.train(was_training)
        loss, c1, c5, n = sum_over_processes(self.total).tolist()
        n = max(n, 1)
        return dict(zip(TEST_METRICS, (loss / n, 100.0 * c1 / n, 100.0 * c5 / n)))


def evaluate(net, loader, progress=False, desc='test', amp=False):
    """One evaluation of `net` over `loader`, eager (see Evaluator)."""
    return Evaluator(net, loader, amp, progress=progress, desc=desc)()


# ----------------------------------------------------------------------------- phases and the epoch loop

class NonFiniteLoss(UserError):
    pass


@dataclass
class Phase:
    """One stretch of training with its own optimiser and learning-rate
    schedule: the main schedule, or a method's pre-training phase (AB/FSP
    initialisation, FT's paraphraser). `step(batch)` trains on one batch and
    adds the batch's sums to `stats` (an EpochStats: loss terms, accuracy);
    it may be an object whose `current()` gives the step of the present
    variant (KD on or off). `evaluate()` returns the test metrics logged
    after each epoch (None: no evaluation); `begin_epoch(epoch)` prepares an
    epoch and may return fields for its row (named in `extra_columns`)."""
    name: str
    epochs: int
    lr: Callable[[int], float]
    optimizer: torch.optim.Optimizer
    step: Callable
    stats: 'EpochStats'
    evaluate: Optional[Callable[[], dict]] = None
    begin_epoch: Optional[Callable[[int], Optional[dict]]] = None
    extra_columns: Sequence[str] = ()


def metrics_columns(phases, nets):
    """metrics.csv's columns: the union of every phase's, in a fixed order."""
    columns = ['phase', 'phase_index', 'epoch', 'lr']
    for phase in phases:
        columns += [c for c in phase.extra_columns if c not in columns]
    for phase in reversed(phases):  # the main schedule's columns first
        columns += [c for c in stat_columns(phase.stats.names) if c not in columns]
    if any(p.evaluate is not None for p in phases):
        columns += [f'test_{m}' if key == 'net' else f'test_{key}_{m}'
                    for key in nets for m in TEST_METRICS]
    return columns + ['seconds', 'img_per_s', *STEP_COLUMNS]


# How an epoch's steps ran (metrics.csv): the training step's path (eager,
# graphs or inductor) and why any step, training or test, did not run the path
# --compile asked for ('' when every one did).
STEP_COLUMNS = ('step_path', 'step_fallback')


def step_record(train_runner, test_runners):
    """(step_path, step_fallback) of the epoch that `train_runner` and the
    `test_runners` ({name: StepRunner}) ran since their begin_epoch()."""
    path, reason = train_runner.record()
    reasons = [reason] if reason else []
    for name, runner in test_runners.items():
        _, test_reason = runner.record()
        if test_reason and test_reason not in reasons:  # the same reason as training's is said once
            reasons.append(f'{name} step: {test_reason}')
    return path, '; '.join(reasons)


def step_paths_of(rows):
    """complete.json's record of how each phase ran, from its metrics rows:
    {phase: {'path': ..., 'fallback': ...}} (None where nothing was recorded).
    A phase whose epochs ran different paths (resumed on another device with
    --compile auto) lists each, in the order they first ran."""
    seen = {}
    for r in rows:
        entry = seen.setdefault(r['phase'], {'path': [], 'fallback': []})
        for key, column in (('path', 'step_path'), ('fallback', 'step_fallback')):
            value = r.get(column) or ''
            if value and value not in entry[key]:
                entry[key].append(value)
    return {phase: {'path': ', '.join(e['path']) or None, 'fallback': '; '.join(e['fallback']) or None}
            for phase, e in seen.items()}


class RunTrainer:
    """One run's phases, advanced one epoch at a time: `begin_epoch()` sets
    the next epoch up and returns the step to run on each of its batches,
    `end_epoch(train)` evaluates, logs one line, and, if the test loss and
    every tensor of the `watched` modules (networks, method state) are
    finite, writes one metrics row and the checkpoint
    (`checkpointer(phase_index, epoch, row)`); a non-finite one stops the run
    before anything of that epoch is saved. Each row records the step path
    that ran the epoch (STEP_COLUMNS), and log.txt says it once per phase,
    again whenever it changes. `fit` drives one run; a shared-teacher run
    (shared_teacher.py) drives several over one loader, each epoch of the
    loader being the next epoch of every run it trains."""

    def __init__(self, phases, loader, args, checkpointer, start=(0, 0), watched=()):
        self.phases, self.loader, self.args = phases, loader, args
        self.checkpointer, self.watched = checkpointer, watched
        # (phase index, epoch) of every epoch of the run, in order; `done` of them are behind it
        self.schedule = [(pi, e) for pi, p in enumerate(phases) for e in range(1, p.epochs + 1)]
        self.done = sum(p.epochs for p in phases[:start[0]]) + start[1]
        self.phase_index, self.runner, self.test_runners = None, None, {}
        self.row = None

    @property
    def finished(self):
        return self.done >= len(self.schedule)

    @property
    def phase(self):
        return self.phases[self.phase_index]

    def begin_epoch(self):
        """Set the next epoch up (learning rate, the phase's per-epoch state,
        zeroed statistics); returns the StepRunner of its steps."""
        pi, epoch = self.schedule[self.done]
        phase = self.phases[pi]
        if pi != self.phase_index:  # a phase's runner and its graphs last the phase
            self.phase_index = pi
            self.runner = StepRunner(phase.step, self.args.compile, self.loader.device, log=LOG.info)
            self.test_runners = getattr(phase.evaluate, 'runners', {}) if phase.evaluate is not None else {}
            self.logged_path = None
            if epoch == 1 and len(self.phases) > 1:
                LOG.info(f'--- phase {pi + 1}/{len(self.phases)}: {phase.name} ({phase.epochs} epochs)')
        self.epoch = epoch
        self.lr = phase.optimizer.set_lr(phase.lr(epoch))
        self.extra = phase.begin_epoch(epoch) if phase.begin_epoch is not None else None
        self.header = f'[{phase.name}] epoch {epoch}/{phase.epochs}'
        phase.stats.reset()
        for r in (self.runner, *self.test_runners.values()):
            r.begin_epoch()
        self.start_time = time.time()
        return self.runner

    def end_epoch(self, train):
        """Evaluate, log and save the epoch whose training statistics are
        `train` (train_epoch's); returns its metrics row."""
        phase = self.phase
        test = phase.evaluate() if phase.evaluate is not None else {}
        ran = step_record(self.runner, self.test_runners)  # (path, fallback reason)
        row = {'phase': phase.name, 'phase_index': self.phase_index, 'epoch': self.epoch, 'lr': self.lr,
               **(self.extra or {}),
               **{f'train_{k}': v for k, v in train.items() if k not in ('n', 'seconds', 'img_per_s')},
               **{f'test_{k}': v for k, v in test.items()},
               'seconds': time.time() - self.start_time, 'img_per_s': train['img_per_s'],
               **dict(zip(STEP_COLUMNS, ran))}
        if ran != self.logged_path:
            LOG.info(f'[{phase.name}] step path: {ran[0]}' + (f' ({ran[1]})' if ran[1] else ''))
            self.logged_path = ran
        LOG.info(format_row(self.header, row))
        check_epoch_result(self.header, test, self.watched, self.checkpointer)
        self.checkpointer(self.phase_index, self.epoch, row)
        self.done += 1
        self.row = row
        return row


def fit(phases, loader, args, checkpointer, start=(0, 0), watched=()):
    """Run `phases` in order from `start` = (phase index, epochs done in it),
    each epoch ended as RunTrainer says. Returns the last row."""
    trainer = RunTrainer(phases, loader, args, checkpointer, start, watched)
    while not trainer.finished:
        runner = trainer.begin_epoch()
        train = train_epoch(runner, loader, trainer.phase.stats, trainer.header, args.print_freq,
                            show_progress(args), checkpointer)
        trainer.end_epoch(train)
    return trainer.row


def check_epoch_result(header, test, watched, checkpointer):
    """Stop the run before an epoch whose test loss or weights are not finite is saved."""
    bad = [f'test {k}' for k, v in test.items() if k.endswith('loss') and not math.isfinite(v)]
    tensors = [t for m in watched for t in m.state_dict().values() if t.is_floating_point()]
    if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
        bad.append('the weights')
    if bad:
        raise NonFiniteLoss(f'{header}: {" and ".join(bad)} became non-finite; the run stops '
                            f'without saving this epoch: {checkpointer.describe_last_save()}')


def format_row(header, row):
    """The epoch's log line: losses and top-1 (top-5 is in metrics.csv),
    grouped by network when there are two."""
    def part(prefix):
        items = [(k[len(prefix):], v) for k, v in row.items()
                 if k.startswith(prefix) and not k.endswith('top5')]
        groups = {}
        for k, v in items:
            net, _, name = k.partition('_') if k.startswith('net') else ('', '', k)
            groups.setdefault(net, []).append(f'{name} {v:.2f}' if 'top' in name else f'{name} {v:.4f}')
        return ', '.join((f'{net} ' if net else '') + ' '.join(vals) for net, vals in groups.items())

    text = f"{header} | lr {row['lr']:.4g}"
    if 'kd_weight' in row:
        text += f" | kd weight {row['kd_weight']:.4g}"
    text += f" | train {part('train_')}"
    if any(k.startswith('test_') for k in row):
        text += f" | test {part('test_')}"
    return text + f" | {row['seconds']:.1f}s ({row['img_per_s']:.0f} img/s)"


def train_epoch(step, loader, stats, header, print_freq, progress, checkpointer):
    """Run `step(batch)` over an epoch; the step adds its sums to `stats` on the
    device. The host syncs only every `print_freq` steps and at the end; a
    non-finite loss stops the run there."""
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(loader), desc=header, leave=False, dynamic_ncols=True, file=sys.stdout)
    start = time.time()
    for i, batch in enumerate(loader, start=1):
        step(batch)
        if bar is not None:
            bar.update(1)
        if i % print_freq == 0 or i == len(loader):
            check_finite(stats, header, checkpointer)
            v = stats.values()
            text = '  '.join(f'{k} {v[k]:.4f}' for k in v if k != 'n')
            ips = v['n'] / max(time.time() - start, 1e-9)
            if bar is not None:
                bar.set_postfix_str(f'{text}  {ips:.0f} img/s', refresh=False)
            elif i != len(loader):
                LOG.info(f'{header} [{i}/{len(loader)}] {text}  {ips:.0f} img/s')
    if bar is not None:
        bar.close()
    seconds = time.time() - start
    v = stats.values()
    v['seconds'], v['img_per_s'] = seconds, v['n'] / max(seconds, 1e-9)
    return v


def check_finite(stats, header, checkpointer):
    bad = stats.non_finite()
    if bad is not None:
        term, step = bad
        raise NonFiniteLoss(f'{header}: the {term} loss became non-finite at step {step}; the run '
                            f'stops: {checkpointer.describe_last_save()}')


def show_progress(args):
    return sys.stdout.isatty() and not args.no_progress and WORLD.main


# ----------------------------------------------------------------------------- start-up and the run

RESUME_KEYS = ('epoch', 'phase_index', 'phase_epoch', 'best', 'optimizer', 'loader', 'rng', 'args',
               'inputs')
# Flags naming files a run is built from: a resumed run must read the same content.
INPUT_FILE_FLAGS = ('s_init', 't_model', 'net1_init', 'net2_init')


def input_digests(args):
    """sha256 of each input file the flags name ('random' and missing files
    are left out: loading reports those)."""
    return {name: file_digest(getattr(args, name)) for name in INPUT_FILE_FLAGS
            if isinstance(getattr(args, name, None), str) and os.path.isfile(getattr(args, name))}


def check_inputs_unchanged(saved, now):
    """Refuse to resume from inputs that differ from those the run was built from."""
    changed = [k for k in saved if k in now and saved[k] != now[k]]
    if changed:
        what = ', '.join('the training data (its size or content)' if k == 'data' else f'--{k}'
                         for k in changed)
        raise UserError(f'--resume: {what} changed since the run started; resume with the same '
                        f'inputs, or start over with --overwrite')


def begin(args, script, argv=None):
    """Start-up shared by the scripts. Only checks, nothing written: the run
    directory, the resume checkpoint with its flags and input files; then the
    backend and seeds. Returns (run, resume checkpoint or None, device).
    --resume of a finished run (complete.json) ends here, after those checks:
    one line saying so, exit code 0, no file of the run touched."""
    begin_process(args)
    run, resume = check_run(args, script, argv)
    if resume is not None and run.complete is not None:
        LOG.info(run.describe_complete())
        raise SystemExit(0)
    configure_backend(args)
    seed_everything(args.seed)
    return run, resume, torch.device(args.device)


def begin_process(args, log_file=True):
    """The process's start: join a torchrun job, log to stdout (and keep the
    lines for the run's log.txt, unless `log_file` is False), check
    --tensorboard's package."""
    args.device = init_distributed(args.device)
    reset_logger(buffer=log_file)
    if args.tensorboard:
        try:
            importlib.import_module('torch.utils.tensorboard')
        except ImportError:
            raise UserError('--tensorboard needs the tensorboard package (pip install tensorboard); '
                            'metrics.csv holds the same values') from None


def check_run(args, script, argv=None):
    """The run directory of `args` and, with --resume, its checkpoint, with
    its flags and input files checked (nothing written): (Run, checkpoint or None)."""
    run = Run(args, script, sys.argv[1:] if argv is None else argv)
    run.inputs = input_digests(args)
    resume = load_checkpoint(run.ckpt_path, 'resume checkpoint') if args.resume else None
    if resume is not None:
        missing = [k for k in RESUME_KEYS if k not in resume]
        if missing:
            raise UserError(f'resume checkpoint {run.ckpt_path} lacks {", ".join(missing)}: it was '
                            f'not written by {script} (a weights-only file cannot be resumed)')
        run.check_resume_args(resume['args'])
        check_inputs_unchanged(resume['inputs'], run.inputs)
    return run, resume


def train_phases(run, resume, phases, nets, loader, args, device, state=None, on_fresh_start=None):
    """The scripts' shared tail: open the run directory, start afresh or
    restore everything from the resume checkpoint, train every phase with a
    checkpoint after each epoch, mark the run complete and log the final line.

    `nets` maps checkpoint keys to networks ({'net': student} or {'net1': a,
    'net2': b}); `state` maps further checkpoint keys to modules whose
    state_dict is saved and restored (e.g. the distiller's connectors and
    memory banks); `on_fresh_start()` runs once, when the run starts afresh."""
    try:
        checkpointer, start = start_run(run, resume, phases, nets, loader, args, device, state,
                                        on_fresh_start)
        fit(phases, loader, args, checkpointer, start, watched=[*nets.values(), *(state or {}).values()])
        finish_run(run, checkpointer, args)
    finally:
        run.close()
    return checkpointer


def start_run(run, resume, phases, nets, loader, args, device, state=None, on_fresh_start=None):
    """train_phases' opening (see there): the run directory opened, the run
    started afresh or restored from `resume` (its loader and RNG state
    too). Returns (Checkpointer, start: (phase index, epochs done in it))."""
    state = state or {}
    inputs = {**run.inputs, 'data': loader.fingerprint}
    if resume is not None:
        check_inputs_unchanged(resume['inputs'], inputs)

    def resume_state(phase_index):
        return {'optimizer': phases[phase_index].optimizer.state_dict(),
                'loader': loader.state_dict(), 'rng': rng_state(), 'args': json_args(args),
                'inputs': inputs, **{key: module.state_dict() for key, module in state.items()}}

    checkpointer = Checkpointer(run, nets, resume_state, [p.name for p in phases])
    run.open(metrics_columns(phases, nets), describe_device(device), resumed=resume is not None)
    if resume is None:
        start = (0, 0)
        run.start_metrics()
        if on_fresh_start is not None:
            on_fresh_start()
    else:
        for key, module in state.items():
            module.load_state_dict(resume[key])
        start = checkpointer.restore(resume)
        phases[start[0]].optimizer.load_state_dict(resume['optimizer'])
        loader.load_state_dict(resume['loader'])
        set_rng_state(resume['rng'])
        run.start_metrics(keep_upto=start)
        LOG.info(f'resumed from {run.ckpt_path}: {phases[start[0]].name} epoch {start[1]} done')
    return checkpointer, start


def finish_run(run, checkpointer, args):
    """train_phases' end: complete.json (saying how each phase ran, over every
    epoch, resumed ones too) and the final line."""
    step_paths = step_paths_of(run.read_metrics()) if WORLD.main else {}
    run.mark_complete({'epochs': args.epochs, 'best': checkpointer.best, 'step_paths': step_paths})
    LOG.info('done: ' + ', '.join(
        f"{'' if key == 'net' else key + ' '}best test top-1 {best['top1']:.2f} (epoch {best['epoch']})"
        for key, best in checkpointer.best.items()) + f'; weights in {run.dir}')
