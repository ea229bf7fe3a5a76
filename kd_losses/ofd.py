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
One module per stage (every stage both networks have, `ctx.stage_keys`),
the stage losses averaged.

Across networks: the connector takes the student's channels to the
teacher's (the paper's design). Where the teacher's map is larger in space,
it is adaptively average-pooled to the student's size after its margin is
taken and before the clipping, as the CIFAR-100 benchmark's code does
(mdistiller distillers/OFD.py); equal sizes are compared as they are. A
student map larger than the teacher's raises ConfigError naming both shapes.

Under --protocol crd: CE weight 1 and the seed's OFD weight 0.5.
mdistiller's 0.001 (engine/cfg.py OFD.LOSS FEAT_WEIGHT, the paper's code's
`loss_distill.sum() / batch_size / 1000`) multiplies a per-sample sum over
channels and positions, stage k of K weighted 2^(k-K), where this loss is
the mean over entries averaged over the stages: the equivalent weight here
would depend on the pair (about 1e-3 * K * the last stage's C*H*W: 12 for
resnet56 -> resnet20, 49 for resnet32x4 -> resnet8x4), so no single number
reproduces it.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed import sum_over_processes

from .registry import ConfigError, FeatureDistiller, Method, register

__all__ = ['OFD']


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
        margin = self.margin(t)  # of the teacher's own map, before any pooling
        s = self.connector(fm_s).float()
        if t.shape[2:] != s.shape[2:]:  # a larger teacher map meets the student's size
            t = F.adaptive_avg_pool2d(t, s.shape[2:])
        t = torch.maximum(t, margin)
        same_after_relu = (s <= t) & (t <= 0)
        return ((s - t).pow(2) * ~same_after_relu).mean()


def build(ctx):
    keys = ctx.stage_keys('ofd')
    modules = []
    for key in keys:
        s_shape, t_shape = tuple(ctx.student_shapes[key]), tuple(ctx.teacher_shapes[key])
        if s_shape[1] > t_shape[1] or s_shape[2] > t_shape[2]:
            raise ConfigError(f'ofd: the student {key} {s_shape} is larger in space than the '
                              f'teacher {key} {t_shape}; the 1×1 connector keeps the size and '
                              'only a larger teacher map is pooled')
        modules.append(OFD(s_shape[0], t_shape[0]))
    return FeatureDistiller(modules, keys, act='pre')


register(Method(
    name='ofd', title='overhaul of feature distillation', paper='https://arxiv.org/abs/1904.01866',
    transfers='every stage pre-activation, one connector per stage (a larger teacher map pooled), mean',
    variant="margin from the batch's negative teacher pre-activations, not from BN statistics",
    build=build,
    defaults={'lambda_kd': 0.5},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 0.5}},
))
