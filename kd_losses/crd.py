"""Contrastive representation distillation.

Tian, Krishnan, Isola: "Contrastive Representation Distillation",
ICLR 2020, https://arxiv.org/abs/1910.10699

The seed's variant (from the authors' RepDistiller): `feat` of student and
teacher pass linear embeddings to feat_dim and are L2-normalised. Two
momentum memory banks (n_data x feat_dim) hold past student and teacher
embeddings. The teacher embedding is scored against the student bank and the
student embedding against the teacher bank at the rows of `sample_idx`:
P = exp(v.m / T) / Z, with Z per side fixed on the first batch as
mean(score) * n_data. Each side's NCE loss, with c = N / n_data, is
-[sum log(P_pos / (P_pos + c + eps)) + sum log(c / (P_neg + c + eps))] / batch;
the two sides are summed. Then the banks' rows at the batch's indices move to
momentum * old + (1 - momentum) * new, re-normalised.

`sample_idx` is int64 [B, nce_n + 1]: column 0 holds each sample's positive
(its own index in mode 'exact', a random sample of its class in 'relax'), the
other columns its negatives: nce_n distinct samples of the other classes,
drawn uniformly without replacement as in the seed, on the device, from
per-class index tables.

The embeddings start from each network's own `feat` width, so any student
and teacher pair.

Under --protocol crd (the CIFAR-100 benchmark): CE weight 1, CRD weight 0.8,
temperature 0.07, 16384 negatives, 128-d embeddings, momentum 0.5, 'exact'
positives (RepDistiller scripts/run_cifar_distill.sh `--distill crd -a 0
-b 0.8` and train_student.py's defaults `--nce_t 0.07 --nce_k 16384
--feat_dim 128 --nce_m 0.5 --mode exact`; mdistiller engine/cfg.py CRD).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed import WORLD, gather_batch, own_rows, sum_over_processes

from .registry import ConfigError, Distiller, Flag, Method, register

__all__ = ['CRD']


class CRD(nn.Module):
    def __init__(self, s_dim, t_dim, feat_dim, nce_n, nce_t, nce_mom, n_data):
        super().__init__()
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)
        self.nce_n, self.nce_t, self.nce_mom, self.n_data = nce_n, nce_t, nce_mom, n_data
        bound = 1.0 / math.sqrt(feat_dim / 3.0)
        self.register_buffer('memory_s', torch.empty(n_data, feat_dim).uniform_(-bound, bound))
        self.register_buffer('memory_t', torch.empty(n_data, feat_dim).uniform_(-bound, bound))
        # Normalisers of the teacher-anchored (z_t) and student-anchored (z_s)
        # scores; negative until the first batch sets them.
        self.register_buffer('z_t', torch.tensor(-1.0))
        self.register_buffer('z_s', torch.tensor(-1.0))

    def embed(self, linear, feat):
        return F.normalize(linear(feat.float().flatten(1)), dim=1)

    def contrast_probs(self, v, bank, sample_idx, z):
        """exp(v . bank[sample_idx] / T) / Z, [B, nce_n + 1]; fixes Z on the first call."""
        if sample_idx.numel() >= bank.shape[0]:
            # One matmul against the whole bank reads less memory than gathering
            # B * (nce_n + 1) rows. The bank is copied because update_memory
            # changes it in place before backward needs it.
            dots = (v @ bank.clone().t()).gather(1, sample_idx)
        else:
            dots = torch.bmm(bank[sample_idx], v.unsqueeze(2)).squeeze(2)
        scores = torch.exp(dots / self.nce_t)
        mean = sum_over_processes(scores.detach().mean()) / WORLD.size  # of the global batch
        z.copy_(torch.where(z > 0, z, mean * self.n_data))
        return scores / z

    def nce_loss(self, probs, eps=1e-7):
        c = (probs.shape[1] - 1) / self.n_data
        pos, neg = probs[:, 0], probs[:, 1:]
        log_pos = torch.log(pos / (pos + c + eps))
        log_neg = torch.log(c / (neg + c + eps))
        return -(log_pos.sum() + log_neg.sum()) / probs.shape[0]

    @torch.no_grad()
    def update_memory(self, idx, v_s, v_t):
        for bank, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            mixed = bank[idx] * self.nce_mom + v * (1.0 - self.nce_mom)
            bank.index_copy_(0, idx, F.normalize(mixed, dim=1))

    def forward(self, feat_s, feat_t, idx, sample_idx):
        # float32 throughout: exp(dot / 0.1) is too sensitive for bf16 dots
        with torch.autocast(feat_s.device.type, enabled=False):
            v_s = self.embed(self.embed_s, feat_s)
            v_t = self.embed(self.embed_t, feat_t)
            loss = (self.nce_loss(self.contrast_probs(v_t, self.memory_s, sample_idx, self.z_t))
                    + self.nce_loss(self.contrast_probs(v_s, self.memory_t, sample_idx, self.z_s)))
        if self.training:  # a loss evaluated in eval mode leaves the banks alone
            # every process applies the whole global batch, so the banks stay identical
            self.update_memory(gather_batch(idx), gather_batch(v_s.detach()),
                               gather_batch(v_t.detach()))
        return loss


class CRDDistiller(Distiller):
    def __init__(self, ctx):
        super().__init__()
        a = ctx.args
        labels = ctx.train_labels.long().to(ctx.device)
        counts = torch.bincount(labels, minlength=ctx.num_class)
        largest = int(counts.argmax())  # the class with the fewest negatives
        available = len(labels) - int(counts[largest])
        if a.nce_n > available:
            raise ConfigError(f'--nce_n {a.nce_n} exceeds the {available} negatives available '
                              f'for class {largest} ({len(labels)} training samples, '
                              f'{int(counts[largest])} of that class)')
        if not 0.0 <= a.nce_mom <= 1.0:
            raise ConfigError(f'--nce_mom must lie in [0, 1], got {a.nce_mom}')
        self.mode = a.mode
        self.crd = CRD(ctx.student_shapes['feat'][0], ctx.teacher_shapes['feat'][0], a.feat_dim,
                       a.nce_n, a.nce_t, a.nce_mom, len(labels))
        # Sample indices sorted by class: class y occupies
        # by_class[class_start[y] : class_start[y] + counts[y]]. Derived from the
        # data, so not checkpointed.
        self.register_buffer('labels', labels, persistent=False)
        self.register_buffer('by_class', torch.argsort(labels, stable=True), persistent=False)
        self.register_buffer('class_start', torch.cumsum(counts, 0) - counts, persistent=False)
        self.register_buffer('class_count', counts, persistent=False)
        self.smallest_class = int(counts[counts > 0].min())
        self.register_buffer('ranks', torch.arange(len(labels) - self.smallest_class,
                                                   device=ctx.device), persistent=False)

    def sample_contrast_idx(self, idx):
        """int64 [B, nce_n + 1]: column 0 the positive, then nce_n negatives."""
        y = self.labels[idx]
        start, count = self.class_start[y].unsqueeze(1), self.class_count[y].unsqueeze(1)
        n = len(self.labels)
        # nce_n distinct ranks among the other classes' samples: the positions of
        # the smallest of uniform random keys, keys past a row's pool excluded.
        keys = torch.rand(idx.shape[0], n - self.smallest_class, device=idx.device)
        keys = keys.masked_fill(self.ranks >= n - count, 2.0)
        rank = keys.topk(self.crd.nce_n, dim=1, largest=False, sorted=False).indices
        negatives = self.by_class[rank + count * (rank >= start)]  # skip the own class's block
        if self.mode == 'exact':
            positive = idx.unsqueeze(1)
        else:  # 'relax': any sample of the same class
            pick = (torch.rand(idx.shape[0], 1, device=idx.device) * count).long().clamp_(max=count - 1)
            positive = self.by_class[start + pick]
        return torch.cat([positive, negatives], dim=1)

    def forward(self, s, t, batch):
        # Under torchrun every process draws for the global batch (same RNG
        # state everywhere) and keeps its own rows: one process's draw.
        sample_idx = own_rows(self.sample_contrast_idx(gather_batch(batch.idx)))
        return self.crd(s.feat, t.feat.detach(), batch.idx, sample_idx)


register(Method(
    name='crd', title='contrastive representation distillation',
    paper='https://arxiv.org/abs/1910.10699',
    transfers='feat through linear embeddings, contrasted against memory banks of past embeddings',
    variant='negatives from the other classes, without replacement; lambda 0.2 on CIFAR-10, 0.8 on CIFAR-100',
    build=CRDDistiller,
    defaults={'lambda_kd': 0.2, 'feat_dim': 128, 'nce_n': 16384, 'nce_t': 0.1, 'nce_mom': 0.5,
              'mode': 'exact'},
    dataset_defaults={'cifar100': {'lambda_kd': 0.8}},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 0.8, 'nce_t': 0.07, 'nce_n': 16384,
                               'feat_dim': 128, 'nce_mom': 0.5, 'mode': 'exact'}},
    flags={'feat_dim': Flag(int, 'dimension of the embedding space', positive=True),
           'nce_n': Flag(int, 'negatives per positive', positive=True),
           'nce_t': Flag(float, 'temperature of the scores', positive=True),
           'nce_mom': Flag(float, 'momentum of the memory bank updates'),
           'mode': Flag(str, "positive: the sample itself ('exact') or any of its class ('relax')",
                        choices=('exact', 'relax'))},
))
