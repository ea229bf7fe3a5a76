"""Soft targets.

Hinton, Vinyals, Dean: "Distilling the Knowledge in a Neural Network",
NIPS 2014 Deep Learning Workshop, https://arxiv.org/abs/1503.02531

KL(softmax(t/T) || softmax(s/T)), averaged over the batch and multiplied by
T^2 so that gradient magnitudes do not shrink with the temperature.
"""
import torch.nn as nn
import torch.nn.functional as F

from .registry import FeatureDistiller, Flag, Method, register

__all__ = ['SoftTarget']


class SoftTarget(nn.Module):
    def __init__(self, T):
        super().__init__()
        self.T = T

    def forward(self, out_s, out_t):
        log_p_s = F.log_softmax(out_s / self.T, dim=1)
        log_p_t = F.log_softmax(out_t / self.T, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction='batchmean', log_target=True) * self.T ** 2


register(Method(
    name='st', title='soft target', paper='https://arxiv.org/abs/1503.02531',
    transfers='logits, softened at temperature T',
    build=lambda ctx: FeatureDistiller(SoftTarget(ctx.args.T), ['out']),
    defaults={'lambda_kd': 0.1, 'T': 4.0},
    flags={'T': Flag(float, 'softmax temperature', positive=True)},
))
