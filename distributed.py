"""Several processes training as one (torchrun): the process group, sums and
gathers over processes, global-batch BatchNorm and gradient averaging.

Every process holds an equal slice of the global batch. The pieces here
make N processes compute what one process would on the whole batch: each
reduction is written once, here. Alone (no torchrun), every function is the
identity and nothing touches torch.distributed. Imports only torch.
"""
import os

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


def init_distributed(device):
    """Join the torchrun job, if there is one (WORLD_SIZE > 1): one process per
    GPU with NCCL, or CPU processes with gloo. Returns the device this process
    trains on (cuda:LOCAL_RANK under torchrun with CUDA, else `device`)."""
    size = int(os.environ.get('WORLD_SIZE', '1'))
    if size <= 1 or dist.is_initialized():
        return device
    if torch.device(device).type == 'cuda':
        local = int(os.environ.get('LOCAL_RANK', '0'))
        torch.cuda.set_device(local)
        device = f'cuda:{local}'
    dist.init_process_group('nccl' if device.startswith('cuda') else 'gloo')
    WORLD.rank, WORLD.size = dist.get_rank(), dist.get_world_size()
    return device


def leave_distributed():
    """Leave the process group (at the end of a script, error or not)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    WORLD.rank, WORLD.size = 0, 1


def sum_over_processes(x):
    """The sum of a (non-differentiable) tensor over every process: a copy, or
    `x` itself when alone."""
    if WORLD.size == 1:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def min_over_processes(x):
    """The element-wise minimum over every process (`x` itself when alone)."""
    if WORLD.size == 1:
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return x


class AllReduceSum(torch.autograd.Function):
    """Differentiable sum over processes: the gradient of every process's
    input is the sum of all processes' output gradients."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return AllReduceSum.apply(grad)


class AllGather(torch.autograd.Function):
    """Every process's rows, in rank order; gradients go back to their owners, summed."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(WORLD.size)]
        dist.all_gather(parts, x.contiguous())
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
    dist.all_gather(parts, x.contiguous())
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


def sync_batchnorm(module, enabled=True):
    """Under torchrun (and `enabled`), swap every BatchNorm2d of `module` for
    GlobalBatchNorm2d: same parameters and buffers, same state-dict keys."""
    if WORLD.size == 1 or not enabled:
        return module
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            new.load_state_dict(child.state_dict())
            device = next(iter(child.state_dict().values())).device
            setattr(module, name, new.to(device))
        else:
            sync_batchnorm(child, enabled)
    return module


def average_gradients_of(grads):
    """The gradients averaged over processes, in one all-reduce: what
    DistributedDataParallel does, but it also works where the student runs
    twice (BSS) or inputs are differentiated (Sobolev, LwM)."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= WORLD.size
    return [avg.view_as(g) for g, avg in zip(grads, torch.split(flat, [g.numel() for g in grads]))]
