"""Correlation congruence.

Peng, Jin, Liu, Li, Wu, Liu, Zhou, Zhang: "Correlation Congruence for
Knowledge Distillation", ICCV 2019, https://arxiv.org/abs/1904.01802

Features are L2-normalised and their batch similarity S = f f^T is mapped
through the Gaussian RBF exp(-2 gamma (1 - S)) = exp(-2 gamma) exp(2 gamma S),
approximated by its order-P Taylor expansion
sum_{p=0..P} exp(-2 gamma) (2 gamma)^p / p! S^p. The loss is the MSE between
the student's and the teacher's correlation matrices. As in the seed it is
applied to `feat` of ordinary (not class-balanced) batches. The correlation
is B x B whatever the feature's width, so student and teacher `feat` of any
sizes pair without a connector.

Under --protocol crd: CE weight 1 and the seed's CC weight 100, not the
benchmark's 0.02 (RepDistiller scripts/run_cifar_distill.sh
`--distill correlation -a 0 -b 0.02`): that weight multiplies another loss,
RepDistiller's distiller_zoo/CC.py, the mean over consecutive samples of
sum_d |f_s - f_t|_i,d |f_s - f_t|_i+1,d on 128-d linear embeddings (models/util.py
LinearEmbed): a sum over 128 dimensions, orders of magnitude larger than the
MSE between correlation matrices here, on which 0.02 would leave
cross-entropy nearly alone.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import ConfigError, FeatureDistiller, Flag, Method, register

__all__ = ['CC']


class CC(nn.Module):
    def __init__(self, gamma, P_order):
        super().__init__()
        self.gamma, self.P_order = gamma, int(P_order)
        if self.P_order < 0:
            raise ValueError(f'P_order must be >= 0, got {P_order}')
        two_gamma = 2 * gamma
        self.coefficients = [math.exp(-two_gamma) * two_gamma ** p / math.factorial(p)
                             for p in range(self.P_order + 1)]

    def correlation(self, feat):
        feat = F.normalize(feat, dim=1)
        similarity = feat @ feat.t()
        power = torch.ones_like(similarity)  # S^p, built up one order at a time
        corr = self.coefficients[0] * power
        for coefficient in self.coefficients[1:]:
            power = power * similarity
            corr = corr + coefficient * power
        return corr

    def forward(self, feat_s, feat_t):
        return F.mse_loss(self.correlation(feat_s.float()), self.correlation(feat_t.float()))


def build(ctx):
    if ctx.args.P_order < 0:
        raise ConfigError(f'cc: --P_order must be >= 0, got {ctx.args.P_order}')
    return FeatureDistiller(CC(ctx.args.gamma, ctx.args.P_order), ['feat'], relational=True)


register(Method(
    name='cc', title='correlation congruence', paper='https://arxiv.org/abs/1904.01802',
    transfers='feat; Taylor-expanded Gaussian RBF correlation of the batch, MSE',
    variant='Gaussian RBF kernel by its P=2 Taylor expansion; no instance congruence, no special sampling',
    build=build,
    defaults={'lambda_kd': 100.0, 'gamma': 0.4, 'P_order': 2},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 100.0}},
    flags={'gamma': Flag(float, 'gamma of the Gaussian RBF in CC', positive=True),
           'P_order': Flag(int, 'order of the Taylor expansion of the RBF in CC')},
))
