"""Logit standardisation: the switch the logit methods (st, dkd, ctkd) share.

Sun, Ren, Li, Wang, Cao: "Logit Standardization in Knowledge Distillation",
CVPR 2024, https://arxiv.org/abs/2403.01427

With `--logit_stand`, the student's and the teacher's logits are each
z-scored per sample over the classes before the temperature divides them:

    z -> (z - mean(z)) / (std(z) + 1e-7)

with the unbiased standard deviation (over the C classes, divided by C - 1)
and the epsilon of the authors' mdistiller-based code (their copy of the
CTKD code adds none). Both sides then have zero mean and unit deviation, so
the student matches the teacher's logit relations, not their magnitude; the
temperature becomes a "base temperature" on standardised logits. Off (the
default), every method computes exactly what it did before.

The authors apply it to KD, DKD, MLKD and CTKD (their code and logs); neither
the NKD nor the WTTM paper or code uses it, so only st, dkd and ctkd declare
the switch. The settings the authors train with when it is on, on CIFAR-100
(their README and configs): base temperature 2 and KD weight 9 with CE weight
1 for KD (`--kd_mode st --logit_stand --T 2 --lambda_kd 9`); CE weight 0.1
and KD weight 9 for CTKD (`--kd_mode ctkd --logit_stand --lambda_kd 9`, its
learnable temperature unchanged); for DKD base temperature 2 and the loss
scaled up about 9-fold (their per-pair logs use 9 to 18), e.g.
`--kd_mode dkd --logit_stand --T 2 --lambda_kd 9`. These are not applied
automatically: the registry gives a flag one default per mode and dataset,
not one per switch state, so they are given on the command line.

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
