"""Neuron selectivity transfer.

Huang, Wang: "Like What You Like: Knowledge Distill via Neuron Selectivity
Transfer", 2017, https://arxiv.org/abs/1707.01219

Each channel's spatial map is one sample of a distribution; the loss is the
squared MMD between the student's and the teacher's channel distributions of
each image, with the polynomial kernel k(a, b) = (a.b)^2 (d=2, c=0) on
L2-normalised channel vectors: mean k(t,t) + mean k(s,s) - 2 mean k(s,t),
averaged over the batch. As in the seed, a larger map is average-pooled to
the smaller one's spatial size first.
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
    transfers='rb3 post-activation; MMD with polynomial kernel',
    variant='polynomial kernel, d=2, c=0',
    build=lambda ctx: FeatureDistiller(NST(), ['rb3'], act='post'),
    defaults={'lambda_kd': 10.0},
))
