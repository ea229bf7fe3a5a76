"""Variational information distillation.

Ahn, Hu, Damianou, Lawrence, Dai: "Variational Information Distillation for
Knowledge Transfer", CVPR 2019, https://arxiv.org/abs/1904.05835

The teacher map is modelled as a Gaussian whose mean a regressor (three 1×1
convs, no bias, ReLU between, no BN) predicts from the student's map and
whose variance is learned per channel, σ² = softplus(α) + eps, with α
initialised so that σ² starts at init_var. The loss is the mean over all
entries of the negative log-likelihood ½(log σ² + (μ − t)²/σ²) (constant
dropped). As in the seed: one module per stage (post-activation; every stage
both networks have, `ctx.stage_keys`), mid channels = int(sf · teacher
channels), the stage losses averaged.

Across networks: the regressor takes the student's channels to the teacher's
whatever the two counts (the paper's design). Where the spatial sizes differ,
the larger map (the student's before the regressor, or the teacher's) is
adaptively average-pooled to the smaller's size, as the CIFAR-100
benchmark's code does (RepDistiller distiller_zoo/VID.py, mdistiller);
equal sizes are left as they are.

Under --protocol crd (the benchmark): CE weight 1, VID weight 1, sf 1,
initial variance 5 (RepDistiller scripts/run_cifar_distill.sh `--distill vid
-a 0 -b 1`, VIDLoss(s, t, t) with init_pred_var 5; mdistiller engine/cfg.py
VID). The benchmark sums the stage losses where this mode averages them: per
stage its weight is 3 (4) times this one for three- (four-) stage networks.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .at import pool_to_smaller
from .registry import ConfigError, FeatureDistiller, Flag, Method, register

__all__ = ['VID']


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
        fm_s, fm_t = pool_to_smaller(fm_s, fm_t)
        mean = self.regressor(fm_s).float()
        var = self.variance().view(1, -1, 1, 1)
        return (0.5 * (var.log() + (mean - fm_t.float()).pow(2) / var)).mean()


def build(ctx):
    args = ctx.args
    if args.init_var <= 1e-6:
        raise ConfigError(f'vid: --init_var must exceed the variance floor 1e-6, got {args.init_var}')
    keys = ctx.stage_keys('vid')
    modules = []
    for key in keys:
        s_shape, t_shape = ctx.student_shapes[key], ctx.teacher_shapes[key]
        mid_ch = int(args.sf * t_shape[0])
        if mid_ch < 1:
            raise ConfigError(f'vid: --sf {args.sf} leaves {key} a regressor with no channels '
                              f'(int({args.sf} × {t_shape[0]}) = {mid_ch})')
        modules.append(VID(s_shape[0], mid_ch, t_shape[0], args.init_var))
    return FeatureDistiller(modules, keys, act='post')


register(Method(
    name='vid', title='variational information distillation', paper='https://arxiv.org/abs/1904.05835',
    transfers='every stage post-activation, one regressor per stage (the larger map pooled), mean',
    variant='hidden channels = output channels; no BN in the mean regressor',
    build=build,
    defaults={'lambda_kd': 1.0, 'sf': 1.0, 'init_var': 5.0},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 1.0, 'sf': 1.0, 'init_var': 5.0}},
    flags={'sf': Flag(float, 'VID regressor width: mid channels = int(sf × teacher channels)',
                      positive=True),
           'init_var': Flag(float, 'initial per-channel variance of VID', positive=True)},
))
