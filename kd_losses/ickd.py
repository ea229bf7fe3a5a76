"""Inter-channel correlation.

Liu, Huang, Lin, Xie, Wang, Chang, Liang: "Exploring Inter-Channel
Correlation for Diversity-preserved Knowledge Distillation", ICCV 2021,
https://arxiv.org/abs/2202.03680

The student's last-stage post-activation map passes a learnable embedding to
the teacher's channel count (1x1 conv without bias, BN). For each sample the
inter-channel correlation is the Gram matrix of its channels, G = F F^T with
F the [C, H*W] map, each row L2-normalised; the teacher's is computed from its
own last-stage map (spatial sizes may differ: G is C x C). The loss is
sum over samples and entries of (G_s - G_t)^2 / (C * B).

Defaults from the official CIFAR-100 code (ADLab-AutoDrive/ICKD
Cifar100/README.md and scripts/run_cifar_distill.sh, ICKD without KL:
`-a 0 -b 2.5`): lambda 2.5, CE weight 1. The official runs use 240 epochs,
lr 0.05, batch 64. Departures: the official code also builds a teacher-side
embedding that the loss never uses (left out); Gram matrices in float32 with
the usual 1e-12 floor in the normalisation.

Under --protocol crd (the CIFAR-100 benchmark's schedule, the official one):
the same official weights (CE weight 1, lambda 2.5).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.base import last_stage

from .registry import Distiller, Method, pick, register

__all__ = ['ICKD']


def channel_correlation(fm):
    """[B, C, C]: each sample's channel Gram matrix, rows L2-normalised (float32)."""
    f = fm.float().flatten(2)
    return F.normalize(torch.bmm(f, f.transpose(1, 2)), dim=2)


class ICKD(nn.Module):
    def __init__(self, s_ch, t_ch):
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(s_ch, t_ch, 1, bias=False), nn.BatchNorm2d(t_ch))

    def forward(self, fm_s, fm_t):
        e = self.embed(fm_s)
        with torch.autocast(e.device.type, enabled=False):
            diff = channel_correlation(e) - channel_correlation(fm_t)
            return diff.pow(2).sum() / (diff.shape[1] * diff.shape[0])


class ICKDDistiller(Distiller):
    def __init__(self, ctx):
        super().__init__()
        self.s_key, self.t_key = last_stage(ctx.student_shapes), last_stage(ctx.teacher_shapes)
        self.ickd = ICKD(ctx.student_shapes[self.s_key][0], ctx.teacher_shapes[self.t_key][0])

    def forward(self, s, t, batch):
        return self.ickd(pick(s, self.s_key, 'post'), pick(t, self.t_key, 'post').detach())


register(Method(
    name='ickd', title='inter-channel correlation', paper='https://arxiv.org/abs/2202.03680',
    transfers='last stage post-activation (student through a 1x1 conv + BN embedding): '
              'row-normalised channel Gram matrices, squared error',
    variant='ICKD without the KL term, as the official CIFAR-100 "ICKD-C (w/o KL)"',
    build=ICKDDistiller,
    defaults={'lambda_kd': 2.5},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 2.5}},
))
