"""Class attention transfer.

Guo, Yan, Li, Lin: "Class Attention Transfer Based Knowledge Distillation",
CVPR 2023, https://arxiv.org/abs/2304.12777

Class activation maps (CAMs) of the map each classifier reads: for each
class k, CAM_k = sum_c W[k, c] * F_c, with F the network's head map (the
last stage's post-activation map; in MobileNetV2 and ShuffleV2 the output of
their extra 1x1 conv + BN + ReLU after it, `net.head_map`, networks/base.py,
recomputed without counting the batch in its BN statistics again) and W the
weight of the network's own classifier (the classifier is a 1x1 conv
without bias applied before the global pooling in the official networks,
the same linear map). The student's CAMs use its own head's weight (trained,
so CAT also trains the student's classifier); the teacher's use its frozen
head, read functionally. Both sets of CAMs are average-pooled to
cat_resolution x cat_resolution (adaptively, so different map sizes meet),
optionally L2-normalised per CAM over its positions (cat_normalize), and the
loss is their MSE. The pooling is applied to the maps before the classifier
weights: the same CAMs (both steps are linear), at a fraction of the cost.

Defaults are the official config for resnet56 -> resnet20, the zoo's own
student (GzyAftermath/CAT-KD configs/cifar100/CAT_KD/res56_res20.yaml: beta
0.7, resolution 2, no normalisation, CE weight 1). Other official pairs:
resnet32x4 -> resnet8x4 15, resnet110 -> resnet32 1.8, wrn_40_2 -> wrn_16_2
12, wrn_40_2 -> wrn_40_1 1.5, vgg13 -> vgg8 4.5 (resolution 2, no
normalisation);
wrn_40_2 -> ShuffleV1 80 and resnet32x4 -> ShuffleV1/ShuffleV2 600
(resolution 4, normalised); vgg13 -> MobileNetV2 15 and ResNet50 ->
MobileNetV2 40 (resolution 2, normalised). The official runs use 240 epochs,
lr 0.05 (0.01 for ShuffleNet/MobileNet students), batch 64.

Under --protocol crd (the CIFAR-100 benchmark's schedule): the same official
resnet56 -> resnet20 setting (CE weight 1, beta 0.7, resolution 2, no
normalisation), and for each pair above its own official config
(`pair_defaults`: beta as lambda_kd, CAM_RESOLUTION as cat_resolution,
IF_NORMALIZE as cat_normalize; GzyAftermath/CAT-KD
configs/cifar100/CAT_KD/<pair>.yaml, the `CAT_KD: LOSS:` block), named in
the log. The 13 benchmark pairs without an official config
(resnet110->resnet20, ResNet50->vgg8) keep the resnet56 -> resnet20 setting.

Departures: the official student's classifier is a bias-free 1x1 conv; ours
keeps its Linear head with bias (the bias is not part of the CAM). Loss in
float32.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.base import last_stage

from .registry import ConfigError, Distiller, Flag, Method, PairSetting, pick, register

__all__ = ['CATKD']


class CATKD(nn.Module):
    def __init__(self, resolution, normalize):
        super().__init__()
        self.resolution, self.normalize = resolution, normalize

    def cams(self, fm, weight):
        """[B, K, r, r]: the classifier's CAMs, average-pooled to r x r."""
        pooled = F.adaptive_avg_pool2d(fm.float(), self.resolution)
        cam = torch.einsum('kc,bchw->bkhw', weight.float(), pooled)
        if self.normalize:
            cam = F.normalize(cam.flatten(2), dim=2).view_as(cam)
        return cam

    def forward(self, fm_s, weight_s, fm_t, weight_t):
        with torch.autocast(fm_s.device.type, enabled=False):
            return F.mse_loss(self.cams(fm_s, weight_s), self.cams(fm_t, weight_t))


class CATKDDistiller(Distiller):
    def __init__(self, ctx, resolution, normalize):
        super().__init__()
        if ctx.student is None or ctx.teacher is None:
            raise ConfigError("catkd reads both networks' classifiers: the context must give them")
        self.s_key, self.t_key = last_stage(ctx.student_shapes), last_stage(ctx.teacher_shapes)
        s_shape, t_shape = tuple(ctx.student.head_map_shape), tuple(ctx.teacher.head_map_shape)
        for who, net, shape in (('student', ctx.student, s_shape), ('teacher', ctx.teacher, t_shape)):
            if net.head.in_features != shape[0]:  # a network whose head_map is not what its head reads
                raise ConfigError(f"catkd: the {who}'s classifier reads {net.head.in_features} "
                                  f'features, not its head map pooled (student head map {s_shape}, '
                                  f'teacher head map {t_shape})')
        if ctx.student.head.out_features != ctx.teacher.head.out_features:
            raise ConfigError('catkd: student and teacher classify different numbers of classes')
        self.cat = CATKD(resolution, normalize)
        self.nets = (ctx.student, ctx.teacher)  # a plain tuple: their heads are read, not owned

    def forward(self, s, t, batch):
        student, teacher = self.nets
        with torch.no_grad():  # detached too where head_map is the map itself
            fm_t = teacher.head_map(pick(t, self.t_key, 'post')).detach()
        return self.cat(student.head_map(pick(s, self.s_key, 'post')), student.head.weight,
                        fm_t, teacher.head.weight.detach())


def build(ctx):
    return CATKDDistiller(ctx, ctx.args.cat_resolution, ctx.args.cat_normalize)


register(Method(
    name='catkd', title='class attention transfer', paper='https://arxiv.org/abs/2304.12777',
    transfers="the map each net's classifier averages (last stage post-activation; MobileNetV2/"
              "ShuffleV2: their extra 1x1 conv's) x its classifier weights (class activation maps), "
              'average-pooled, MSE',
    variant="official resnet56->resnet20 settings (beta 0.7), per pair under --protocol crd; "
            "the student's head keeps its bias",
    build=build,
    defaults={'lambda_kd': 0.7, 'cat_resolution': 2, 'cat_normalize': False},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 0.7, 'cat_resolution': 2,
                               'cat_normalize': False}},
    flags={'cat_resolution': Flag(int, 'catkd: CAMs are average-pooled to this size (square)',
                                  positive=True),
           'cat_normalize': Flag(bool, 'catkd: L2-normalise each CAM over its positions')},
    # GzyAftermath/CAT-KD configs/cifar100/CAT_KD/*.yaml: (CAT_loss_weight, CAM_RESOLUTION,
    # IF_NORMALIZE) of each official pair, CE_WEIGHT 1 in all
    pair_defaults={f'{teacher}:{student}': PairSetting(
        {'lambda_kd': beta, 'cat_resolution': resolution, 'cat_normalize': normalize},
        f'CAT-KD configs/cifar100/CAT_KD/{config}.yaml')
        for teacher, student, config, beta, resolution, normalize in (
            ('resnet56', 'resnet20', 'res56_res20', 0.7, 2, False),
            ('resnet110', 'resnet32', 'res110_res32', 1.8, 2, False),
            ('resnet32x4', 'resnet8x4', 'res32x4_res8x4', 15.0, 2, False),
            ('resnet32x4', 'ShuffleV1', 'res32x4_shuv1', 600.0, 4, True),
            ('resnet32x4', 'ShuffleV2', 'res32x4_shuv2', 600.0, 4, True),
            ('ResNet50', 'MobileNetV2', 'res50_mv2', 40.0, 2, True),
            ('vgg13', 'vgg8', 'vgg13_vgg8', 4.5, 2, False),
            ('vgg13', 'MobileNetV2', 'vgg13_mv2', 15.0, 2, True),
            ('wrn_40_2', 'wrn_16_2', 'wrn_40_2_wrn_16_2', 12.0, 2, False),
            ('wrn_40_2', 'wrn_40_1', 'wrn_40_2_wrn_40_1', 1.5, 2, False),
            ('wrn_40_2', 'ShuffleV1', 'wrn40_2_shuv1', 80.0, 4, True))},
))
