"""Overhaul of feature distillation.

Heo, Kim, Yun, Park, Kwak, Choi: "A Comprehensive Overhaul of Feature
Distillation", ICCV 2019, https://arxiv.org/abs/1904.01866

Distils pre-ReLU maps. The teacher map is clipped from below at a
per-channel margin, the expected value of its negative responses; the
student map passes a 1×1 conv + BN connector; the squared difference is
ignored where the student is already below a non-positive target
(s <= t <= 0: the ReLU would give the same output), and the loss is the mean
over all entries. The paper derives the margin from the teacher's BN
statistics; rb pre-activations are a BN output plus the residual, so, as the
seed does, the margin is estimated from the current batch (mean of the
teacher's negative values per channel) — nothing to keep between batches.
One module per stage rb1..3, the three losses averaged.
"""
import torch
import torch.nn as nn

from distributed import sum_over_processes

from .registry import ConfigError, FeatureDistiller, Method, register

__all__ = ['OFD']

STAGES = ('rb1', 'rb2', 'rb3')


class OFD(nn.Module):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.connector = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False),
                                       nn.BatchNorm2d(out_ch))
        nn.init.kaiming_normal_(self.connector[0].weight, mode='fan_out', nonlinearity='relu')

    @staticmethod
    def margin(fm_t, eps=1e-6):
        """Per-channel mean of the negative entries ([1, C, 1, 1]; 0 where there
        are none), over the global batch under torchrun."""
        negative = (fm_t < 0).float()
        total = sum_over_processes((fm_t * negative).sum(dim=(0, 2, 3), keepdim=True))
        return total / (sum_over_processes(negative.sum(dim=(0, 2, 3), keepdim=True)) + eps)

    def forward(self, fm_s, fm_t):
        t = fm_t.float()
        t = torch.maximum(t, self.margin(t))
        s = self.connector(fm_s).float()
        same_after_relu = (s <= t) & (t <= 0)
        return ((s - t).pow(2) * ~same_after_relu).mean()


def build(ctx):
    modules = []
    for key in STAGES:
        s_shape, t_shape = ctx.student_shapes[key], ctx.teacher_shapes[key]
        if s_shape[1:] != t_shape[1:]:
            raise ConfigError(f'ofd: student and teacher {key} spatial sizes differ '
                              f'({s_shape} vs {t_shape}); the 1×1 connector keeps the size')
        modules.append(OFD(s_shape[0], t_shape[0]))
    return FeatureDistiller(modules, STAGES, act='pre')


register(Method(
    name='ofd', title='overhaul of feature distillation', paper='https://arxiv.org/abs/1904.01866',
    transfers='rb1..3 pre-activation, one connector per stage, mean',
    variant="margin from the batch's negative teacher pre-activations, not from BN statistics",
    build=build,
    defaults={'lambda_kd': 0.5},
))
