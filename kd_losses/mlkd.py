"""Multi-level logit distillation.

Jin, Wang, Lin: "Multi-Level Logit Distillation", CVPR 2023,
https://openaccess.thecvf.com/content/CVPR2023/html/Jin_Multi-Level_Logit_Distillation_CVPR_2023_paper.html
(official code: Jin-Ying/Multi-Level-Logit-Distillation,
mdistiller/distillers/KD_ours.py: the terms `kd_loss`, `cc_loss`, `bc_loss`
lines 13-47, `KD_ours.forward_train` lines 89-255: masks 98-111, CE 114,
the loss 115-254)

Student and teacher each see two views of every image: the weak one (crop
and flip) and a strong one (RandAugment and Cutout: strong_augment.py). With
p = softmax(z / T) of a view's logits, for each temperature T:

- instance level: KD_T = T^2 * mean over samples of KL(p_t || p_s);
- class level: CC_T = sum((P_t^T P_t - P_s^T P_s)^2) / C, the [C, C] class
  correlations of the batch's predictions;
- batch level: BC_T = sum((P_t P_t^T - P_s P_s^T)^2) / B, the [B, B] sample
  similarities.

Masks from the teacher on the weak view at temperature 1: a sample counts
where its top probability is at or below the batch's median; a class where
its summed probability over the batch is at or below the classes' median
(medians as numpy's 50th percentile, linear between the two middle values:
here from a sort on the device, no host round-trip).

The loss exactly as the official code computes it, with the temperatures
(T, 3, 5, 2, 6) (T = 4 there) and these quirks, kept:

- reduction: each term is already a scalar (a mean or a sum) when the mask
  multiplies it, so `(term * mask).mean()` scales it by the *fraction* of
  masked samples (or classes), about a half, rather than selecting them;
- the strong-view instance term runs T, 3 and 5 on the strong view but 2 and
  6 on the weak view again, unmasked;
- the class- and batch-level terms of the strong view are computed there but
  not added to the loss: only the weak view's count.

So, with m the masked fraction of samples, c that of classes, w the weak and
s the strong view:

    instance = m * sum_T KD_T(w) + KD_T(s) + KD_3(s) + KD_5(s) + KD_2(w) + KD_6(w)
    class    = c * sum_T CC_T(w)
    batch    = m * sum_T BC_T(w)
    loss     = ce_weight * (CE(w) + CE(s)) + lambda_kd * (instance + class + batch)

(CE on both views, summed: train_kd.KDStep for a two-view mode). The three
terms are logged on their own (train_kd_instance, _class, _batch). The
student runs once per view (its BatchNorm sees each view's batch on its own,
as the official two calls do); the teacher, frozen and in eval mode, runs
once on both views together. The reported training accuracy is the weak
view's. Under torchrun B and the medians are each process's own batch.

With --logit_stand (kd_losses/_logit_stand.py) the instance-level KD terms
z-score both logits first, as the logit-standardisation authors' MLKD does
(sunshangquan/logit-standardization-KD mdistiller/distillers/MLKD.py); the
masks and the class- and batch-level terms read the raw logits there too.
Their setting with it: first temperature 2 and KD weight 9, CE weight 0.1
(their README, "MLKD+Ours": --base-temp 2 --kd-weight 9; tools/train.py
lines 110-121), the default here when the switch is on.

Defaults, the official CIFAR-100 configuration: first temperature 4, CE
weight 0.1, KD weight 0.9 (KD_ours reads cfg.KD: mdistiller/engine/cfg.py
lines 61-64); lr 0.025 with the CIFAR-100 benchmark's batch 64, 240 epochs,
decays at 150/180/210, weight decay 5e-4 (configs/cifar100/ours/
res32x4_res8x4.yaml, lines 9-17: the mode's schedule under --protocol crd).
Its per-pair configs (configs/cifar100/ours/*.yaml, lines 11-13): lr 0.025
and 240 epochs for the resnet, wrn and vgg students; lr 0.01 for MobileNetV2
and ShuffleNet students (the benchmark's own lr for them) with 480 epochs
(vgg13 and ResNet50 -> MobileNetV2, wrn_40_2 -> ShuffleV1) or 960 epochs
(resnet32x4 -> ShuffleV1, ShuffleV2), the decays staying at 150/180/210.
Under --protocol crd these five pairs take that schedule when --epochs is
left out (`pair_defaults`, each value named in the log with its config); a
run given --epochs (as the sweep's table, which trains every mode alike)
keeps the benchmark's decays scaled to its length instead. The
logit-standardisation authors train their MLKD runs (with --logit_stand)
for 480 epochs, 960 for resnet32x4 -> ShuffleV1/V2 (their
configs/cifar100/mlkd/*.yaml); that is not a default here: give --epochs
480 --lr_decay_epochs 150,180,210.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._logit_stand import LOGIT_STAND, maybe_standardize
from .registry import Distiller, Flag, Method, PairSetting, register

__all__ = ['MLKD', 'MLKDDistiller']

# The official code's temperatures after the configured one (KD_ours.py).
EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)


def instance_kd(out_s, out_t, T):
    """T^2 * mean over samples of KL(softmax(t/T) || softmax(s/T))."""
    log_p_s = F.log_softmax(out_s / T, dim=1)
    log_p_t = F.log_softmax(out_t / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction='batchmean', log_target=True) * T ** 2


def class_consistency(out_s, out_t, T):
    """sum((P_t^T P_t - P_s^T P_s)^2) / C."""
    p_s, p_t = F.softmax(out_s / T, dim=1), F.softmax(out_t / T, dim=1)
    return (p_t.t() @ p_t - p_s.t() @ p_s).pow(2).sum() / out_s.shape[1]


def batch_consistency(out_s, out_t, T):
    """sum((P_t P_t^T - P_s P_s^T)^2) / B."""
    p_s, p_t = F.softmax(out_s / T, dim=1), F.softmax(out_t / T, dim=1)
    return (p_t @ p_t.t() - p_s @ p_s.t()).pow(2).sum() / out_s.shape[0]


def median(x):
    """The median of a 1-d tensor as numpy's 50th percentile (linear between the
    two middle values), from a sort and fixed indices: no host round-trip."""
    ordered = x.sort().values
    n = x.shape[0]
    low, high = ordered[(n - 1) // 2], ordered[n // 2]
    return low + (high - low) * 0.5 if n % 2 == 0 else low


def masked_fractions(out_t_weak):
    """(fraction of samples, fraction of classes) at or below the median of the
    teacher's weak-view confidence: top probability per sample, summed
    probability per class; scalars of the logits' dtype, on the device."""
    p = F.softmax(out_t_weak, dim=1)
    confidence = p.amax(dim=1)
    per_class = p.sum(dim=0)
    samples = (confidence <= median(confidence)).to(p.dtype).mean()
    classes = (per_class <= median(per_class)).to(p.dtype).mean()
    return samples, classes


class MLKD(nn.Module):
    """The three terms of the official loss (see the module docstring) from
    the logits of both views; `T` is the first temperature."""

    def __init__(self, T, logit_stand=False):
        super().__init__()
        self.temperatures = (float(T),) + EXTRA_TEMPERATURES
        self.logit_stand = bool(logit_stand)

    def terms(self, s_weak, s_strong, t_weak, t_strong):
        """{'instance', 'class', 'batch'}: float32 scalars (float64 for float64
        logits), before lambda_kd; the products in float32 under --amp too."""
        with torch.autocast(s_weak.device.type, enabled=False):
            return self._terms(*(z.float() if z.dtype != torch.float64 else z
                                 for z in (s_weak, s_strong, t_weak.detach(), t_strong.detach())))

    def _terms(self, s_weak, s_strong, t_weak, t_strong):
        samples, classes = masked_fractions(t_weak)
        # instance level reads standardised logits under --logit_stand
        zs_w, zt_w = maybe_standardize(s_weak, t_weak, self.logit_stand)
        zs_s, zt_s = maybe_standardize(s_strong, t_strong, self.logit_stand)
        temperatures = self.temperatures
        weak = sum(instance_kd(zs_w, zt_w, T) for T in temperatures)
        strong = sum(instance_kd(zs_s, zt_s, T) for T in temperatures[:3])
        strong = strong + sum(instance_kd(zs_w, zt_w, T) for T in temperatures[3:])
        cc = sum(class_consistency(s_weak, t_weak, T) for T in temperatures)
        bc = sum(batch_consistency(s_weak, t_weak, T) for T in temperatures)
        return {'instance': samples * weak + strong, 'class': classes * cc, 'batch': samples * bc}

    def forward(self, s_weak, s_strong, t_weak, t_strong):
        return sum(self.terms(s_weak, s_strong, t_weak, t_strong).values())


class MLKDDistiller(Distiller):
    loss_terms = ('instance', 'class', 'batch')

    def __init__(self, loss):
        super().__init__()
        self.mlkd = loss

    def forward(self, s, t, batch):
        (s_weak, s_strong), (t_weak, t_strong) = s, t
        return self.mlkd.terms(s_weak.out, s_strong.out, t_weak.out, t_strong.out)


# The official per-pair schedules that differ from the benchmark's 240 epochs:
# (teacher, student, its config in configs/cifar100/ours/, epochs).
LONGER_SCHEDULES = (('vgg13', 'MobileNetV2', 'vgg13_mv2', 480), ('ResNet50', 'MobileNetV2', 'res50_mv2', 480),
                    ('wrn_40_2', 'ShuffleV1', 'wrn40_2_shuv1', 480),
                    ('resnet32x4', 'ShuffleV1', 'res32x4_shuv1', 960),
                    ('resnet32x4', 'ShuffleV2', 'res32x4_shuv2', 960))
PAIR_SCHEDULES = {
    f'{teacher}:{student}': PairSetting(
        {}, f'Multi-Level-Logit-Distillation configs/cifar100/ours/{config}.yaml lines 11-13',
        schedule={'epochs': epochs, 'lr': 0.01, 'lr_decay_epochs': [150, 180, 210]})
    for teacher, student, config, epochs in LONGER_SCHEDULES}

register(Method(
    name='mlkd', title='multi-level logit distillation',
    paper='https://openaccess.thecvf.com/content/CVPR2023/html/'
          'Jin_Multi-Level_Logit_Distillation_CVPR_2023_paper.html',
    transfers='logits of a weak and a strong (RandAugment) view: instance, class and batch '
              'level, at temperatures T, 3, 5, 2, 6',
    variant='the official reduction (masks scale whole terms); reflect-padded crops for both '
            'views (official: zero padding); --logit_stand: z-scored instance-level logits',
    build=lambda ctx: MLKDDistiller(MLKD(ctx.args.T, ctx.args.logit_stand)),
    defaults={'ce_weight': 0.1, 'lambda_kd': 0.9, 'T': 4.0, 'logit_stand': False},
    protocol_defaults={'crd': {'ce_weight': 0.1, 'lambda_kd': 0.9, 'T': 4.0}},
    schedule_defaults={'crd': {'lr': 0.025}},
    pair_defaults=PAIR_SCHEDULES,
    switch_defaults={'logit_stand': {'T': 2.0, 'lambda_kd': 9.0}},
    flags={'T': Flag(float, 'softmax temperature', positive=True),
           'logit_stand': LOGIT_STAND},
    views=('weak', 'strong'),
))
