"""Logit regression.

Ba, Caruana: "Do Deep Nets Really Need to be Deep?", NIPS 2014,
https://papers.nips.cc/paper/5484-do-deep-nets-really-need-to-be-deep

The student regresses the teacher's logits (before softmax) with an L2 loss.
As in the seed, this is the element-wise MSE between the logits (mean over
batch and classes), added to the cross-entropy on the labels. Only the
logits are read: any student and teacher with the same classes pair.

Under --protocol crd: the CIFAR-100 benchmark (RepDistiller, mdistiller) has
no logit regression, so its weights are the seed's (CE weight 1, lambda 0.1).
"""
import torch.nn as nn
import torch.nn.functional as F

from .registry import FeatureDistiller, Method, register

__all__ = ['Logits']


class Logits(nn.Module):
    def forward(self, out_s, out_t):
        return F.mse_loss(out_s.float(), out_t.float())


register(Method(
    name='logits', title='logit regression',
    paper='https://papers.nips.cc/paper/5484-do-deep-nets-really-need-to-be-deep',
    transfers='logits; MSE',
    build=lambda ctx: FeatureDistiller(Logits(), ['out']),
    defaults={'lambda_kd': 0.1},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 0.1}},
))
