"""Activation boundaries.

Heo, Lee, Yun, Choi: "Knowledge Transfer via Distillation of Activation
Boundaries Formed by Hidden Neurons", AAAI 2019, https://arxiv.org/abs/1811.03233

On pre-activations with margin m, each position costs (s+m)² where the
teacher's neuron is off (t <= 0) but the student's is not safely off
(s > -m), and (s-m)² where the teacher's is on (t > 0) but the student's is
not safely on (s <= m); the loss is the mean. As in the seed, student and
teacher maps have the same shape (no connector), the mean replaces the
paper's sum, and AB only initialises the student: 'init' epochs on this loss
alone, then the normal schedule with cross-entropy only (see _two_phase).
"""
import torch.nn as nn

from ._two_phase import INIT_DEFAULTS, INIT_FLAGS, InitThenCE
from .registry import ConfigError, FeatureDistiller, Flag, Method, register

__all__ = ['AB']

STAGES = ('rb1', 'rb2', 'rb3')


class AB(nn.Module):
    def __init__(self, margin):
        super().__init__()
        self.margin = margin

    def forward(self, fm_s, fm_t):
        s, t, m = fm_s.float(), fm_t.float(), self.margin
        teacher_on = t > 0
        push_down = (s + m).pow(2) * ((s > -m) & ~teacher_on)
        push_up = (s - m).pow(2) * ((s <= m) & teacher_on)
        return (push_down + push_up).mean()


def build(ctx):
    if ctx.args.m < 0:
        raise ConfigError(f'ab: the margin --m must be >= 0, got {ctx.args.m}')
    for key in STAGES:
        if ctx.student_shapes[key] != ctx.teacher_shapes[key]:
            raise ConfigError(f'ab: student and teacher {key} shapes differ '
                              f'({ctx.student_shapes[key]} vs {ctx.teacher_shapes[key]}); '
                              'AB compares the maps position by position')
    return InitThenCE(FeatureDistiller(AB(ctx.args.m), STAGES, act='pre'))


register(Method(
    name='ab', title='activation boundaries (student initialisation, then CE)',
    paper='https://arxiv.org/abs/1811.03233',
    transfers='rb1..3 pre-activation, mean; init phase only',
    variant='two phases: 50 epochs of initialisation with the AB loss alone, then CE only (no soft targets)',
    build=build,
    defaults={'lambda_kd': 10.0, 'm': 2.0, **INIT_DEFAULTS},
    flags={'m': Flag(float, 'margin of the activation boundary loss (AB)'), **INIT_FLAGS},
))
