"""Attention transfer.

Zagoruyko, Komodakis: "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer",
ICLR 2017, https://arxiv.org/abs/1612.03928

Attention map = sum over channels of |f|^p, flattened and L2-normalised per
sample (1e-6 added to the norm); the loss is the MSE between the student's
and the teacher's maps. As in the seed, the sum of |f|^p is used (the paper
also studies mean and max) and the three stage losses are averaged.
"""
import torch.nn as nn
import torch.nn.functional as F

from .registry import FeatureDistiller, Flag, Method, register

__all__ = ['AT']


class AT(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def attention_map(self, fm, eps=1e-6):
        am = fm.abs().pow(self.p).sum(dim=1).flatten(1)
        return am / (am.norm(dim=1, keepdim=True) + eps)

    def forward(self, fm_s, fm_t):
        return F.mse_loss(self.attention_map(fm_s), self.attention_map(fm_t))


register(Method(
    name='at', title='attention transfer', paper='https://arxiv.org/abs/1612.03928',
    transfers='rb1..3 post-activation attention maps, mean',
    variant='attention = sum over channels of |f|^p (p=2); the three stages averaged',
    build=lambda ctx: FeatureDistiller(AT(ctx.args.p), ['rb1', 'rb2', 'rb3'], act='post'),
    defaults={'lambda_kd': 1000.0, 'p': 2.0},
    flags={'p': Flag(float, 'power of |f| in the attention map', positive=True)},
))
