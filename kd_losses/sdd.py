"""Scale decoupled distillation, on KD (`sdd_kd`) and on DKD (`sdd_dkd`).

Wei, Luo, Luo: "Scale Decoupled Distillation", CVPR 2024,
https://arxiv.org/abs/2403.13512 (official code: shicaiwei123/SDD-CVPR2024)

Each network's head map (the map its classifier reads, averaged) is
average-pooled at several scales s (--sdd_scales, e.g. 1,2,4: the whole map,
its 2x2 quarters and its 4x4 sixteenths, N = 1 + 4 + 16 regions in that
order, each grid row by row), and each region's pooled vector goes through
the network's own classifier (weight and bias): N logit vectors per sample.
The student's head is trained by this loss; the teacher's is frozen.

The head map is the last stage's post-activation map, except in MobileNetV2
and ShuffleV2, whose classifier reads the average of an extra 1x1 conv + BN
+ ReLU after the last stage (the official code pools that conv's output):
there `net.head_map` (networks/base.py) runs that conv again on the last
stage's map. Same input, and its BN normalises by the same batch statistics
(train mode) or the same running ones (eval mode) without counting the
batch again: the forward's map exactly. The cost is one more 1x1 conv on a
2x2 (MobileNetV2) or 4x4 (ShuffleV2) map; the student's conv is trained by
this loss too, as in the official code.

The base loss (KD's T^2 * KL(softmax(t/T) || softmax(s/T)), or DKD's
alpha * TCKD + beta * NCKD, kd_losses/dkd.py) is computed for every
(sample, region) pair and summed over classes only. Each pair is weighted by
whether the teacher's region prediction agrees with its global one
(region 0, the 1x1 scale): where both are right or both wrong (consistent)
the weight is 1; where one is right and the other wrong (complementary) it
is --sdd_complementary (2 in the official code). The loss is the weighted
sum divided by N * B, the number of pairs (official KD.py sdd_kd_loss,
lines 16-98, and SDD_DKD.py multi_dkd, lines 39-124, whose dkd_loss divides
by N * B inside, lines 9-36). With --sdd_scales 1 this is plain KD or DKD.

The pooling is the official SPP module's (mdistiller/models/cifar/utils.py
lines 5-39; resnet.py lines 202-209): the map adaptively average-pooled to a
4x4 grid whatever the scales (a 2x2 map, MobileNetV2's, has each pixel
repeated 2x2), each scale pooled from that grid. Adaptive pooling takes any
map size, as there.

Defaults: sdd_kd the official KD settings (engine/cfg.py lines 61-64: CE
weight 0.1, KD weight 0.9, T 4; no warm-up: KD.py line 142 leaves it out);
sdd_dkd the official DKD settings (engine/cfg.py lines 162-167: CE weight 1,
alpha 1, beta 8, T 4) with the 20-epoch linear warm-up of the KD weight
(train_origin.py line 198, --warmup 20, applied in SDD_DKD.py line 177);
scales 1,2,4 (the README's command and the shell scripts' --M [1,2,4]),
complementary weight 2 (KD.py lines 87-90). The same under --protocol crd.

Per-pair official CIFAR-100 settings, applied under --protocol crd
(`pair_defaults`; configs/cifar100/sdd_{kd,dkd}/*.yaml and the --M of
teacher_resnet32x4.sh, teacher_vgg.sh): --sdd_scales 1,2 for
resnet32x4 -> resnet8x4 (sdd_kd) and vgg13 -> vgg8 (both); for sdd_dkd,
--dkd_beta 2 for resnet56 -> resnet20 and resnet110 -> resnet32, --dkd_beta 6
for vgg13 -> vgg8 / ShuffleV1 / MobileNetV2 and wrn_40_2 -> wrn_16_2 /
wrn_40_1 / MobileNetV2. The other pairs keep beta 8, resnet32x4 ->
MobileNetV2 included: its script line (teacher_unpair.sh line 16) runs
res32x4_mv2.yaml, which sets none (the beta 6 of resnet32_mobinetv2.yaml is
a config for the plain models, type GL_DKD, that no script runs).
MobileNetV2 and ShuffleV2 students run at scales 1,2,4 there, the default
(teacher_vgg.sh, teacher_resnet32x4.sh, teacher_unpair.sh, teacher_wrn.sh).
The official runs use 240 epochs, lr 0.05 (0.01 for ShuffleNet/MobileNet
students), batch 64: --protocol crd.

Departures: the official code zeroes NaN entries of the KL and replaces a
non-finite loss by 0 on the host; here the KL is computed in log space
(finite wherever the logits are) and nothing is read back. DKD's terms are
computed in log space as in kd_losses/dkd.py. Loss in float32.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.base import last_stage

from .dkd import DKD, check_settings as check_dkd_settings
from .registry import METHODS, ConfigError, Distiller, Flag, Method, PairSetting, pick, register

__all__ = ['SDD', 'region_pool']

SCALES = ('1,2,4', '1,2', '1')
GRID = 4  # the official SPP pools every map to 4x4 first, whatever the scales


def region_pool(fm, scales):
    """[B, C, N]: the map average-pooled at each scale, coarsest first, each
    grid flattened row by row; every scale is pooled from the map's 4x4
    adaptive average (a 2x2 map's pixels each repeated 2x2)."""
    grid = F.adaptive_avg_pool2d(fm, GRID)
    return torch.cat([(grid if s == GRID else F.adaptive_avg_pool2d(grid, s)).flatten(2)
                      for s in scales], dim=2)


def region_logits(fm, weight, bias, scales):
    """[B, N, K]: each region's pooled vector through the classifier."""
    return F.linear(region_pool(fm.float(), scales).transpose(1, 2), weight.float(),
                    None if bias is None else bias.float())


class SDD(nn.Module):
    """The weighted multi-scale loss on region logits [B, N, K] (region 0 the
    global one), with KD (`dkd` None) or DKD (a kd_losses.dkd.DKD) as the
    base loss. Returns {'kd': ...} or {'tckd': ..., 'nckd': ...}."""

    def __init__(self, T, complementary, dkd=None):
        super().__init__()
        self.T, self.complementary, self.dkd = T, complementary, dkd

    def region_weights(self, out_t, target):
        """[B, N]: 1 where the teacher's region prediction is right exactly when
        its global one is, `complementary` where they differ."""
        right = out_t.argmax(dim=2) == target[:, None]
        return 1.0 + (self.complementary - 1.0) * (right != right[:, :1]).float()

    def forward(self, out_s, out_t, target):
        with torch.autocast(out_s.device.type, enabled=False):
            out_s, out_t = out_s.float(), out_t.float()
            b, n, k = out_s.shape
            weight = self.region_weights(out_t, target).reshape(-1) / (b * n)
            rows_s, rows_t = out_s.reshape(-1, k), out_t.reshape(-1, k)
            rows_target = target.repeat_interleave(n)
            if self.dkd is None:
                kl = F.kl_div(F.log_softmax(rows_s / self.T, dim=1),
                              F.log_softmax(rows_t / self.T, dim=1),
                              reduction='none', log_target=True).sum(1) * self.T ** 2
                return {'kd': (weight * kl).sum()}
            terms = self.dkd.sample_terms(rows_s, rows_t, rows_target)
            return {name: (weight * value).sum() for name, value in terms.items()}


class SDDDistiller(Distiller):
    def __init__(self, ctx, mode, loss, scales, warmup=0):
        super().__init__()
        if ctx.student is None or ctx.teacher is None:
            raise ConfigError(f"{mode} reads both networks' classifiers: the context must give them")
        self.s_key, self.t_key = last_stage(ctx.student_shapes), last_stage(ctx.teacher_shapes)
        s_shape, t_shape = tuple(ctx.student.head_map_shape), tuple(ctx.teacher.head_map_shape)
        both = f'(student head map {s_shape}, teacher head map {t_shape})'
        for who, net, shape in (('student', ctx.student, s_shape), ('teacher', ctx.teacher, t_shape)):
            if net.head.in_features != shape[0]:  # a network whose head_map is not what its head reads
                raise ConfigError(f"{mode}: the {who}'s classifier reads {net.head.in_features} "
                                  f'features, not its head map pooled {both}')
        if ctx.student.head.out_features != ctx.teacher.head.out_features:
            raise ConfigError(f'{mode}: student and teacher classify different numbers of classes')
        self.sdd, self.scales, self.warmup = loss, scales, warmup
        self.loss_terms = ('tckd', 'nckd') if loss.dkd is not None else ()
        self.nets = (ctx.student, ctx.teacher)  # a plain tuple: their heads are read, not owned

    def kd_weight(self, epoch, epochs):
        return 1.0 if self.warmup <= 0 else min(epoch / self.warmup, 1.0)

    def forward(self, s, t, batch):
        student, teacher = self.nets
        out_s = region_logits(student.head_map(pick(s, self.s_key, 'post')), student.head.weight,
                              student.head.bias, self.scales)
        with torch.no_grad():
            out_t = region_logits(teacher.head_map(pick(t, self.t_key, 'post')), teacher.head.weight,
                                  teacher.head.bias, self.scales)
        terms = self.sdd(out_s, out_t, batch.target)
        return terms['kd'] if self.sdd.dkd is None else terms


def scales_of(args):
    return tuple(int(s) for s in args.sdd_scales.split(','))


def check(mode, args):
    if args.sdd_complementary < 0:
        raise ConfigError(f'{mode}: --sdd_complementary must be >= 0, got {args.sdd_complementary}')


def build_kd(ctx):
    check('sdd_kd', ctx.args)
    return SDDDistiller(ctx, 'sdd_kd', SDD(ctx.args.T, ctx.args.sdd_complementary), scales_of(ctx.args))


def build_dkd(ctx):
    a = ctx.args
    check('sdd_dkd', a)
    check_dkd_settings('sdd_dkd', a, ctx.num_class)
    loss = SDD(a.T, a.sdd_complementary, DKD(a.dkd_alpha, a.dkd_beta, a.T))
    return SDDDistiller(ctx, 'sdd_dkd', loss, scales_of(a), a.dkd_warmup)


FLAGS = {'sdd_scales': Flag(str, 'sdd: the pooling scales of the map each classifier averages (1: '
                                 'the whole map, 2: its quarters, 4: its 4x4 grid)', choices=SCALES),
         'sdd_complementary': Flag(float, 'sdd: weight of the regions whose teacher prediction is '
                                          'right where the global one is wrong, or wrong where it '
                                          'is right')}
SDD_DEFAULTS = {'sdd_scales': '1,2,4', 'sdd_complementary': 2.0}
KD_SETTINGS = {'ce_weight': 0.1, 'lambda_kd': 0.9, 'T': 4.0, **SDD_DEFAULTS}
DKD_SETTINGS = {'ce_weight': 1.0, 'lambda_kd': 1.0, 'dkd_alpha': 1.0, 'dkd_beta': 8.0, 'T': 4.0,
                'dkd_warmup': 20, **SDD_DEFAULTS}
DKD_FLAGS = METHODS['dkd'].flags  # the same flags as dkd's, with the same meaning

# The official per-pair CIFAR-100 settings (SDD-CVPR2024), applied under
# --protocol crd: the pooling scales its shell scripts run a pair with (--M)
# and DKD's beta in the pair's config.
def beta_source(config, line=19):
    return f'SDD-CVPR2024 configs/cifar100/sdd_dkd/{config}.yaml line {line} (DKD.BETA)'


KD_PAIRS = {
    'resnet32x4:resnet8x4': PairSetting({'sdd_scales': '1,2'}, 'SDD-CVPR2024 teacher_resnet32x4.sh line 24 '
                                                              '(--M [1,2])'),
    'vgg13:vgg8': PairSetting({'sdd_scales': '1,2'}, 'SDD-CVPR2024 teacher_vgg.sh line 29 (--M [1,2])')}
DKD_PAIRS = {
    'vgg13:vgg8': PairSetting({'sdd_scales': '1,2', 'dkd_beta': 6.0},
                              f"SDD-CVPR2024 teacher_vgg.sh line 11 (--M [1,2]); {beta_source('vgg13_vgg8')}"),
    **{pair: PairSetting({'dkd_beta': beta}, beta_source(*config))
       for pair, config, beta in (('resnet56:resnet20', ('res56_res20',), 2.0),
                                  ('resnet110:resnet32', ('res110_res32',), 2.0),
                                  ('wrn_40_2:wrn_16_2', ('wrn40_2_wrn_16_2',), 6.0),
                                  ('wrn_40_2:wrn_40_1', ('wrn40_2_wrn_40_1',), 6.0),
                                  ('wrn_40_2:MobileNetV2', ('wrn40_2_mv2', 20), 6.0),
                                  ('vgg13:MobileNetV2', ('vgg13_mv2',), 6.0),
                                  ('vgg13:ShuffleV1', ('vgg13_shuffv1',), 6.0))}}

register(Method(
    name='sdd_kd', title='scale decoupled distillation on KD', paper='https://arxiv.org/abs/2403.13512',
    transfers="the map each net's classifier averages (last stage post-activation; MobileNetV2/"
              "ShuffleV2: their extra 1x1 conv's) pooled at scales 1,2,4, each region through the "
              'classifier; KD per region, complementary regions weighted 2',
    variant='per-pair scales under --protocol crd only',
    build=build_kd,
    defaults=KD_SETTINGS,
    protocol_defaults={'crd': KD_SETTINGS},
    pair_defaults=KD_PAIRS,
    flags={'T': DKD_FLAGS['T'], **FLAGS},
))

register(Method(
    name='sdd_dkd', title='scale decoupled distillation on DKD', paper='https://arxiv.org/abs/2403.13512',
    transfers="the map each net's classifier averages (last stage post-activation; MobileNetV2/"
              "ShuffleV2: their extra 1x1 conv's) pooled at scales 1,2,4, each region through the "
              'classifier; DKD per region, complementary regions weighted 2',
    variant='KD weight warmed up over 20 epochs (official: of 240); per-pair betas and scales under '
            '--protocol crd only',
    build=build_dkd,
    defaults=DKD_SETTINGS,
    protocol_defaults={'crd': DKD_SETTINGS},
    pair_defaults=DKD_PAIRS,
    flags={**{name: DKD_FLAGS[name] for name in ('dkd_alpha', 'dkd_beta', 'T', 'dkd_warmup')}, **FLAGS},
))
