"""Hints.

Romero, Ballas, Kahou, Chassang, Gatta, Bengio: "FitNets: Hints for Thin Deep
Nets", ICLR 2015, https://arxiv.org/abs/1412.6550

The student's guided layer is pulled towards the teacher's hint layer with an
L2 loss. The seed's variant: the hint is the last stage's post-activation
(`rb3`, same shape in student and teacher, so no regressor), the loss is the
element-wise MSE, and it is trained jointly with the cross-entropy instead of
the paper's separate hint-training phase.
"""
import torch.nn as nn
import torch.nn.functional as F

from .registry import FeatureDistiller, Method, register

__all__ = ['Hint']


class Hint(nn.Module):
    def forward(self, fm_s, fm_t):
        return F.mse_loss(fm_s.float(), fm_t.float())


register(Method(
    name='fitnet', title='hints (FitNets)', paper='https://arxiv.org/abs/1412.6550',
    transfers='rb3 post-activation; MSE',
    variant='one phase with CE, no hint regressor (student and teacher maps have the same shape)',
    build=lambda ctx: FeatureDistiller(Hint(), ['rb3'], act='post'),
    defaults={'lambda_kd': 0.1},
))
