"""Semantic calibration for cross-layer knowledge distillation.

Chen, Mei, Zhang, Wang, Wang, Feng, Chen: "Cross-Layer Distillation with
Semantic Calibration", AAAI 2021, https://arxiv.org/abs/2012.03236

Every student stage (rb1..rbM, post-activation) is matched against every
teacher stage (rb1..rbN; M and N may differ), weighted by an attention that
each sample computes over the teacher stages:

- each stage's batch similarity matrix G = F F^T (F the stage's maps of the
  batch flattened to [B, C*H*W]) passes a per-stage MLP (Linear(B, 2d), ReLU,
  Linear(2d, d), L2-normalised; d = B // 4): queries for the student stages,
  keys for the teacher stages; attention a[b, i, :] = softmax_j(q_i . k_j)
  for sample b;
- for each pair (i, j) the maps are aligned in space as the official code
  does (the student map is average-pooled to the teacher's size when larger,
  else the teacher's to the student's), and a regressor (1x1 conv to 2t
  channels, BN, ReLU, 3x3 conv, BN, ReLU, 1x1 conv to t channels; t the
  teacher stage's channels) maps the student map to the teacher's channels;
  l[b, i, j] = mean over C, H, W of the squared difference;
- loss = sum_{b, i, j} a[b, i, j] l[b, i, j] / (B * M).

The MLP's input size is the batch size B (per process under torchrun): the
official code skips a smaller last batch; here its similarity matrix is
padded with zero columns to B (a batch larger than B is an error). Defaults:
lambda 400 (DefangChen/SemCKD scripts/run_cifar_distill.sh and the SimKD
toolbox, `-b 400`). Departures: the official runs add Hinton's KD (T 4,
weight 1; `-a 1`), not part of this mode (it is `st`); 240 epochs, lr 0.05,
batch 64 there, the zoo's schedule here; similarities, attention and loss in
float32; the L2 normalisation has the usual 1e-12 floor.

Under --protocol crd (the CIFAR-100 benchmark's schedule, whose batch of 64
is the official one): the same official weights (CE weight 1, lambda 400).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed import WORLD

from .registry import ConfigError, Distiller, Method, pick, register

__all__ = ['SemCKD']

FACTOR = 4  # attention dimension = batch size // FACTOR, as the official code


class MLPEmbed(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear1 = nn.Linear(dim_in, 2 * dim_out)
        self.linear2 = nn.Linear(2 * dim_out, dim_out)

    def forward(self, x):
        return F.normalize(self.linear2(F.relu(self.linear1(x))), dim=1)


def regressor(in_ch, out_ch):
    mid = 2 * out_ch
    return nn.Sequential(
        nn.Conv2d(in_ch, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, 3, 1, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
        nn.Conv2d(mid, out_ch, 1, bias=False))


class SemCKD(nn.Module):
    """Attention and regressors for student stages of `s_shapes` and teacher
    stages of `t_shapes` (per-sample shapes), batches of at most `batch_size`."""

    def __init__(self, s_shapes, t_shapes, batch_size):
        super().__init__()
        self.batch_size, dim = batch_size, batch_size // FACTOR
        self.n_s, self.n_t = len(s_shapes), len(t_shapes)
        self.query = nn.ModuleList([MLPEmbed(batch_size, dim) for _ in s_shapes])
        self.key = nn.ModuleList([MLPEmbed(batch_size, dim) for _ in t_shapes])
        self.regressors = nn.ModuleList([regressor(s[0], t[0]) for s in s_shapes for t in t_shapes])
        # per pair: pool the student map to the teacher's size, or the teacher's to the student's
        self.source_size = [tuple(t[1:]) if s[1] > t[1] else None for s in s_shapes for t in t_shapes]
        self.target_size = [tuple(s[1:]) if s[1] < t[1] else None for s in s_shapes for t in t_shapes]

    def similarity(self, fm):
        """[B, batch_size]: the batch's Gram matrix, zero columns up to batch_size."""
        v = fm.float().flatten(1)
        g = v @ v.t()
        if g.shape[1] > self.batch_size:
            raise ValueError(f'semckd: a batch of {g.shape[1]} exceeds the batch size '
                             f'{self.batch_size} its attention was built for')
        return F.pad(g, (0, self.batch_size - g.shape[1]))

    def attention(self, feats_s, feats_t):
        """[B, n_s, n_t]: softmax over the teacher stages."""
        with torch.autocast(feats_s[0].device.type, enabled=False):
            q = torch.stack([m(self.similarity(f)) for m, f in zip(self.query, feats_s)], dim=1)
            k = torch.stack([m(self.similarity(f)) for m, f in zip(self.key, feats_t)], dim=2)
            return torch.softmax(torch.bmm(q, k), dim=-1)

    def pair_losses(self, feats_s, feats_t):
        """[B, n_s, n_t]: per-sample MSE of each regressed student stage and teacher stage."""
        losses = []
        for i, fs in enumerate(feats_s):
            for j, ft in enumerate(feats_t):
                p = i * self.n_t + j
                source, target = fs, ft
                if self.source_size[p] is not None:
                    source = F.adaptive_avg_pool2d(fs, self.source_size[p])
                if self.target_size[p] is not None:
                    target = F.adaptive_avg_pool2d(ft, self.target_size[p])
                out = self.regressors[p](source)
                with torch.autocast(out.device.type, enabled=False):
                    losses.append((out.float() - target.float()).pow(2).flatten(1).mean(dim=1))
        return torch.stack(losses, dim=1).view(-1, self.n_s, self.n_t)

    def forward(self, feats_s, feats_t):
        feats_t = [f.detach() for f in feats_t]
        att = self.attention(feats_s, feats_t)
        losses = self.pair_losses(feats_s, feats_t)
        return (att * losses).sum() / (losses.shape[0] * self.n_s)


class SemCKDDistiller(Distiller):
    def __init__(self, ctx):
        super().__init__()
        self.s_keys = [k for k in ctx.student_shapes if k.startswith('rb')]
        self.t_keys = [k for k in ctx.teacher_shapes if k.startswith('rb')]
        batch_size = getattr(ctx.args, 'batch_size', None)
        if batch_size is None:
            raise ConfigError('semckd: the attention needs --batch_size')
        per_process = batch_size // WORLD.size
        if per_process < FACTOR:
            raise ConfigError(f'semckd: the attention needs at least {FACTOR} samples per process '
                              f'and batch, got {per_process} (--batch_size {batch_size})')
        self.semckd = SemCKD([ctx.student_shapes[k] for k in self.s_keys],
                             [ctx.teacher_shapes[k] for k in self.t_keys], per_process)

    def forward(self, s, t, batch):
        return self.semckd([pick(s, k, 'post') for k in self.s_keys],
                           [pick(t, k, 'post') for k in self.t_keys])


register(Method(
    name='semckd', title='semantic calibration for cross-layer KD',
    paper='https://arxiv.org/abs/2012.03236',
    transfers='every stage post-activation, each student stage against every teacher stage '
              'through a regressor, weighted by per-sample attention over the teacher stages',
    variant='no logit KD added; a smaller last batch is zero-padded for the attention, not skipped',
    build=SemCKDDistiller,
    defaults={'lambda_kd': 400.0},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 400.0}},
))
