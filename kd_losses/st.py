"""Soft targets.

Hinton, Vinyals, Dean: "Distilling the Knowledge in a Neural Network",
NIPS 2014 Deep Learning Workshop, https://arxiv.org/abs/1503.02531

KL(softmax(t/T) || softmax(s/T)), averaged over the batch and multiplied by
T^2 so that gradient magnitudes do not shrink with the temperature.

With --logit_stand (Sun et al., CVPR 2024; kd_losses/_logit_stand.py) both
logits are z-scored per sample before the temperature, and the authors'
CIFAR-100 setting for it becomes the default (flags given on the command
line win): T 2, KD weight 9, CE weight 0.1, on every dataset and protocol.
Source: sunshangquan/logit-standardization-KD @ f6e5aa5,
mdistiller/engine/cfg.py lines 62-65 (KD: TEMPERATURE 2, CE_WEIGHT 0.1,
KD_WEIGHT 9), and tools/train.py lines 103-104 (--base-temp 2, --kd-weight 9)
and 112-114 (which set them for KD under --logit-stand); README.md line 57
runs KD+theirs with exactly these. Off (the default), the loss is exactly
the one above. Only the logits are read: any student and teacher with the
same classes pair.

Under --protocol crd (the CIFAR-100 benchmark's KD): CE weight 0.1, KD weight
0.9, T 4 (RepDistiller scripts/run_cifar_distill.sh `--distill kd -r 0.1
-a 0.9 -b 0`, `--kd_T 4`; mdistiller engine/cfg.py KD: CE_WEIGHT 0.1,
KD_WEIGHT 0.9, TEMPERATURE 4). With --logit_stand the authors' setting above
applies instead (T 2, KD weight 9, CE weight 0.1). No official config sets a
value per teacher -> student pair.
"""
import torch.nn as nn
import torch.nn.functional as F

from ._logit_stand import LOGIT_STAND, maybe_standardize
from .registry import FeatureDistiller, Flag, Method, register

__all__ = ['SoftTarget']


class SoftTarget(nn.Module):
    def __init__(self, T, logit_stand=False):
        super().__init__()
        self.T = T
        self.logit_stand = bool(logit_stand)

    def forward(self, out_s, out_t):
        out_s, out_t = maybe_standardize(out_s, out_t, self.logit_stand)
        log_p_s = F.log_softmax(out_s / self.T, dim=1)
        log_p_t = F.log_softmax(out_t / self.T, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction='batchmean', log_target=True) * self.T ** 2


register(Method(
    name='st', title='soft target', paper='https://arxiv.org/abs/1503.02531',
    transfers='logits, softened at temperature T',
    variant='--logit_stand: z-scored logits, with the authors\' --T 2 --lambda_kd 9 '
            '--ce_weight 0.1 (Sun et al., CVPR 2024)',
    build=lambda ctx: FeatureDistiller(SoftTarget(ctx.args.T, ctx.args.logit_stand), ['out']),
    defaults={'lambda_kd': 0.1, 'T': 4.0, 'logit_stand': False},
    protocol_defaults={'crd': {'ce_weight': 0.1, 'lambda_kd': 0.9, 'T': 4.0}},
    flags={'T': Flag(float, 'softmax temperature', positive=True),
           'logit_stand': LOGIT_STAND},
    # the authors' setting with the switch (logit-standardization-KD mdistiller/engine/cfg.py
    # lines 62-65), on every protocol
    switch_defaults={'logit_stand': {'T': 2.0, 'lambda_kd': 9.0, 'ce_weight': 0.1}},
))
