"""Shared pieces of the training scripts: flags, seeding, the learning-rate
schedule, device-side metrics, checkpoints, the run directory and its logs,
the epoch loop and evaluation."""
import argparse
import csv
import functools
import importlib
import json
import logging
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from kd_losses.registry import AllReduceSum


# ----------------------------------------------------------------------------- errors

class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, ...): reported as a
    one-line message and a non-zero exit, never as a traceback."""


def cli(main):
    """Wrap a script's main so that a UserError ends the run with its message
    (also recorded in log.txt when the run has one) and exit code 2."""
    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as e:
            for h in LOG.handlers:
                if isinstance(h, logging.FileHandler):
                    h.emit(logging.makeLogRecord({'msg': f'error: {e}', 'levelno': logging.ERROR}))
            if WORLD.main:
                print(f'error: {e}', file=sys.stderr)
            raise SystemExit(2)
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
                WORLD.rank, WORLD.size = 0, 1
    return wrapper


# ----------------------------------------------------------------------------- flags

def positive(kind):
    """argparse type: a number > 0."""
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f'must be > 0, got {text}')
        return value
    parse.__name__ = f'positive {kind.__name__}'
    return parse


def non_negative(kind):
    def parse(text):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f'must be >= 0, got {text}')
        return value
    parse.__name__ = f'non-negative {kind.__name__}'
    return parse


def add_common_args(parser):
    """Flags every training script shares (names as in the original zoo)."""
    from dataset import DATASETS
    g = parser.add_argument_group('paths and run')
    g.add_argument('--save_root', default='./results', help='runs are written to SAVE_ROOT/NOTE/')
    g.add_argument('--img_root', default='./datasets',
                   help='folder holding cifar-10-batches-py/ or cifar-100-python/')
    g.add_argument('--note', default='try', help='name of this run (its folder under --save_root)')
    g.add_argument('--data_name', required=True, choices=sorted(DATASETS))
    g.add_argument('--num_class', type=positive(int), default=None,
                   help='number of classes (follows from --data_name when omitted)')
    g.add_argument('--no_download', action='store_true',
                   help='never download a missing dataset; stop with a message instead')
    g.add_argument('--resume', action='store_true',
                   help="continue the run in SAVE_ROOT/NOTE/ from its last checkpoint")
    g.add_argument('--overwrite', action='store_true',
                   help='start afresh over an existing run directory, deleting its files')
    g = parser.add_argument_group('schedule')
    g.add_argument('--epochs', type=positive(int), default=200)
    g.add_argument('--batch_size', type=positive(int), default=128)
    g.add_argument('--lr', type=positive(float), default=0.1,
                   help='initial learning rate; x0.1 at 50%% and 75%% of --epochs')
    g.add_argument('--momentum', type=non_negative(float), default=0.9)
    g.add_argument('--weight_decay', type=non_negative(float), default=1e-4)
    g = parser.add_argument_group('speed (the fast path is on by default with CUDA)')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='bf16 autocast for forward passes; losses stay float32 (default: on with CUDA)')
    g.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=None,
                   help='channels-last memory layout for images and networks (default: on with CUDA)')
    g = parser.add_argument_group('device and logging')
    g.add_argument('--device', default=None, help='cuda, cuda:N or cpu (default: cuda when available)')
    g.add_argument('--cuda', type=int, choices=(0, 1), default=None,
                   help="the original zoo's switch, kept for its scripts: 1 = --device cuda, 0 = cpu")
    g.add_argument('--seed', type=int, default=2)
    g.add_argument('--deterministic', action='store_true',
                   help='deterministic algorithms where torch has them (slower; identical reruns)')
    g.add_argument('--print_freq', type=positive(int), default=50,
                   help='log running training averages every N steps')
    g.add_argument('--eval_batch_size', type=positive(int), default=1000)
    g.add_argument('--no_progress', action='store_true',
                   help='no progress bars, even on a terminal')
    g.add_argument('--sync_bn', action=argparse.BooleanOptionalAction, default=True,
                   help='under torchrun, BatchNorm statistics over the global batch (as one '
                        'process would train); --no-sync_bn keeps them per process (faster)')
    g.add_argument('--tensorboard', action='store_true',
                   help='also write TensorBoard scalars to SAVE_ROOT/NOTE/tensorboard/ '
                        '(needs the tensorboard package)')
    return parser


def finalize_common_args(parser, args):
    """Derive and check what argparse cannot: class count and device."""
    from dataset import DATASETS
    expected = DATASETS[args.data_name].num_class
    if args.num_class is None:
        args.num_class = expected
    elif args.num_class != expected:
        parser.error(f'--num_class {args.num_class} contradicts --data_name {args.data_name} '
                     f'({expected} classes)')
    if args.device is None and args.cuda is not None:
        args.device = 'cuda' if args.cuda else 'cpu'
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f'--device {args.device!r} is not a device name (cpu, cuda, cuda:N)')
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            parser.error(f'--device {args.device}: CUDA is not available on this machine')
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f'--device {args.device}: only {torch.cuda.device_count()} GPU(s) visible')
    elif device.type != 'cpu':
        parser.error(f'--device {args.device}: only cpu and cuda are supported')
    if args.resume and args.overwrite:
        parser.error('--resume and --overwrite exclude each other')
    on_cuda = device.type == 'cuda'
    args.amp = on_cuda if args.amp is None else args.amp
    args.channels_last = on_cuda if args.channels_last is None else args.channels_last
    return args


def autocast(args):
    """The forward passes' precision: bf16 autocast with --amp, else float32."""
    return torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=args.amp)


def memory_layout(module, args):
    """Channels-last weights with --channels_last (convolutions run faster on GPUs)."""
    return module.to(memory_format=torch.channels_last) if args.channels_last else module


# ----------------------------------------------------------------------------- several processes (torchrun)

class World:
    """This process's place in a torchrun job: rank 0 of 1 without one."""
    rank, size = 0, 1

    @property
    def main(self):
        return self.rank == 0


WORLD = World()


def init_distributed(args):
    """Join the torchrun job, if there is one (WORLD_SIZE > 1): one process per
    GPU with NCCL, or CPU processes with gloo. Every rank draws the same data
    order; gradients, BatchNorm statistics and metrics are reduced across ranks."""
    size = int(os.environ.get('WORLD_SIZE', '1'))
    if size <= 1 or dist.is_initialized():
        return
    if torch.device(args.device).type == 'cuda':
        local = int(os.environ.get('LOCAL_RANK', '0'))
        torch.cuda.set_device(local)
        args.device = f'cuda:{local}'
    dist.init_process_group('nccl' if args.device.startswith('cuda') else 'gloo')
    WORLD.rank, WORLD.size = dist.get_rank(), dist.get_world_size()


def all_reduce_sum(t):
    """The sum of `t` over all processes (a copy; `t` itself when alone)."""
    if WORLD.size == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics cover the global batch of every
    process, so N processes train as one would (nn.SyncBatchNorm does this
    on GPUs only; this one runs under gloo on CPU too). Mean, then variance,
    each summed across processes by a differentiable all-reduce."""

    def forward(self, x):
        if not (self.training and WORLD.size > 1):
            return super().forward(x)
        dims = (0, 2, 3)
        n = x.shape[0] * x.shape[2] * x.shape[3] * WORLD.size  # equal slices on every rank
        xf = x.float()
        mean = AllReduceSum.apply(xf.sum(dims)) / n
        centred = xf - mean[None, :, None, None]
        var = AllReduceSum.apply((centred * centred).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(var * (n / max(n - 1, 1)), alpha=m)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def sync_batchnorm(module, args):
    """Under torchrun with --sync_bn, swap every BatchNorm2d of `module` for
    GlobalBatchNorm2d (same parameters and buffers, same state-dict keys)."""
    if WORLD.size == 1 or not args.sync_bn:
        return module
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new.to(child.weight.device if child.affine else args.device))
        else:
            sync_batchnorm(child, args)
    return module


def _average_gradients(optimizer, *_):
    """Optimizer pre-step hook: average the gradients over processes, in one
    all-reduce. What DistributedDataParallel does, but it also works where the
    student runs twice (BSS) or inputs are differentiated (Sobolev, LwM)."""
    grads = [p.grad for g in optimizer.param_groups for p in g['params'] if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= WORLD.size
    for g, avg in zip(grads, torch.split(flat, [g.numel() for g in grads])):
        g.copy_(avg.view_as(g))


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


# ----------------------------------------------------------------------------- schedule

def lr_at(epoch, epochs, base_lr):
    """The seed's step schedule (epochs 1-100 lr, 101-150 lr/10, 151-200 lr/100),
    milestones scaled to `epochs` (rounded up, so a one-epoch run keeps lr).
    `epoch` counts from 1."""
    first, second = math.ceil(epochs * 0.5), math.ceil(epochs * 0.75)
    return base_lr * (1.0 if epoch <= first else 0.1 if epoch <= second else 0.01)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group['lr'] = lr
    return lr


def make_sgd(params, args, lr=None):
    """The shared optimiser: SGD, Nesterov momentum, weight decay; under
    torchrun it first averages the gradients over processes."""
    # parameter groups with their tensors listed (generators would be used up here)
    groups = [dict(g, params=list(g['params'])) if isinstance(g, dict) else g for g in params]
    tensors = [p for g in groups for p in (g['params'] if isinstance(g, dict) else [g])]
    fused = bool(tensors) and all(p.is_cuda for p in tensors)  # one kernel for the whole update
    optimizer = torch.optim.SGD(groups, lr=args.lr if lr is None else lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, nesterov=args.momentum > 0,
                                fused=fused or None)
    if WORLD.size > 1:
        optimizer.register_step_pre_hook(_average_gradients)
    return optimizer


# ----------------------------------------------------------------------------- metrics

class AverageMeter:
    """Running average of host values."""

    def __init__(self):
        self.sum, self.count = 0.0, 0

    def update(self, value, n=1):
        self.sum += value * n
        self.count += n

    @property
    def avg(self):
        return self.sum / max(self.count, 1)


def topk_correct(logits, target, ks=(1, 5)):
    """Number of samples whose target is among the top-k logits, per k, as a device tensor."""
    maxk = min(max(ks), logits.shape[1])
    hit = logits.topk(maxk, dim=1).indices == target[:, None]
    cum = hit.cumsum(dim=1).sum(dim=0)  # correct within top-1, top-2, ...
    return torch.stack([cum[min(k, maxk) - 1] for k in ks]).float()


def accuracy(logits, target, topk=(1,)):
    """Top-k accuracy in percent (the seed's helper), as device tensors."""
    return list(topk_correct(logits, target, topk) * (100.0 / target.shape[0]))


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

    def add(self, sums):
        self.step += 1
        newly_bad = (self.first_bad < 0) & ~torch.isfinite(sums[:self.n_losses])
        torch.where(newly_bad, self.step, self.first_bad, out=self.first_bad)
        self.total.add_(sums)

    def values(self):
        """Host dict of averages (losses per sample, accuracies in percent) over
        every process; syncs."""
        total = all_reduce_sum(self.total).tolist()
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
        first_bad = self.first_bad
        if WORLD.size > 1:  # earliest over processes: -1 (never) counts as last
            never = torch.iinfo(torch.long).max
            first_bad = torch.where(first_bad < 0, torch.full_like(first_bad, never), first_bad)
            dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
            first_bad = torch.where(first_bad == never, torch.full_like(first_bad, -1), first_bad)
        bad = [(s, name) for s, name in zip(first_bad.tolist(), self.names) if s >= 0]
        return None if not bad else min(bad)[::-1]


def cross_entropy_stats(logits, target, *losses):
    """[loss * B for each loss, correct@1, correct@5, B]: a step's sums for
    EpochStats, built on the device (no host sync)."""
    b = target.shape[0]
    sums = [(loss.detach().float() * b).reshape(1) for loss in losses]
    return torch.cat(sums + [topk_correct(logits.detach(), target), logits.new_full((1,), b).float()])


@torch.no_grad()
def evaluate(net, loader, progress=False, desc='test', amp=False):
    """Test loss, top-1 and top-5 of `net` over `loader` (one sync at the end)."""
    was_training = net.training
    net.eval()
    total = torch.zeros(4, dtype=torch.float64, device=loader.device)
    batches = loader
    if progress:
        from tqdm import tqdm
        batches = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, file=sys.stdout)
    for batch in batches:
        with torch.autocast(loader.device.type, dtype=torch.bfloat16, enabled=amp):
            out = net(batch.img).out.float()
        loss = F.cross_entropy(out, batch.target, reduction='sum')
        total += torch.cat([loss.reshape(1), topk_correct(out, batch.target),
                            out.new_full((1,), batch.target.shape[0])])
    net.train(was_training)
    loss, c1, c5, n = all_reduce_sum(total).tolist()
    n = max(n, 1)
    return {'loss': loss / n, 'top1': 100.0 * c1 / n, 'top5': 100.0 * c5 / n}


# ----------------------------------------------------------------------------- checkpoints

ZOO_PREFIXES = ('module.', '_orig_mod.')


def zoo_state_dict(net):
    """State dict in the original zoo's layout: keys prefixed 'module.' as
    DataParallel saved them, so the seed's scripts load ours too."""
    net = getattr(net, 'module', net)
    net = getattr(net, '_orig_mod', net)
    return {'module.' + k: v.detach().clone() for k, v in net.state_dict().items()}


def strip_prefixes(state_dict):
    out = {}
    for k, v in state_dict.items():
        while k.startswith(ZOO_PREFIXES):
            k = k.split('.', 1)[1]
        out[k] = v
    return out


def save_checkpoint(state, path):
    """Write atomically: a temporary file in the same folder, flushed to disk,
    then renamed over `path`, so a crash leaves the previous file intact.
    Under torchrun only rank 0 writes."""
    if not WORLD.main:
        return
    tmp = f'{path}.tmp'
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, what='checkpoint'):
    """Load a checkpoint with weights_only=True; any failure is a UserError naming the file."""
    if not os.path.isfile(path):
        raise UserError(f'{what} {path} does not exist')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f'{what} {path} cannot be loaded: it is truncated, corrupted or not a '
                        f'PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})')
    if not isinstance(ckpt, dict):
        raise UserError(f'{what} {path} holds a {type(ckpt).__name__}, not a checkpoint dict')
    return ckpt


NET_KEYS = ('net', 'snet', 'state_dict', 'model')


def network_state(ckpt, path, keys=NET_KEYS):
    """The network state dict inside a checkpoint: under 'net' (ours and the
    seed's baselines), 'snet' (the seed's KD runs) or the dict itself."""
    for key in keys:
        if isinstance(ckpt.get(key), dict):
            return strip_prefixes(ckpt[key])
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return strip_prefixes(ckpt)
    raise UserError(f'{path} holds no network weights (looked for keys {", ".join(keys)}; '
                    f'found {", ".join(map(str, ckpt)) or "nothing"})')


def load_network_weights(net, path, what='checkpoint', keys=NET_KEYS):
    """Load a zoo-format or project checkpoint into `net`, strictly; a file for
    another architecture or class count is a UserError saying what differs."""
    state = network_state(load_checkpoint(path, what), path, keys)
    describe_mismatch(net, state, path, what)
    net.load_state_dict(state)
    return net


def describe_file_network(state):
    """Best guess of (depth, num_class) of a CIFAR ResNet state dict."""
    blocks = {k.split('.')[1] for k in state if k.startswith('res1.')}
    fc = state.get('fc.weight')
    depth = 6 * len(blocks) + 2 if blocks else None
    return depth, (fc.shape[0] if isinstance(fc, torch.Tensor) and fc.dim() == 2 else None)


def describe_mismatch(net, state, path, what):
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or wrong):
        return
    depth, classes = describe_file_network(state)
    held = (f'resnet{depth}' if depth else 'an unknown network') + \
        (f' with {classes} classes' if classes else '')
    expected = f'{getattr(net, "name", type(net).__name__)} with {getattr(net, "num_class", "?")} classes'
    detail = (f'missing {missing[:3]}' if missing else f'unexpected {unexpected[:3]}' if unexpected
              else f'shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, expected '
                   f'{tuple(own[wrong[0]].shape)}')
    raise UserError(f'{what} {path} does not match: expected {expected}, the file holds '
                    f'{held} ({detail})')


def initial_weights_name(net_name):
    """The seed's file name for a baseline's initial weights: initial_r20.pth.tar, ..."""
    return f"initial_r{net_name.replace('resnet', '')}.pth.tar"


def zoo_record(net, epoch, top1=0.0, top5=0.0):
    """A checkpoint the original zoo's scripts can read."""
    return {'epoch': epoch, 'net': zoo_state_dict(net), 'prec@1': top1, 'prec@5': top5}


class Checkpointer:
    """Saves after each epoch, in an order that makes a kill at any point
    resumable without a lost or duplicated metrics row: the metrics row, then
    the best-model file of each network whose test top-1 improved, then
    checkpoint.pth.tar with every network and what `resume_state(stage_index)`
    adds (optimiser, loader, RNG, method state).

    `nets` maps checkpoint keys to networks: {'net': net} for one network
    (metrics test_top1, file model_best.pth.tar), or e.g. {'net1': a, 'net2': b}
    (metrics test_net1_top1, files model_best_net1.pth.tar, ...)."""

    def __init__(self, run, nets, resume_state):
        self.run, self.nets, self.resume_state = run, nets, resume_state
        self.best = {k: {'top1': -1.0, 'top5': 0.0, 'epoch': 0} for k in nets}
        self.main_epoch = 0

    def _metric(self, key, row, name):
        return row.get(f'test_{name}' if key == 'net' else f'test_{key}_{name}')

    def best_path(self, key):
        name = 'model_best.pth.tar' if key == 'net' else f'model_best_{key}.pth.tar'
        return os.path.join(self.run.dir, name)

    def __call__(self, stage_index, epoch, row):
        self.run.append_metrics(row)
        for key, net in self.nets.items():
            top1, top5 = self._metric(key, row, 'top1'), self._metric(key, row, 'top5')
            if top1 is None:  # a stage without evaluation (pre-training)
                continue
            self.main_epoch = epoch
            if top1 > self.best[key]['top1']:
                self.best[key] = {'top1': top1, 'top5': top5, 'epoch': epoch}
                save_checkpoint(zoo_record(net, epoch, top1, top5), self.best_path(key))
        if not WORLD.main:  # rank 0 alone writes
            return
        first = next(iter(self.nets))
        state = {'epoch': self.main_epoch, 'prec@1': self._metric(first, row, 'top1') or 0.0,
                 'prec@5': self._metric(first, row, 'top5') or 0.0,
                 **{key: zoo_state_dict(net) for key, net in self.nets.items()},
                 'stage_index': stage_index, 'stage_epoch': epoch, 'best': self.best,
                 **self.resume_state(stage_index)}
        save_checkpoint(state, self.run.ckpt_path)

    def restore(self, state):
        """Networks and best-so-far from a resume checkpoint; returns
        (stage index, epochs done in it)."""
        for key, net in self.nets.items():
            net.load_state_dict(strip_prefixes(state[key]))
        self.best, self.main_epoch = {k: dict(v) for k, v in state['best'].items()}, state['epoch']
        return state['stage_index'], state['stage_epoch']


# ----------------------------------------------------------------------------- run directory and logs

class _Buffer(logging.Handler):
    """Keeps records until the run directory exists, so log.txt starts at the first line."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _make_logger():
    log = logging.getLogger('kdzoo')
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


LOG = _make_logger()


def reset_logger():
    """Log to stdout, buffering lines for log.txt until `Run.open` (only rank 0 logs)."""
    for h in list(LOG.handlers):
        LOG.removeHandler(h)
        h.close()
    if not WORLD.main:
        LOG.addHandler(logging.NullHandler())
        return LOG
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter('%(message)s'))
    LOG.addHandler(out)
    LOG.addHandler(_Buffer())
    return LOG


RUN_FILES = ('checkpoint.pth.tar', 'model_best.pth.tar', 'log.txt', 'metrics.csv', 'args.json')


class Run:
    """The run directory `<save_root>/<note>/` and what is written to it:
    log.txt (human-readable), metrics.csv (one row per epoch), args.json and
    the checkpoints. Constructing it only checks (nothing is written): a new
    run refuses an existing run directory unless --overwrite; --resume needs
    a checkpoint there. `open()` creates the directory and starts log.txt."""

    def __init__(self, args, columns, script, argv=()):
        self.args, self.columns, self.script, self.argv = args, list(columns), script, list(argv)
        self.dir = os.path.join(args.save_root, args.note)
        self.ckpt_path = os.path.join(self.dir, 'checkpoint.pth.tar')
        self.best_path = os.path.join(self.dir, 'model_best.pth.tar')
        self.metrics_path = os.path.join(self.dir, 'metrics.csv')
        self.existing = sorted(f for f in os.listdir(self.dir)
                               if f in RUN_FILES or f.startswith('initial_')) \
            if os.path.isdir(self.dir) else []
        if args.resume and not os.path.isfile(self.ckpt_path):
            raise UserError(f'--resume: no checkpoint to resume from in {self.dir}')
        if not args.resume and self.existing and not args.overwrite:
            raise UserError(f'{self.dir} already holds a run ({", ".join(self.existing)}); '
                            f'pass --resume to continue it or --overwrite to start over')

    def open(self):
        self.tensorboard = None
        if not WORLD.main:  # rank 0 writes the run directory
            return self
        if self.args.overwrite:
            for f in self.existing:
                os.remove(os.path.join(self.dir, f))
        os.makedirs(self.dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(self.dir, 'log.txt'))
        fh.setFormatter(logging.Formatter('%(message)s'))
        for h in list(LOG.handlers):
            if isinstance(h, _Buffer):
                for record in h.records:
                    fh.emit(record)
                LOG.removeHandler(h)
        LOG.addHandler(fh)
        if self.args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(self.dir, 'tensorboard'))
        return self

    def start(self, checkpointer, resume, loader, optimizer_of, device):
        """Open the run directory, then start afresh or restore from the resume
        checkpoint: networks, best-so-far, the optimiser of the stage being
        resumed (`optimizer_of(stage_index)`), the loader's and the global RNG
        states. Returns (stage index, epochs done in it)."""
        self.open()
        self.write_args(describe_device(device))
        if resume is None:
            self.start_metrics()
            return (0, 0)
        start = checkpointer.restore(resume)
        optimizer_of(start[0]).load_state_dict(resume['optimizer'])
        loader.load_state_dict(resume['loader'])
        set_rng_state(resume['rng'])
        self.start_metrics(keep_upto=start)
        LOG.info(f'resumed from {self.ckpt_path}: stage {start[0] + 1}, epoch {start[1]} done')
        return start

    # -- records
    def write_args(self, device_name):
        if not WORLD.main:
            return
        command = ' '.join(shlex.quote(a) for a in ['python', self.script] + self.argv)
        record = {'script': self.script, 'command': command,
                  'args': vars(self.args), 'device': device_name,
                  'processes': WORLD.size,
                 'versions': {'python': platform.python_version(), 'torch': torch.__version__,
                               'numpy': np.__version__, **_optional_versions()},
                  'git_commit': _git_commit(), 'started': time.strftime('%Y-%m-%d %H:%M:%S')}
        name = 'args.resume.json' if self.args.resume else 'args.json'
        with open(os.path.join(self.dir, name), 'w') as f:
            json.dump(record, f, indent=2, default=str)

    def saved_args(self):
        path = os.path.join(self.dir, 'args.json')
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            return json.load(f).get('args', {})

    def check_resume_args(self, ignore=('resume', 'overwrite', 'device', 'cuda', 'print_freq',
                                        'no_progress', 'eval_batch_size', 'img_root',
                                        'no_download', 'save_root', 'note')):
        """Refuse to resume with flags that would change the result."""
        saved, now = self.saved_args(), vars(self.args)
        diff = [k for k in now if k in saved and k not in ignore and saved[k] != now[k]]
        if diff:
            raise UserError('--resume with flags that differ from the run being resumed: ' +
                            ', '.join(f'--{k} {now[k]} (was {saved[k]})' for k in diff))

    def start_metrics(self, keep_upto=None):
        """Create metrics.csv; on resume keep the rows up to `keep_upto`
        ((stage index, epoch) of the checkpoint), so no row is duplicated."""
        if not WORLD.main:
            return
        rows = []
        if keep_upto is not None and os.path.isfile(self.metrics_path):
            with open(self.metrics_path, newline='') as f:
                rows = [r for r in csv.DictReader(f)
                        if (int(r['stage_index']), int(r['epoch'])) <= tuple(keep_upto)]
        with open(self.metrics_path, 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction='ignore')
            w.writeheader()
            w.writerows(rows)

    def append_metrics(self, row):
        if not WORLD.main:
            return
        with open(self.metrics_path, 'a', newline='') as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction='ignore').writerow(
                {k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in row.items()})
        if self.tensorboard is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ('epoch', 'stage_index'):
                    self.tensorboard.add_scalar(f"{row['stage']}/{k}", v, row['epoch'])
            self.tensorboard.flush()


def _optional_versions():
    out = {}
    for name in ('torchvision', 'tqdm'):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            pass
    return out


def _git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(['git', '-C', here, 'rev-parse', 'HEAD'], capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except Exception:
        return None


def describe_device(device):
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)'


RESUME_KEYS = ('epoch', 'stage_index', 'stage_epoch', 'best', 'optimizer', 'loader', 'rng')


def begin(args, columns, script, argv=None):
    """Start-up shared by the scripts. Only checks, nothing written: the run
    directory (and the resume checkpoint with its flags); then the backend
    and seeds. Returns (run, resume checkpoint or None, device)."""
    init_distributed(args)
    reset_logger()
    if args.tensorboard:
        try:
            importlib.import_module('torch.utils.tensorboard')
        except ImportError:
            raise UserError('--tensorboard needs the tensorboard package (pip install tensorboard); '
                            'metrics.csv holds the same values') from None
    run = Run(args, columns, script, sys.argv[1:] if argv is None else argv)
    resume = load_checkpoint(run.ckpt_path, 'resume checkpoint') if args.resume else None
    if resume is not None:
        missing = [k for k in RESUME_KEYS if k not in resume]
        if missing:
            raise UserError(f'resume checkpoint {run.ckpt_path} lacks {", ".join(missing)}: it was '
                            f'not written by {script} (a weights-only file cannot be resumed)')
        run.check_resume_args()
    configure_backend(args)
    seed_everything(args.seed)
    return run, resume, torch.device(args.device)


# ----------------------------------------------------------------------------- the epoch loop

class NonFiniteLoss(UserError):
    pass


@dataclass
class Stage:
    """One stretch of training with its own optimiser and schedule: the main
    schedule, or a method's pre-training stage (AB/FSP initialisation, FT's
    paraphraser). `step(batch)` trains on one batch and returns the vector of
    sums named by `stat_names` (see EpochStats); `evaluate()` returns the
    test metrics logged after each epoch (None: no evaluation);
    `begin_epoch(epoch)` prepares an epoch and may return fields for its row."""
    name: str
    epochs: int
    lr: Callable[[int], float]
    optimizer: torch.optim.Optimizer
    step: Callable
    stat_names: Sequence[str]
    loss_names: Sequence[str]
    evaluate: Optional[Callable[[], dict]] = None
    begin_epoch: Optional[Callable[[int], Optional[dict]]] = None


def fit(stages, loader, args, save, start=(0, 0)):
    """Run `stages` in order from `start` = (stage index, epochs done in it).

    After each epoch: one log line, one metrics row, and
    `save(stage_index, epoch, row)` writes the checkpoint. Returns the last row."""
    row = None
    for si in range(start[0], len(stages)):
        stage = stages[si]
        first = start[1] + 1 if si == start[0] else 1
        if first == 1 and len(stages) > 1:
            LOG.info(f'--- stage {si + 1}/{len(stages)}: {stage.name} ({stage.epochs} epochs)')
        for epoch in range(first, stage.epochs + 1):
            lr = set_lr(stage.optimizer, stage.lr(epoch))
            extra = stage.begin_epoch(epoch) if stage.begin_epoch is not None else None
            header = f'[{stage.name}] epoch {epoch}/{stage.epochs}'
            stats = EpochStats(stage.stat_names, stage.loss_names, loader.device)
            start_time = time.time()
            train = train_epoch(stage.step, loader, stats, header, args.print_freq,
                                show_progress(args))
            test = stage.evaluate() if stage.evaluate is not None else {}
            row = {'stage': stage.name, 'stage_index': si, 'epoch': epoch, 'lr': lr, **(extra or {}),
                   **{f'train_{k}': v for k, v in train.items() if k not in ('n', 'seconds', 'img_per_s')},
                   **{f'test_{k}': v for k, v in test.items()},
                   'seconds': time.time() - start_time, 'img_per_s': train['img_per_s']}
            LOG.info(format_row(header, row))
            save(si, epoch, row)
    return row


def format_row(header, row):
    train = ' '.join(f"{k[6:]} {v:.4f}" if 'top' not in k else f"{k[6:]} {v:.2f}"
                     for k, v in row.items() if k.startswith('train_'))
    test = ' '.join(f"{k[5:]} {v:.4f}" if 'top' not in k else f"{k[5:]} {v:.2f}"
                    for k, v in row.items() if k.startswith('test_'))
    text = f"{header} | lr {row['lr']:.4g}"
    if 'kd_weight' in row:
        text += f" | kd weight {row['kd_weight']:.4g}"
    text += f' | train {train}'
    if test:
        text += f' | test {test}'
    return text + f" | {row['seconds']:.1f}s ({row['img_per_s']:.0f} img/s)"


def train_epoch(step, loader, stats, header, print_freq, progress):
    """Run `step(batch)` over an epoch, accumulating on the device. The host
    syncs only every `print_freq` steps and at the end; a non-finite loss
    stops the run there."""
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(loader), desc=header, leave=False, dynamic_ncols=True, file=sys.stdout)
    start = time.time()
    for i, batch in enumerate(loader, start=1):
        stats.add(step(batch))
        if bar is not None:
            bar.update(1)
        if i % print_freq == 0 or i == len(loader):
            check_finite(stats, header)
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


def check_finite(stats, header):
    bad = stats.non_finite()
    if bad is not None:
        term, step = bad
        raise NonFiniteLoss(f'{header}: the {term} loss became non-finite at step {step}; '
                            f'the run stops and the last checkpoint (previous epoch) is kept')


def show_progress(args):
    return sys.stdout.isatty() and not args.no_progress and WORLD.main


# ----------------------------------------------------------------------------- results summary

SEED_ORDER = ['logits', 'st', 'at', 'fitnet', 'nst', 'pkt', 'fsp', 'ft', 'rkd', 'ab', 'sp',
              'sobolev', 'bss', 'cc', 'lwm', 'irg', 'vid', 'ofd', 'afd', 'crd']
DISPLAY = {'logits': 'Logits', 'fitnet': 'Fitnet', 'sobolev': 'Sobolev', 'lwm': 'LwM'}
DATA_COLUMNS = {'cifar10': 'CIFAR10', 'cifar100': 'CIFAR100'}
# Flags that do not change a result: runs differing only in these (and the
# seed) are replicates of one experiment.
NOT_RESULT_FLAGS = {'seed', 'note', 'save_root', 'img_root', 'device', 'resume', 'overwrite',
                    'print_freq', 'no_progress', 'eval_batch_size', 'no_download', 's_init',
                    't_model', 'net1_init', 'net2_init', 'deterministic', 'tensorboard', 'cuda'}
REPORTING_RULE = ('Top-1 test accuracy (%) as "best / last": the best epoch and the last epoch of '
                  'the main schedule. Where several seeds of the same run exist: mean ± sample '
                  'standard deviation over them, with n. * marks runs not finished yet.')


def read_run(run_dir):
    """A finished or running run directory -> dict, or None if it is not a run."""
    try:
        with open(os.path.join(run_dir, 'args.json')) as f:
            record = json.load(f)
        with open(os.path.join(run_dir, 'metrics.csv'), newline='') as f:
            rows = [r for r in csv.DictReader(f) if r['stage'] == 'main']
    except (OSError, ValueError, KeyError):
        return None
    args = record.get('args', {})
    script = record.get('script', '')
    keys = ['net1', 'net2'] if script == 'train_dml.py' else ['net']
    scores = {}
    for key in keys:
        col = 'test_top1' if key == 'net' else f'test_{key}_top1'
        values = [float(r[col]) for r in rows if r.get(col) not in (None, '')]
        if values:
            scores[key] = {'best': max(values), 'last': values[-1]}
    return {'dir': run_dir, 'script': script, 'args': args, 'scores': scores,
            'epochs_done': len(rows), 'complete': len(rows) >= int(args.get('epochs', 0) or 0) > 0,
            'rows': rows}


def collect_runs(root):
    runs = []
    for dirpath, _, files in os.walk(root):
        if 'args.json' in files and 'metrics.csv' in files:
            run = read_run(dirpath)
            if run is not None and run['scores']:
                runs.append(run)
    return sorted(runs, key=lambda r: r['dir'])


def mean_std(values):
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def group_runs(runs):
    """Replicates (runs equal but for the seed and paths) -> one entry each."""
    groups = {}
    for run in runs:
        key = (run['script'], json.dumps({k: v for k, v in sorted(run['args'].items())
                                          if k not in NOT_RESULT_FLAGS}, default=str))
        groups.setdefault(key, []).append(run)
    out = []
    for (script, _), members in groups.items():
        a = members[0]['args']
        g = {'script': script, 'args': a, 'runs': members, 'data': a.get('data_name'),
             'complete': all(r['complete'] for r in members)}
        for key in members[0]['scores']:
            vals = [r['scores'][key] for r in members if key in r['scores']]
            g[key] = {'n': len(vals), 'best': mean_std([v['best'] for v in vals]),
                      'last': mean_std([v['last'] for v in vals])}
        if script == 'train_base.py':
            g.update(teacher='-', student=a.get('net_name'), name='Baseline', mode='')
        elif script == 'train_kd.py':
            g.update(teacher=a.get('t_name'), student=a.get('s_name'), mode=a.get('kd_mode'),
                     name=DISPLAY.get(a.get('kd_mode'), str(a.get('kd_mode')).upper()))
        else:
            g.update(teacher=a.get('net1_name'), student=a.get('net2_name'), name='DML', mode='dml')
        out.append(g)
    # Same method and networks but other settings: say what differs in the name.
    by_label = {}
    for g in out:
        by_label.setdefault((g['script'], g['teacher'], g['student'], g['name'], g['data']), []).append(g)
    for same in by_label.values():
        if len(same) > 1:
            differing = [k for k in same[0]['args'] if k not in NOT_RESULT_FLAGS
                         and len({json.dumps(g['args'].get(k), default=str) for g in same}) > 1]
            for g in same:
                g['name'] += ' (' + ', '.join(f'{k}={g["args"].get(k)}' for k in differing) + ')'
    return out


def format_score(entry, complete):
    (bm, bs), (lm, ls), n = entry['best'], entry['last'], entry['n']
    text = f'{bm:.2f} ± {bs:.2f} / {lm:.2f} ± {ls:.2f} (n={n})' if n > 1 else f'{bm:.2f} / {lm:.2f}'
    return text + ('' if complete else ' *')


def summary_tables(groups):
    """Markdown tables as the seed's README has them, and CSV rows of the same data."""
    datasets = [d for d in DATA_COLUMNS if any(g['data'] == d for g in groups)]
    order = {m: i for i, m in enumerate(SEED_ORDER)}
    single = [g for g in groups if g['script'] != 'train_dml.py']
    dml = [g for g in groups if g['script'] == 'train_dml.py']
    baselines = [g for g in single if g['script'] == 'train_base.py']
    pairs = sorted({(g['teacher'], g['student']) for g in single if g['script'] == 'train_kd.py'},
                   key=lambda p: (int(p[0][6:]), int(p[1][6:])) if all(x.startswith('resnet') for x in p) else p)
    tables, csv_rows = [], []

    def table(header, rows):
        lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])

    def line(label_cols, matching, key='net'):
        cells = []
        for d in datasets:
            found = [g for g in matching if g['data'] == d]
            cells.append(format_score(found[0][key], found[0]['complete']) if found else '')
            for g in found:
                csv_rows.append({'kind': g['name'].split(' ')[0], 'teacher': g['teacher'],
                                 'student': g['student'], 'name': g['name'], 'dataset': d, 'net': key,
                                 'n': g[key]['n'], 'best_mean': g[key]['best'][0],
                                 'best_std': g[key]['best'][1], 'last_mean': g[key]['last'][0],
                                 'last_std': g[key]['last'][1], 'complete': g['complete'],
                                 'runs': ' '.join(r['dir'] for r in g['runs'])})
        return label_cols + cells

    def label_groups(candidates):
        names = sorted({g['name'] for g in candidates},
                       key=lambda n: (order.get(next(g['mode'] for g in candidates if g['name'] == n), 99), n))
        return [(n, [g for g in candidates if g['name'] == n]) for n in names]

    if not pairs and baselines:  # baselines only: one table of them
        rows = [line(['-', net, name], gs) for net in sorted({g['student'] for g in baselines})
                for name, gs in label_groups([g for g in baselines if g['student'] == net])]
        tables.append(table(['Teacher', 'Student', 'Name'] + [DATA_COLUMNS[d] for d in datasets], rows))
    for t, s in pairs:
        rows = []
        for net in sorted({s, t}, key=lambda n: (n != s, n)):  # the student's baseline first
            for name, gs in label_groups([g for g in baselines if g['student'] == net]):
                rows.append(line(['-', net, name], gs))
        kd = [g for g in single if g['script'] == 'train_kd.py' and (g['teacher'], g['student']) == (t, s)]
        for name, gs in label_groups(kd):
            rows.append(line([t, s, name], gs))
        tables.append(table(['Teacher', 'Student', 'Name'] + [DATA_COLUMNS[d] for d in datasets], rows))
    if dml:
        rows = []
        for net in sorted({g['teacher'] for g in dml} | {g['student'] for g in dml}):
            for name, gs in label_groups([g for g in baselines if g['student'] == net]):
                rows.append(line(['-', net, name, net], gs))
        for n1, n2 in sorted({(g['teacher'], g['student']) for g in dml}):
            for name, gs in label_groups([g for g in dml if (g['teacher'], g['student']) == (n1, n2)]):
                rows.append(line([n1, n2, name, f'net1 ({n1})'], gs, 'net1'))
                rows.append(line([n1, n2, name, f'net2 ({n2})'], gs, 'net2'))
        tables.append(table(['Net1', 'Net2', 'Name', 'Net'] + [DATA_COLUMNS[d] for d in datasets], rows))
    unique = {tuple(r[k] for k in ('teacher', 'student', 'name', 'dataset', 'net')): r for r in csv_rows}
    return tables, list(unique.values())


def summary_main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python utils.py summary',
        description='Walk a results root and print the comparison tables (Markdown), writing '
                    'the same data as CSV; optionally draw test-accuracy curves.')
    parser.add_argument('root', nargs='?', default='./results')
    parser.add_argument('--csv', default=None, help='CSV path (default: ROOT/summary.csv)')
    parser.add_argument('--plot', default=None, metavar='PNG',
                        help='draw test top-1 per epoch of the runs matching --runs (needs matplotlib)')
    parser.add_argument('--runs', nargs='+', default=['*'], metavar='PATTERN',
                        help='run names (the --note) to plot, shell-style patterns')
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        raise UserError(f'{args.root} is not a directory')
    runs = collect_runs(args.root)
    if not runs:
        raise UserError(f'no runs under {args.root} (a run directory holds args.json and metrics.csv)')
    tables, rows = summary_tables(group_runs(runs))
    print(REPORTING_RULE + '\n')
    print('\n\n'.join(tables))
    path = args.csv or os.path.join(args.root, 'summary.csv')
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ['table'])
        w.writeheader()
        w.writerows(rows)
    print(f'\n{len(runs)} runs; CSV written to {path}')
    if args.plot:
        plot_curves(runs, args.runs, args.plot)


def plot_curves(runs, patterns, path):
    import fnmatch
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError('--plot needs matplotlib (pip install matplotlib); the tables above do not')
    chosen = [r for r in runs if any(fnmatch.fnmatch(os.path.basename(r['dir']), p) for p in patterns)]
    if not chosen:
        raise UserError(f'no run matches {" ".join(patterns)}')
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in chosen:
        name = os.path.basename(r['dir'])
        cols = ['test_top1'] if 'test_top1' in r['rows'][0] else ['test_net1_top1', 'test_net2_top1']
        for col in cols:
            ax.plot([int(x['epoch']) for x in r['rows']], [float(x[col]) for x in r['rows']],
                    label=name if col == 'test_top1' else f'{name} {col[5:9]}')
    ax.set_xlabel('epoch')
    ax.set_ylabel('test top-1 (%)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f'curves of {len(chosen)} runs written to {path}')


if __name__ == '__main__':
    commands = {'summary': summary_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        print(f'usage: python utils.py {{{",".join(commands)}}} ...', file=sys.stderr)
        raise SystemExit(2)
    cli(lambda argv: commands[sys.argv[1]](argv))(sys.argv[2:])
