"""How train_kd.py applies each distillation method.

A method is one module in kd_losses/ holding the loss (an nn.Module callable
on bare tensors, as METHODS.md specifies it) and one `register(Method(...))`
call describing how the training loop uses it:

- `build(ctx)` returns a `Distiller`: the module that reads the student's and
  the teacher's features for a batch and returns the KD loss (before
  lambda_kd). Its parameters (connectors, embeddings, ...) are optimised with
  the student; its buffers (memory banks) are checkpointed with it.
- `defaults` are the seed's hyperparameters (`lambda_kd` and the method's
  flags); `dataset_defaults` override them per dataset.
- `flags` declares the command-line flags the method reads. A flag shared by
  several methods (e.g. `--T`) is declared by each with the same type; when it
  is not given, the chosen method's default applies.

A Distiller can also ask for pre-training stages (`stages`), a per-epoch
weight schedule (`kd_weight`) and a differentiable teacher (`teacher_grad`).

Nothing here imports a network or the training loop.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn


class ConfigError(ValueError):
    """A method's settings cannot work (e.g. more negatives than samples); the message says why."""


@dataclass(frozen=True)
class Flag:
    type: Callable
    help: str
    choices: Optional[Tuple] = None
    positive: bool = False  # reject values <= 0


@dataclass(frozen=True)
class Method:
    name: str                               # the --kd_mode value
    title: str                              # what it is, e.g. 'attention transfer'
    paper: str                              # link to the paper
    transfers: str                          # what it reads, e.g. 'rb1..3 post-activation, mean'
    build: Callable[['Context'], 'Distiller']
    defaults: Mapping[str, Any]             # seed defaults: lambda_kd and the method's flags
    flags: Mapping[str, Flag] = field(default_factory=dict)
    dataset_defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    variant: str = ''                       # where the seed departs from the paper, in a phrase

    def defaults_for(self, data_name):
        return {**self.defaults, **self.dataset_defaults.get(data_name, {})}


METHODS: Dict[str, Method] = {}


def register(method):
    if method.name in METHODS:
        raise ValueError(f'kd_mode {method.name!r} is registered twice')
    missing = [k for k in method.flags if k not in method.defaults]
    if 'lambda_kd' not in method.defaults or missing:
        raise ValueError(f'{method.name}: defaults must give lambda_kd and every flag ({missing})')
    METHODS[method.name] = method
    return method


def all_flags():
    """Every method flag: name -> (Flag, {mode: default}); shared flags must agree on type."""
    out = {}
    for m in METHODS.values():
        for name, flag in m.flags.items():
            if name in out and out[name][0].type is not flag.type:
                raise ValueError(f'flag --{name} has different types in different methods')
            out.setdefault(name, (flag, {}))[1][m.name] = m.defaults[name]
    return out


@dataclass
class Context:
    """What a method's `build` may use."""
    args: Any                       # resolved flags, the method's defaults filled in
    student_shapes: Mapping[str, Tuple[int, ...]]  # per-sample shape of stem, rb1..3, feat, out
    teacher_shapes: Mapping[str, Tuple[int, ...]]
    num_class: int
    n_data: int                     # size of the training split
    train_labels: torch.Tensor      # [n_data] int64, on the training device
    device: torch.device
    student: Optional[nn.Module] = None  # the networks, for methods that run them again (BSS);
    teacher: Optional[nn.Module] = None  # not owned by the distiller: never register them


@dataclass
class PreStage:
    """A training stage run before the main schedule, with its own SGD
    optimiser over `params` (momentum and weight decay as the main one).

    Each step runs the teacher (no grad) and, if `needs_student`, the student
    (train mode), then minimises `loss(s, t, batch)` (s is None when the
    student is not run). `train_modules` are put in train mode for the stage.
    The lr of epoch e (from 1) is `lr_scale(e) * --lr`."""
    name: str
    epochs: int
    lr_scale: Callable[[int], float]
    params: Sequence[nn.Parameter]
    loss: Callable
    needs_student: bool = True
    train_modules: Sequence[nn.Module] = ()


class Distiller(nn.Module):
    """Glue between the networks' outputs and a method's loss.

    forward(s, t, batch) -> scalar KD loss, where s and t are the student's
    and the teacher's `Features(stem, rb1, rb2, rb3, feat, out)` and batch is
    `Batch(img, target, idx)`. The teacher's features carry no graph unless
    `teacher_grad` is set."""

    # True: the teacher runs with autograd on an input that requires grad, so
    # the loss can differentiate through it (its parameters stay frozen).
    teacher_grad = False

    def stages(self, ctx) -> List[PreStage]:
        """Stages to run before the main schedule (AB/FSP initialisation, FT's paraphraser)."""
        return []

    def kd_weight(self, epoch, epochs) -> float:
        """Multiplier of lambda_kd in main-schedule epoch `epoch` (from 1). Where it
        is 0 the loop skips the KD term entirely (no teacher forward, no call)."""
        return 1.0

    def learnable_parameters(self):
        """Parameters the main optimiser updates with the student."""
        return [p for p in self.parameters() if p.requires_grad]


# ---- several processes (torchrun): each holds an equal slice of the global batch

def world():
    """(rank, number of processes) of a torchrun job; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class AllReduceSum(torch.autograd.Function):
    """Sum over processes; the gradient of every process's input is the sum
    of all processes' output gradients."""

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
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        rank, size = world()
        return own_rows(AllReduceSum.apply(grad.contiguous()))


def gather_batch(x, differentiable=False):
    """The global batch: every process's rows of `x`, in rank order. With
    `differentiable`, gradients flow back to each process's own rows (summed
    over the processes, which the loop's gradient averaging divides again)."""
    rank, size = world()
    if size == 1:
        return x
    if differentiable:
        return AllGather.apply(x)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def own_rows(x):
    """This process's slice of a global-batch tensor."""
    rank, size = world()
    n = x.shape[0] // size
    return x if size == 1 else x[rank * n:(rank + 1) * n]


def sum_over_processes(x):
    """The sum of a (non-differentiable) statistic over every process."""
    if world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def pick(features, key, act=None):
    """features.key, or its pre (act='pre') / post (act='post') activation."""
    value = getattr(features, key)
    if isinstance(value, tuple):
        if act not in ('pre', 'post'):
            raise ValueError(f'{key} is a (pre, post) pair: say which with act')
        return value[0] if act == 'pre' else value[1]
    return value


class FeatureDistiller(Distiller):
    """Applies a loss to the same named features of student and teacher and
    averages over them: one shared loss module, or one module per feature
    (connectors with their own parameters).

    A `relational` loss compares the samples of a batch with each other
    (similarities, distances): under torchrun it is computed on the global
    batch gathered from every process, so it is the loss one process gives."""

    def __init__(self, loss, keys, act=None, relational=False):
        super().__init__()
        self.keys, self.act, self.relational = tuple(keys), act, relational
        if isinstance(loss, (list, tuple, nn.ModuleList)):
            if len(loss) != len(self.keys):
                raise ValueError('one loss module per feature')
            self.per_key = nn.ModuleList(loss)
        else:
            self.shared = loss
        self.is_shared = not isinstance(loss, (list, tuple, nn.ModuleList))

    def forward(self, s, t, batch):
        total = 0.0
        for i, key in enumerate(self.keys):
            loss = self.shared if self.is_shared else self.per_key[i]
            fs, ft = pick(s, key, self.act), pick(t, key, self.act).detach()
            if self.relational:
                fs, ft = gather_batch(fs, differentiable=True), gather_batch(ft)
            total = total + loss(fs, ft)
        return total / len(self.keys)
