"""Knowledge review.

Chen, Liu, Zhao, Jia: "Distilling Knowledge via Knowledge Review", CVPR 2021,
https://arxiv.org/abs/2104.09044

The student's levels, shallow to deep, are every stage's post-activation
(rb1..rbN) and the pooled feature `feat` as a 1x1 map; the teacher's are its
stages' pre-activations and its `feat` (as the official CIFAR-100 code and
mdistiller read them). Stage counts must match (ConfigError otherwise).

Review path, deepest level first: each level has an attention-based fusion
(ABF) module. It maps the student level to `mid` channels (1x1 conv + BN,
mid = min(512, student feat channels)); except at the deepest level it fuses
that map with the residual passed up from the level below, upsampled to the
student map's size (nearest): two sigmoid weights per position from a 1x1 conv
(with bias) over the concatenation, x * w0 + residual * w1. The fused map is
resized (nearest) to the teacher level's size when they differ, becomes the
residual for the next shallower level, and a 3x3 conv + BN gives the output
with the teacher level's channels.

Hierarchical context loss (HCL) per level: the MSE of output and teacher map
plus the MSE of both adaptively average-pooled to 4x4, 2x2 and 1x1 (only the
sizes smaller than the map's height), each pooled term weighted half the one
before it (1 for the full map, then 1/2, 1/4, 1/8), divided by the sum of
the weights used. The KD loss is the sum over
levels; each level's HCL is logged as a term (train_kd_rb1, ..., train_kd_feat).

The KD weight warms up linearly over `reviewkd_warmup` epochs, in epochs
whatever the schedule's length: epoch e (from 1) has min(e / warmup, 1), as
mdistiller; the authors' script counts epochs from 0, so its first epoch has
weight 0 and every later one the weight of the epoch before here.

Defaults: lambda_kd 5 (authors' script CIFAR-100/script/reviewKD.sh for
wrn_40_2 -> wrn_16_2/wrn_40_1/ShuffleV1 and resnet32x4 -> resnet8x4/ShuffleV1,
and mdistiller configs/cifar100/reviewkd.yaml); the script uses 8 for
resnet32x4 -> ShuffleV2, 0.6 for resnet56 -> resnet20, 1 for resnet110 ->
resnet32. The official runs use 240 epochs, lr 0.1 (0.02 for ShuffleNet and
MobileNet students), batch 128 and weight decay 5e-4; here the zoo's schedule.
Departures: the level shapes come from the networks instead of per-family
tables (the same values for the official pairs); HCL runs in float32.

Under --protocol crd (the CIFAR-100 benchmark): CE weight 1, weight 5,
warm-up 20 (mdistiller configs/cifar100/reviewkd.yaml REVIEWKD_WEIGHT 5 and
engine/cfg.py REVIEWKD CE_WEIGHT 1, WARMUP_EPOCHS 20), and for each pair of
the authors' script its own weight (`pair_defaults`, named in the log:
dvlab-research/ReviewKD CIFAR-100/script/reviewKD.sh, the line of the pair's
`--kd-loss-weight`). The benchmark pairs the script leaves out
(resnet110->resnet20, vgg13->vgg8, vgg13/ResNet50->MobileNetV2,
ResNet50->vgg8) keep weight 5.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import ConfigError, Distiller, Flag, Method, PairSetting, pick, register

__all__ = ['ABF', 'HCL', 'ReviewKD']

PYRAMID = (4, 2, 1)


class ABF(nn.Module):
    """Attention-based fusion of one student level with the residual from the
    level below it; returns (output for the loss, residual for the level above)."""

    def __init__(self, in_ch, mid_ch, out_ch, fuse):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_ch, mid_ch, 1, bias=False), nn.BatchNorm2d(mid_ch))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_ch, out_ch, 3, 1, 1, bias=False),
                                   nn.BatchNorm2d(out_ch))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_ch, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, residual=None, out_size=None):
        x = self.conv1(x)
        if self.att_conv is not None:
            residual = F.interpolate(residual, size=tuple(x.shape[-2:]), mode='nearest')
            w = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * w[:, 0:1] + residual * w[:, 1:2]
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode='nearest')
        return self.conv2(x), x


class HCL(nn.Module):
    """Hierarchical context loss of one level, in float32."""

    def forward(self, fs, ft):
        fs, ft = fs.float(), ft.float()
        loss, weight, total = F.mse_loss(fs, ft), 1.0, 1.0
        for size in PYRAMID:
            if size >= fs.shape[2]:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, size),
                                              F.adaptive_avg_pool2d(ft, size))
            total += weight
        return loss / total


class ReviewKD(Distiller):
    def __init__(self, student_shapes, teacher_shapes, stages, warmup):
        super().__init__()
        self.stages, self.warmup = tuple(stages), warmup
        self.levels = self.stages + ('feat',)
        self.loss_terms = self.levels
        in_ch = [student_shapes[k][0] for k in self.levels]
        out_ch = [teacher_shapes[k][0] for k in self.levels]
        mid = min(512, in_ch[-1])
        last = len(self.levels) - 1
        self.abfs = nn.ModuleList([ABF(c_in, mid, c_out, i < last)
                                   for i, (c_in, c_out) in enumerate(zip(in_ch, out_ch))])
        self.out_sizes = [tuple(teacher_shapes[k][1:]) for k in self.stages] + [(1, 1)]
        self.hcl = HCL()

    def kd_weight(self, epoch, epochs):
        return min(epoch / self.warmup, 1.0) if self.warmup > 0 else 1.0

    def review(self, s):
        """The ABF outputs, shallow to deep, from the student's features."""
        maps = [pick(s, k, 'post') for k in self.stages] + [s.feat[:, :, None, None]]
        results, residual = [None] * len(maps), None
        for i in reversed(range(len(maps))):  # deepest level first
            results[i], residual = self.abfs[i](maps[i], residual, self.out_sizes[i])
        return results

    def forward(self, s, t, batch):
        targets = [pick(t, k, 'pre').detach() for k in self.stages] + [t.feat.detach()[:, :, None, None]]
        return {level: self.hcl(out, target)
                for level, out, target in zip(self.levels, self.review(s), targets)}


def build(ctx):
    if ctx.args.reviewkd_warmup < 0:
        raise ConfigError(f'reviewkd: --reviewkd_warmup must be >= 0, got {ctx.args.reviewkd_warmup}')
    stages = ctx.stage_keys('reviewkd')
    return ReviewKD(ctx.student_shapes, ctx.teacher_shapes, stages, ctx.args.reviewkd_warmup)


register(Method(
    name='reviewkd', title='knowledge review (ABF fusion + hierarchical context loss)',
    paper='https://arxiv.org/abs/2104.09044',
    transfers='rb1..N post-activation and feat (student) through ABF fusion, deepest first; '
              'teacher rb1..N pre-activation and feat; HCL summed over levels',
    variant='linear KD warm-up from 1/warmup in the first epoch (mdistiller); lambda per pair under '
            '--protocol crd only (else 5)',
    build=build,
    defaults={'lambda_kd': 5.0, 'reviewkd_warmup': 20},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 5.0, 'reviewkd_warmup': 20}},
    flags={'reviewkd_warmup': Flag(int, 'reviewkd: epochs over which the KD weight rises '
                                        'linearly to lambda_kd (0: none)', warms_up='the KD weight')},
    pair_defaults={f'{teacher}:{student}': PairSetting(
        {'lambda_kd': weight}, f'ReviewKD CIFAR-100/script/reviewKD.sh line {line}')
        for teacher, student, weight, line in (
            ('wrn_40_2', 'wrn_16_2', 5.0, 1), ('wrn_40_2', 'wrn_40_1', 5.0, 3),
            ('wrn_40_2', 'ShuffleV1', 5.0, 5), ('resnet32x4', 'resnet8x4', 5.0, 7),
            ('resnet32x4', 'ShuffleV1', 5.0, 9), ('resnet32x4', 'ShuffleV2', 8.0, 11),
            ('resnet56', 'resnet20', 0.6, 13), ('resnet110', 'resnet32', 1.0, 15))},
))
