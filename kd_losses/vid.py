"""Variational information distillation.

Ahn, Hu, Damianou, Lawrence, Dai: "Variational Information Distillation for
Knowledge Transfer", CVPR 2019, https://arxiv.org/abs/1904.05835

The teacher map is modelled as a Gaussian whose mean a regressor (three 1×1
convs, no bias, ReLU between, no BN) predicts from the student's map and
whose variance is learned per channel, σ² = softplus(α) + eps, with α
initialised so that σ² starts at init_var. The loss is the mean over all
entries of the negative log-likelihood ½(log σ² + (μ − t)²/σ²) (constant
dropped). As in the seed: one module per stage rb1..3 (post-activation),
mid channels = int(sf · teacher channels), the three losses averaged.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import ConfigError, FeatureDistiller, Flag, Method, register

__all__ = ['VID']

STAGES = ('rb1', 'rb2', 'rb3')


def inverse_softplus(y):
    """x with softplus(x) = y (y > 0), stable for large and small y."""
    return y + math.log(-math.expm1(-y))


class VID(nn.Module):
    def __init__(self, in_ch, mid_ch, out_ch, init_var, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.regressor = nn.Sequential(
            nn.Conv2d(in_ch, mid_ch, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_ch, mid_ch, 1, bias=False), nn.ReLU(),
            nn.Conv2d(mid_ch, out_ch, 1, bias=False))
        for m in self.regressor:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        self.alpha = nn.Parameter(torch.full((out_ch,), inverse_softplus(init_var - eps)))

    def variance(self):
        return F.softplus(self.alpha.float()) + self.eps

    def forward(self, fm_s, fm_t):
        mean = self.regressor(fm_s).float()
        var = self.variance().view(1, -1, 1, 1)
        return (0.5 * (var.log() + (mean - fm_t.float()).pow(2) / var)).mean()


def build(ctx):
    args = ctx.args
    if args.init_var <= 1e-6:
        raise ConfigError(f'vid: --init_var must exceed the variance floor 1e-6, got {args.init_var}')
    modules = []
    for key in STAGES:
        s_shape, t_shape = ctx.student_shapes[key], ctx.teacher_shapes[key]
        if s_shape[1:] != t_shape[1:]:
            raise ConfigError(f'vid: student and teacher {key} spatial sizes differ '
                              f'({s_shape} vs {t_shape}); the 1×1 regressor keeps the size')
        mid_ch = int(args.sf * t_shape[0])
        if mid_ch < 1:
            raise ConfigError(f'vid: --sf {args.sf} leaves {key} a regressor with no channels '
                              f'(int({args.sf} × {t_shape[0]}) = {mid_ch})')
        modules.append(VID(s_shape[0], mid_ch, t_shape[0], args.init_var))
    return FeatureDistiller(modules, STAGES, act='post')


register(Method(
    name='vid', title='variational information distillation', paper='https://arxiv.org/abs/1904.05835',
    transfers='rb1..3 post-activation, one regressor per stage, mean',
    variant='hidden channels = output channels; no BN in the mean regressor',
    build=build,
    defaults={'lambda_kd': 1.0, 'sf': 1.0, 'init_var': 5.0},
    flags={'sf': Flag(float, 'VID regressor width: mid channels = int(sf × teacher channels)',
                      positive=True),
           'init_var': Flag(float, 'initial per-channel variance of VID', positive=True)},
))
