"""Several processes training as one (torchrun): the process group, sums and
gathers over processes, global-batch BatchNorm (nn.SyncBatchNorm on CUDA,
GlobalBatchNorm2d elsewhere) and gradient averaging.

Every process holds an equal slice of the global batch. The pieces here
make N processes compute what one process would on the whole batch: each
reduction is written once, here. Alone (no torchrun), every function is the
identity and nothing touches torch.distributed.

The process group lives from `init_distributed` to `leave_distributed`
(errors.cli calls it however a script ends). A run that ended well waits
there until every process has, then leaves; a run that failed or was
interrupted leaves at once, and the others, blocked in their next
collective, fail with a CollectiveError: at once when the process died
(its connections close), after KDZOO_DIST_TIMEOUT seconds (default 1800)
when it hangs. Imports only torch (and errors, lazily, for the one-line
message of a bad KDZOO_DIST_TIMEOUT).
"""
import datetime
import importlib
import math
import os
import re

import torch
import torch.distributed as dist
import torch.nn as nn


class World:
    """This process's place in a torchrun job: rank 0 of 1 without one."""
    rank, size = 0, 1

    @property
    def main(self):
        return self.rank == 0


WORLD = World()


TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_S = 'KDZOO_DIST_TIMEOUT', 1800


class CollectiveError(RuntimeError):
    """A collective failed: another process of the job stopped (its connections
    closed) or hung past the timeout. errors.cli reports it in one line."""


def collective_timeout():
    """How long a process waits in a collective for the others before failing:
    KDZOO_DIST_TIMEOUT seconds, 30 minutes by default (torch's). Only a hung
    process is waited for this long, so it is generous: rank 0 saving
    checkpoints, or a step compiling for minutes, keeps the others waiting."""
    text = os.environ.get(TIMEOUT_VARIABLE, '').strip()
    try:
        seconds = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        from errors import UserError  # errors imports this module
        raise UserError(f'{TIMEOUT_VARIABLE}={text!r}: give the seconds a torchrun process waits for '
                        f'the others in a collective, a number above 0 (unset: {DEFAULT_TIMEOUT_S})')
    return datetime.timedelta(seconds=seconds)


def init_distributed(device):
    """Join the torchrun job, if there is one (WORLD_SIZE > 1): one process per
    GPU with NCCL, or CPU processes with gloo. Returns the device this process
    trains on (cuda:LOCAL_RANK under torchrun with CUDA, else `device`)."""
    size = int(os.environ.get('WORLD_SIZE', '1'))
    if size <= 1 or dist.is_initialized():
        return device
    timeout = collective_timeout()
    if torch.device(device).type == 'cuda':
        local = int(os.environ.get('LOCAL_RANK', '0'))
        torch.cuda.set_device(local)
        device = f'cuda:{local}'
    # torch.distributed.nn binds the default group as its functions' default
    # argument when it is imported, and torch imports it lazily (with
    # torch._dynamo, when the first optimiser is made). Imported after the group
    # exists, it would keep the group alive past destroy_process_group, into
    # the interpreter's own teardown, where the group's gloo threads abort the
    # process ("terminate called without an active exception") after a
    # successful run. Imported before, it binds None.
    importlib.import_module('torch.distributed.nn')
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo', timeout=timeout)
    WORLD.rank, WORLD.size = dist.get_rank(), dist.get_world_size()
    return device


def leave_distributed(wait_for_others=False):
    """Leave the process group (at the end of a script, error or not). After a
    run that ended well (`wait_for_others`), first wait until every process
    has ended well too: none tears its connections down while another still
    works, and a process whose peer failed after the last collective fails
    too (CollectiveError) instead of reporting success. After an error or an
    interrupt, leave at once: the others are elsewhere in the run, and their
    next collective fails."""
    try:
        if wait_for_others and dist.is_available() and dist.is_initialized():
            # NCCL's barrier runs on a GPU: this process's own, not one guessed
            cuda = dist.get_backend() == 'nccl'
            _collective('the final wait for every process', dist.barrier,
                        **({'device_ids': [torch.cuda.current_device()]} if cuda else {}))
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        WORLD.rank, WORLD.size = 0, 1


def _collective(what, collective, /, *args, **kwargs):
    """`collective(*args, **kwargs)`, whose failure (gloo raises a bare
    RuntimeError, NCCL a DistBackendError) becomes a CollectiveError naming
    what failed and the first sentence of why."""
    if torch.compiler.is_compiling():  # traced into a compiled step: no Python around it
        return collective(*args, **kwargs)
    try:
        return collective(*args, **kwargs)
    except RuntimeError as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        reason = re.sub(r'^\[[^\]]*\]\s*', '', lines[0])  # gloo's source location
        reason = reason.split('. ')[0].rstrip('.')
        raise CollectiveError(
            f'process {WORLD.rank} of {WORLD.size}: {what} failed ({reason}): another process of the '
            f'torchrun job stopped (its own output says why) or hung for {TIMEOUT_VARIABLE} '
            f'({collective_timeout().total_seconds():g} s); --resume continues from the last saved epoch'
        ) from e


def sum_over_processes(x):
    """The sum of a (non-differentiable) tensor over every process: a copy, or
    `x` itself when alone."""
    if WORLD.size == 1:
        return x
    x = x.clone()
    _collective('a sum over processes', dist.all_reduce, x)
    return x


def min_over_processes(x):
    """The element-wise minimum over every process (`x` itself when alone)."""
    if WORLD.size == 1:
        return x
    x = x.clone()
    _collective('a minimum over processes', dist.all_reduce, x, op=dist.ReduceOp.MIN)
    return x


class AllReduceSum(torch.autograd.Function):
    """Differentiable sum over processes: the gradient of every process's
    input is the sum of all processes' output gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        _collective('a sum over processes', dist.all_reduce, x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return AllReduceSum.apply(grad)


class AllGather(torch.autograd.Function):
    """Every process's rows, in rank order; gradients go back to their owners, summed."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(WORLD.size)]
        _collective('a gather of the global batch', dist.all_gather, parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        return own_rows(AllReduceSum.apply(grad.contiguous()))


def gather_batch(x, differentiable=False):
    """The global batch: every process's rows of `x`, in rank order. With
    `differentiable`, gradients flow back to each process's own rows (summed
    over the processes, which the gradient averaging divides again)."""
    if WORLD.size == 1:
        return x
    if differentiable:
        return AllGather.apply(x)
    parts = [torch.empty_like(x) for _ in range(WORLD.size)]
    _collective('a gather of the global batch', dist.all_gather, parts, x.contiguous())
    return torch.cat(parts)


def own_rows(x):
    """This process's slice of a global-batch tensor."""
    if WORLD.size == 1:
        return x
    n = x.shape[0] // WORLD.size
    return x[WORLD.rank * n:(WORLD.rank + 1) * n]


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


def global_batchnorm_class(device):
    """The BatchNorm whose statistics span every process, for a layer on
    `device`: on CUDA nn.SyncBatchNorm, whose fused kernels gather a layer's
    statistics in one collective forward and one backward (GlobalBatchNorm2d
    issues two each way, and on NCCL a collective costs more than the layer);
    elsewhere GlobalBatchNorm2d, which runs under gloo (SyncBatchNorm has no
    CPU kernels). One merged collective for every layer is not possible: each
    layer's input depends on the normalisation of the one before."""
    return nn.SyncBatchNorm if torch.device(device).type == 'cuda' else GlobalBatchNorm2d


def sync_batchnorm(module, enabled=True):
    """Under torchrun (and `enabled`), swap every BatchNorm2d of `module` for
    the global-batch BatchNorm of its device (global_batchnorm_class): same
    parameters and buffers, same state-dict keys."""
    if WORLD.size == 1 or not enabled:
        return module
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            state = child.state_dict()
            device = next(iter(state.values())).device
            new = global_batchnorm_class(device)(child.num_features, child.eps, child.momentum,
                                                 child.affine, child.track_running_stats)
            new.load_state_dict(state)
            setattr(module, name, new.to(device))
        else:
            sync_batchnorm(child, enabled)
    return module


def average_gradients_of(grads):
    """The gradients averaged over processes, in one all-reduce: what
    DistributedDataParallel does, but it also works where the student runs
    twice (BSS) or inputs are differentiated (Sobolev, LwM)."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    _collective('the gradient average', dist.all_reduce, flat)
    flat /= WORLD.size
    return [avg.view_as(g) for g, avg in zip(grads, torch.split(flat, [g.numel() for g in grads]))]
