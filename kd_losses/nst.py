"""Neuron selectivity transfer.

Huang, Wang: "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer", 2017, https://arxiv.org/abs/1707.01219

Each channel's spatial map is one sample of a distribution; the loss is the
squared MMD between the student's and the teacher's channel distributions of
each image, with the polynomial kernel k(a, b) = (a.b)^2 (d=2, c=0) on
L2-normalised channel vectors: mean k(t,t) + mean k(s,s) - 2 mean k(s,t),
averaged over the batch. As in the seed it is applied to the last stage's
post-activation (the last of `ctx.stage_keys`: rb3, or rb4).

Across networks: the kernel means run over channel pairs, so the channel
counts need not match; a larger map is adaptively average-pooled to the
smaller one's spatial size first, as in the seed and the CIFAR-100
benchmark's code (RepDistiller distiller_zoo/NST.py).

Under --protocol crd (the benchmark, RepDistiller): CE weight 1, NST weight
50 (scripts/run_cifar_distill.sh `--distill nst -a 0 -b 50`; mdistiller
engine/cfg.py NST.LOSS CE_WEIGHT 1, FEAT_WEIGHT 50). The benchmark sums the
loss over every stage; this mode, as the seed, takes the last stage alone.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import FeatureDistiller, Method, register

__all__ = ['NST']


class NST(nn.Module):
    @staticmethod
    def channel_vectors(fm, size):
        if fm.shape[2:] != size:
            fm = F.adaptive_avg_pool2d(fm, size)
        return F.normalize(fm.flatten(2), dim=2)  # [B, C, HW], unit rows

    @staticmethod
    def poly_kernel(a, b):
        # [B, Ca, HW] x [B, Cb, HW] -> mean over batch and channel pairs of (a.b)^2
        return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()

    def forward(self, fm_s, fm_t):
        size = tuple(min(s, t) for s, t in zip(fm_s.shape[2:], fm_t.shape[2:]))
        s = self.channel_vectors(fm_s.float(), size)
        t = self.channel_vectors(fm_t.float(), size)
        return self.poly_kernel(t, t) + self.poly_kernel(s, s) - 2 * self.poly_kernel(s, t)


register(Method(
    name='nst', title='neuron selectivity transfer', paper='https://arxiv.org/abs/1707.01219',
    transfers='last stage post-activation; MMD with polynomial kernel',
    variant='polynomial kernel, d=2, c=0; the last stage only',
    build=lambda ctx: FeatureDistiller(NST(), ctx.stage_keys('nst')[-1:], act='post'),
    defaults={'lambda_kd': 10.0},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 50.0}},
))
