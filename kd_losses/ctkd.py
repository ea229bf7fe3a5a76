"""Curriculum temperature knowledge distillation (CTKD).

Li, Li, Yang, Zhao, Song, Luo, Li, Yang: "Curriculum Temperature for
Knowledge Distillation", AAAI 2023, https://arxiv.org/abs/2211.16231
(official code: zhengli97/CTKD)

Soft-target KD, T^2 * KL(softmax(t/T) || softmax(s/T)) averaged over the
batch, whose temperature is learned adversarially: a global learnable scalar
theta gives T = ctkd_t_min + ctkd_t_range * sigmoid(theta) (official:
t_start 1, t_end 20, so T lies in (1, 21); theta starts at 1, T at 15.6).
theta reaches the loss through a gradient-reversal layer: the forward pass
is the identity, the backward pass multiplies theta's gradient by -lambda,
so the optimiser that lowers the loss for the student raises it for the
temperature. lambda follows the paper's cosine curriculum over epochs
(counted from 1):

    lambda(e) = ctkd_lambda_max * (1 - cos(pi * min(e, R) / R)) / 2,   R = ctkd_ramp_epochs

rising from ~0 to ctkd_lambda_max at epoch R and staying there (official:
decay_max 0, decay_min -1, decay_loops 10, cosine). R is in epochs: 10 of
the paper's 240-epoch schedule stay 10 of the zoo's 200. lambda lives in a
tensor buffer refreshed by `begin_epoch` with fill_ (derived from the epoch,
so not checkpointed); theta is a parameter of the distiller, trained with
the student by the same SGD (weight decay included, as in the official code,
where it sits in the optimiser's trainable list) and saved with it.

Defaults: the official CIFAR-100 script (scripts/run_cifar_distill.sh:
-r 0.1 -a 0.9, i.e. CE weight 0.1 and KD weight 0.9; the global
temperature, the paper's default; t_start 1, t_end 20; cosine over 10
epochs up to 1). The paper gives no CIFAR-10 setting.

With --logit_stand (kd_losses/_logit_stand.py) both logits are z-scored per
sample before the learned temperature divides them, as in the logit
standardisation authors' CTKD code, and their CIFAR-100 setting for it, KD
weight 9 with CE weight 0.1, becomes the default (`--lambda_kd 9`).

Under --protocol crd (the CIFAR-100 benchmark): the same official CIFAR-100
script's settings (CE weight 0.1, KD weight 0.9, T in (1, 21), cosine ramp
over 10 of its 240 epochs up to 1).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._logit_stand import LOGIT_STAND, maybe_standardize
from .registry import ConfigError, Distiller, Flag, Method, register

__all__ = ['CTKD', 'GradientReversal']


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -strength, a
    0-dim tensor read when backward runs (no host sync)."""

    @staticmethod
    def forward(ctx, x, strength):
        ctx.save_for_backward(strength)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        strength, = ctx.saved_tensors
        return -strength.to(grad.dtype) * grad, None


def curriculum(epoch, ramp_epochs, lambda_max):
    """The reversal strength of epoch `epoch` (from 1): a cosine ramp from 0
    to lambda_max over ramp_epochs epochs, then flat."""
    if ramp_epochs <= 0:
        return float(lambda_max)
    e = min(max(epoch, 0), ramp_epochs)
    return lambda_max * (1.0 - math.cos(math.pi * e / ramp_epochs)) / 2.0


class CTKD(nn.Module):
    def __init__(self, t_min, t_range, logit_stand=False, theta=1.0):
        super().__init__()
        self.t_min, self.t_range = t_min, t_range
        self.logit_stand = bool(logit_stand)
        self.theta = nn.Parameter(torch.tensor(float(theta)))
        self.register_buffer('grl_strength', torch.zeros(()), persistent=False)

    def temperature(self):
        """The temperature the next step uses, through the reversal layer (0-dim tensor)."""
        theta = GradientReversal.apply(self.theta, self.grl_strength)
        return self.t_min + self.t_range * torch.sigmoid(theta)

    def forward(self, out_s, out_t):
        out_s, out_t = maybe_standardize(out_s.float(), out_t.float(), self.logit_stand)
        T = self.temperature()
        log_p_s = F.log_softmax(out_s / T, dim=1)
        log_p_t = F.log_softmax(out_t / T, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction='batchmean', log_target=True) * T * T


class CTKDDistiller(Distiller):
    def __init__(self, loss, ramp_epochs, lambda_max):
        super().__init__()
        self.ctkd, self.ramp_epochs, self.lambda_max = loss, ramp_epochs, lambda_max

    def begin_epoch(self, epoch, epochs):
        self.ctkd.grl_strength.fill_(curriculum(epoch, self.ramp_epochs, self.lambda_max))

    def forward(self, s, t, batch):
        return self.ctkd(s.out, t.out.detach())


def build(ctx):
    a = ctx.args
    if a.ctkd_t_min <= 0 or a.ctkd_t_range < 0:
        raise ConfigError(f'ctkd: the temperature range needs --ctkd_t_min > 0 and '
                          f'--ctkd_t_range >= 0, got {a.ctkd_t_min} and {a.ctkd_t_range}')
    if a.ctkd_ramp_epochs < 0 or a.ctkd_lambda_max < 0:
        raise ConfigError(f'ctkd: --ctkd_ramp_epochs ({a.ctkd_ramp_epochs}) and '
                          f'--ctkd_lambda_max ({a.ctkd_lambda_max}) must be >= 0')
    return CTKDDistiller(CTKD(a.ctkd_t_min, a.ctkd_t_range, a.logit_stand),
                         a.ctkd_ramp_epochs, a.ctkd_lambda_max)


register(Method(
    name='ctkd', title='curriculum temperature knowledge distillation',
    paper='https://arxiv.org/abs/2211.16231',
    transfers='logits, softened at a learned global temperature trained through gradient reversal',
    variant='cosine curriculum over 10 epochs of 200 (paper: of 240); --logit_stand: z-scored logits',
    build=build,
    defaults={'lambda_kd': 0.9, 'ce_weight': 0.1, 'ctkd_t_min': 1.0, 'ctkd_t_range': 20.0,
              'ctkd_ramp_epochs': 10, 'ctkd_lambda_max': 1.0, 'logit_stand': False},
    protocol_defaults={'crd': {'ce_weight': 0.1, 'lambda_kd': 0.9, 'ctkd_t_min': 1.0,
                               'ctkd_t_range': 20.0, 'ctkd_ramp_epochs': 10,
                               'ctkd_lambda_max': 1.0}},
    flags={'ctkd_t_min': Flag(float, 'ctkd: lowest temperature (T = t_min + t_range * '
                                     'sigmoid(theta))'),
           'ctkd_t_range': Flag(float, 'ctkd: span of the learned temperature above '
                                       'ctkd_t_min'),
           'ctkd_ramp_epochs': Flag(int, 'ctkd: epochs of the cosine ramp of the gradient '
                                         'reversal strength (0: full strength at once)',
                                         warms_up="the temperature curriculum's gradient reversal"),
           'ctkd_lambda_max': Flag(float, 'ctkd: final gradient reversal strength'),
           'logit_stand': LOGIT_STAND},
    switch_defaults={'logit_stand': {'lambda_kd': 9.0}},
))
