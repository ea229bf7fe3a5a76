"""Logit standardisation: the switch the logit methods (st, dkd, ctkd) share.

Sun, Ren, Li, Wang, Cao: "Logit Standardization in Knowledge Distillation",
CVPR 2024, https://arxiv.org/abs/2403.01427

With `--logit_stand`, the student's and the teacher's logits are each
z-scored per sample over the classes before the temperature divides them:

    z -> (z - mean(z)) / (std(z) + 1e-7)

with the unbiased standard deviation (over the C classes, divided by C - 1)
and the epsilon 1e-7 of the authors' code, which every copy of their
`normalize` adds (sunshangquan/logit-standardization-KD @ f6e5aa5:
mdistiller/distillers/KD.py line 10, DKD.py line 10, MLKD.py line 15,
CTKD/distiller_zoo/KD.py line 10). Both sides then have zero mean and unit
deviation, so the student matches the teacher's logit relations, not their
magnitude; the temperature becomes a "base temperature" on standardised
logits. Off (the default), every method computes exactly what it did before.

The authors apply it to KD, DKD, MLKD and CTKD (their code and logs); neither
the NKD nor the WTTM paper or code uses it, so only st, dkd and ctkd declare
the switch. Their CIFAR-100 settings with it on become each mode's defaults
when the switch is on (the mode's `switch_defaults`; a flag given on the
command line still wins), each cited in the mode's docstring:

- st: base temperature 2, KD weight 9, CE weight 0.1 (mdistiller/engine/cfg.py
  lines 62-65; tools/train.py lines 103-104 and 112-114);
- dkd: base temperature 2 and alpha and beta multiplied by 9 (tools/train.py
  lines 103-104 and 115-118), i.e. `--T 2 --lambda_kd 9`, CE weight 1;
- ctkd: KD weight 9 with CE weight 0.1 (CTKD/scripts/run_cifar_distill.sh
  line 19, `-r 0.1 -a 9`), the learned temperature unchanged. That copy's
  switch is inverted (CTKD/train_student.py line 314 standardises when
  --logit_stand is *not* given; the script gives none), so its runs are
  the standardised ones.

Their README's logs (README.md line 83: files named
KD_TYPE,TEACHER,STUDENT,BASE_TEMPERATURE,KD_WEIGHT[,BETA]) show that some
pairs were run with other values (e.g. KD resnet110->resnet20 T 4 weight 12,
DKD resnet56->resnet20 T 3 weight 18 beta 2); these per-pair values depend
on the switch, which per-pair defaults do not, so they are not applied:
give them on the command line.

This module is private (its name starts with '_'): it registers no method.
"""
import torch

from .registry import Flag

__all__ = ['LOGIT_STAND', 'EPS', 'standardize', 'maybe_standardize']

EPS = 1e-7

# The one declaration every method with the switch uses, so the registry sees
# identical flags.
LOGIT_STAND = Flag(bool, 'logit standardisation (Sun et al., CVPR 2024): z-score each '
                         "sample's student and teacher logits over the classes before the "
                         'temperature')


def standardize(logits, eps=EPS):
    """[B, C] logits (bf16/fp16 computed in float32, float64 kept), each row
    shifted to mean 0 and divided by its unbiased standard deviation plus `eps`."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    mean = z.mean(dim=1, keepdim=True)
    std = z.std(dim=1, keepdim=True)  # unbiased (C - 1), as the authors' torch.std
    return (z - mean) / (std + eps)


def maybe_standardize(out_s, out_t, on):
    """Both logits standardised when `on` (a Python bool fixed at build time),
    else returned untouched."""
    if on:
        return standardize(out_s), standardize(out_t)
    return out_s, out_t
