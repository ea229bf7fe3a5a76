"""Decoupled knowledge distillation.

Zhao, Cui, Song, Qiu, Liang: "Decoupled Knowledge Distillation", CVPR 2022,
https://arxiv.org/abs/2203.08679 (official code: megvii-research/mdistiller)

The soft-target KL is split at the label. With p = softmax(z / T):

- TCKD, target class: KL between the binary distributions
  (p_target, 1 - p_target) of teacher and student;
- NCKD, non-target classes: KL between the softmaxes of the C - 1 non-target
  logits (divided by T) of teacher and student.

Each is summed over its classes, averaged over the batch and multiplied by
T^2; the loss is alpha * TCKD + beta * NCKD. The two weighted terms are
logged on their own (train_kd_tckd, train_kd_nckd).

The KD weight warms up linearly, min(epoch / dkd_warmup, 1) with epochs
counted from 1, as the mode's per-epoch `kd_weight` (not inside the loss).
The warm-up is in epochs: 20 of the paper's 240-epoch schedule stay 20 of the
zoo's 200.

Defaults: the official CIFAR-100 configuration (megvii-research/mdistiller
@ a08d46f, mdistiller/engine/cfg.py lines 163-167: CE weight 1, alpha 1,
beta 8, T 4, warm-up 20; loss weight 1). The paper gives no CIFAR-10 setting.

Per pair, under --protocol crd: the official per-pair configs
(configs/cifar100/dkd/*.yaml, line 19 `BETA` where one is set) lower beta
for some pairs: 2 for resnet56->resnet20 and resnet110->resnet32, 6 for
vgg13->vgg8, vgg13->MobileNetV2, wrn_40_2->wrn_16_2 and wrn_40_2->wrn_40_1;
the others (resnet32x4->resnet8x4/ShuffleV1/ShuffleV2, ResNet50->MobileNetV2,
wrn_40_2->ShuffleV1) keep cfg.py's 8. These are the pairs' defaults under
--protocol crd (`pair_defaults`; `python -m kd_losses --defaults dkd --pair
T:S`), and the log names the config file of each. resnet110->resnet20 has
no official config (beta 2, as its resnet56/110 neighbours, is the closer
setting; given on the command line).

Departures from the official code: the binary and non-target distributions
are computed in log space (log(1 - p_target) as a log-sum-exp over the
non-target logits, the non-target softmax over the C - 1 gathered logits)
instead of through log(p) and a -1000 offset on the target logit, so they
stay finite when the student is certain; the values agree otherwise.

With --logit_stand (kd_losses/_logit_stand.py) both logits are z-scored per
sample before the temperature, as the authors of logit standardisation do for
DKD, and their setting becomes the default (flags given on the command line
win): T 2 and the loss scaled 9-fold, `--T 2 --lambda_kd 9`, CE weight 1.
Source: sunshangquan/logit-standardization-KD @ f6e5aa5, tools/train.py
lines 103-104 (--base-temp 2, --kd-weight 9) and 115-118 (for DKD: ALPHA
and BETA multiplied by the KD weight, T set to the base temperature; the
same loss as lambda_kd 9 here), mdistiller/engine/cfg.py line 164 (CE
weight 1); README.md line 66 runs DKD+theirs with exactly these. A pair's
beta (above) still applies under --protocol crd.

Under --protocol crd (the CIFAR-100 benchmark): the official configuration
above (CE weight 1, alpha 1, beta 8, T 4, warm-up 20 of its 240 epochs),
beta per pair from the official configs.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._logit_stand import LOGIT_STAND, maybe_standardize
from .registry import ConfigError, Distiller, Flag, Method, PairSetting, register

__all__ = ['DKD']


def non_target_index(target, num_class):
    """[B, C - 1] int64: each row's classes other than its target, in order."""
    cols = torch.arange(num_class - 1, device=target.device).expand(len(target), -1)
    return cols + (cols >= target.view(-1, 1)).long()


class DKD(nn.Module):
    def __init__(self, alpha, beta, T, logit_stand=False):
        super().__init__()
        self.alpha, self.beta, self.T = alpha, beta, T
        self.logit_stand = bool(logit_stand)

    def log_distributions(self, out_s, out_t, target):
        """The log-probabilities both terms compare, student's then teacher's:
        the binary (target, rest) pairs [B, 2] and the non-target softmaxes [B, C - 1]."""
        out_s, out_t = maybe_standardize(out_s.float(), out_t.float(), self.logit_stand)
        z_s, z_t = out_s / self.T, out_t / self.T
        idx = non_target_index(target, z_s.shape[1])
        tgt = target.view(-1, 1)
        binary = []
        for z in (z_s, z_t):
            non_target = z.gather(1, idx)
            log_all = torch.logsumexp(z, dim=1, keepdim=True)
            # log p_target and log(1 - p_target), without forming 1 - p
            binary.append(torch.cat([z.gather(1, tgt) - log_all,
                                     torch.logsumexp(non_target, dim=1, keepdim=True) - log_all], 1))
        b_s, b_t = binary
        log_q_s = F.log_softmax(z_s.gather(1, idx), dim=1)
        log_q_t = F.log_softmax(z_t.gather(1, idx), dim=1)
        return b_s, b_t, log_q_s, log_q_t

    def terms(self, out_s, out_t, target):
        """{'tckd': alpha * TCKD, 'nckd': beta * NCKD}, float32 scalars."""
        b_s, b_t, log_q_s, log_q_t = self.log_distributions(out_s, out_t, target)
        scale = self.T ** 2 / b_s.shape[0]
        tckd = F.kl_div(b_s, b_t, reduction='sum', log_target=True) * scale
        nckd = F.kl_div(log_q_s, log_q_t, reduction='sum', log_target=True) * scale
        return {'tckd': self.alpha * tckd, 'nckd': self.beta * nckd}

    def sample_terms(self, out_s, out_t, target):
        """The same terms per sample, not averaged over the batch: [B] each
        (for losses that weight the samples, e.g. SDD's regions)."""
        b_s, b_t, log_q_s, log_q_t = self.log_distributions(out_s, out_t, target)
        scale = self.T ** 2
        tckd = F.kl_div(b_s, b_t, reduction='none', log_target=True).sum(1) * scale
        nckd = F.kl_div(log_q_s, log_q_t, reduction='none', log_target=True).sum(1) * scale
        return {'tckd': self.alpha * tckd, 'nckd': self.beta * nckd}

    def forward(self, out_s, out_t, target):
        parts = self.terms(out_s, out_t, target)
        return parts['tckd'] + parts['nckd']


class DKDDistiller(Distiller):
    loss_terms = ('tckd', 'nckd')

    def __init__(self, loss, warmup):
        super().__init__()
        self.dkd, self.warmup = loss, warmup

    def kd_weight(self, epoch, epochs):
        if self.warmup <= 0:
            return 1.0
        return min(epoch / self.warmup, 1.0)

    def forward(self, s, t, batch):
        return self.dkd.terms(s.out, t.out.detach(), batch.target)


def check_settings(mode, a, num_class):
    """DKD's settings (also SDD's on DKD): a ConfigError naming `mode` for one that cannot work."""
    if a.dkd_warmup < 0:
        raise ConfigError(f'{mode}: --dkd_warmup must be >= 0, got {a.dkd_warmup}')
    if min(a.dkd_alpha, a.dkd_beta) < 0:
        raise ConfigError(f'{mode}: --dkd_alpha ({a.dkd_alpha}) and --dkd_beta ({a.dkd_beta}) '
                          f'must be >= 0')
    if num_class < 2:
        raise ConfigError(f'{mode} splits target and non-target classes: it needs 2 classes or more')


def build(ctx):
    a = ctx.args
    check_settings('dkd', a, ctx.num_class)
    return DKDDistiller(DKD(a.dkd_alpha, a.dkd_beta, a.T, a.logit_stand), a.dkd_warmup)


register(Method(
    name='dkd', title='decoupled knowledge distillation', paper='https://arxiv.org/abs/2203.08679',
    transfers='logits at temperature T: target-class (binary) and non-target-class KL, weighted',
    variant='KD weight warmed up over 20 epochs of 200 (paper: of 240); beta per pair under '
            '--protocol crd only (else 8); --logit_stand: z-scored logits',
    build=build,
    defaults={'lambda_kd': 1.0, 'dkd_alpha': 1.0, 'dkd_beta': 8.0, 'T': 4.0, 'dkd_warmup': 20,
              'logit_stand': False},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 1.0, 'dkd_alpha': 1.0,
                               'dkd_beta': 8.0, 'T': 4.0, 'dkd_warmup': 20}},
    flags={'dkd_alpha': Flag(float, 'dkd: weight of the target-class term (TCKD)'),
           'dkd_beta': Flag(float, 'dkd: weight of the non-target-class term (NCKD)'),
           'T': Flag(float, 'softmax temperature', positive=True),
           'dkd_warmup': Flag(int, 'dkd: epochs over which the KD weight rises linearly to 1 '
                                   '(0: none)', warms_up='the KD weight'),
           'logit_stand': LOGIT_STAND},
    # the authors' setting with logit standardisation (logit-standardization-KD
    # tools/train.py lines 115-118: alpha and beta x9, T the base temperature 2)
    switch_defaults={'logit_stand': {'T': 2.0, 'lambda_kd': 9.0}},
    pair_defaults={f'{teacher}:{student}': PairSetting(
        {'dkd_beta': beta}, f'mdistiller configs/cifar100/dkd/{config}.yaml'
                            + (' line 19' if beta != 8.0 else ' (beta: engine/cfg.py line 165)'))
        for teacher, student, config, beta in (
            ('resnet56', 'resnet20', 'res56_res20', 2.0),
            ('resnet110', 'resnet32', 'res110_res32', 2.0),
            ('resnet32x4', 'resnet8x4', 'res32x4_res8x4', 8.0),
            ('resnet32x4', 'ShuffleV1', 'res32x4_shuv1', 8.0),
            ('resnet32x4', 'ShuffleV2', 'res32x4_shuv2', 8.0),
            ('ResNet50', 'MobileNetV2', 'res50_mv2', 8.0),
            ('vgg13', 'vgg8', 'vgg13_vgg8', 6.0),
            ('vgg13', 'MobileNetV2', 'vgg13_mv2', 6.0),
            ('wrn_40_2', 'wrn_16_2', 'wrn40_2_wrn_16_2', 6.0),
            ('wrn_40_2', 'wrn_40_1', 'wrn40_2_wrn_40_1', 6.0),
            ('wrn_40_2', 'ShuffleV1', 'wrn40_2_shuv1', 8.0))},
))
