"""Attentive feature distillation.

Wang, Gao, Zhao, Li, Dou, Xu: "Pay Attention to Features, Transfer Learn
Faster CNNs", ICLR 2020, https://openreview.net/forum?id=ryxyCeHtPB

Per-channel weights ρ come from the teacher's map through an SE-style block
(global average pool, 1×1 conv, ReLU, 1×1 conv, sigmoid), normalised to sum
to 1 over channels. Both maps are L2-normalised over the spatial positions
of each channel (1e-6 added to the norm); the loss is
Σ_c ρ_c · mean_{H,W} (ŝ_c − t̂_c)², averaged over the batch. The seed's
variant: one module per stage (every stage both networks have,
`ctx.stage_keys`; post-activation), mid channels = int(att_f · channels),
the stage losses averaged.

Student and teacher maps must have the same shape: the paper transfers
between networks of one architecture (a pre-trained source and its
fine-tuned copy) and its attention weighs the teacher's channels one for one
against the student's, with no connector in the paper or its code. Pairs
whose maps differ (channels or size) raise ConfigError naming both shapes.

Under --protocol crd: the CIFAR-100 benchmark (RepDistiller, mdistiller) has
no AFD, so its weights are the seed's (CE weight 1, lambda 500).
"""
import torch
import torch.nn as nn

from .registry import ConfigError, FeatureDistiller, Flag, Method, register

__all__ = ['AFD']


class AFD(nn.Module):
    def __init__(self, in_ch, att_f):
        super().__init__()
        mid_ch = int(in_ch * att_f)
        self.attention = nn.Sequential(nn.Conv2d(in_ch, mid_ch, 1), nn.ReLU(),
                                       nn.Conv2d(mid_ch, in_ch, 1))
        for m in self.attention:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                nn.init.zeros_(m.bias)

    def channel_weights(self, fm_t):
        """ρ: [B, C], positive, each row summing to 1."""
        pooled = fm_t.float().mean(dim=(2, 3), keepdim=True)
        rho = torch.sigmoid(self.attention(pooled).float().flatten(1))
        return rho / rho.sum(dim=1, keepdim=True)

    @staticmethod
    def normalise(fm, eps=1e-6):
        fm = fm.float()
        return fm / (fm.norm(dim=(2, 3), keepdim=True) + eps)

    def forward(self, fm_s, fm_t):
        rho = self.channel_weights(fm_t)
        distance = (self.normalise(fm_s) - self.normalise(fm_t)).pow(2).mean(dim=(2, 3))
        return (rho * distance).sum(dim=1).mean()


def build(ctx):
    att_f = ctx.args.att_f
    keys = ctx.stage_keys('afd')
    modules = []
    for key in keys:
        s_shape, t_shape = tuple(ctx.student_shapes[key]), tuple(ctx.teacher_shapes[key])
        if s_shape != t_shape:
            raise ConfigError(f'afd: student and teacher {key} shapes differ '
                              f'({s_shape} vs {t_shape}); AFD compares the maps channel by '
                              'channel, with no connector')
        if int(t_shape[0] * att_f) < 1:
            raise ConfigError(f'afd: --att_f {att_f} leaves the {key} attention block no channels')
        modules.append(AFD(t_shape[0], att_f))
    return FeatureDistiller(modules, keys, act='post')


register(Method(
    name='afd', title='attentive feature distillation', paper='https://openreview.net/forum?id=ryxyCeHtPB',
    transfers='every stage post-activation, one attention block per stage, mean (equal shapes only)',
    variant='attention from an SE block, which the seed found more stable than the original',
    build=build,
    defaults={'lambda_kd': 500.0, 'att_f': 1.0},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 500.0}},
    flags={'att_f': Flag(float, 'AFD attention width: mid channels = int(att_f × channels)',
                         positive=True)},
))
