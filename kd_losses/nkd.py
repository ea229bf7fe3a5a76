"""Normalized knowledge distillation (NKD).

Yang, Zeng, Li, Zhang, Yuan, Li: "From Knowledge Distillation to
Self-Knowledge Distillation: A Unified Approach with Normalized Loss and
Customized Soft Labels", ICCV 2023, https://arxiv.org/abs/2303.13005
(official code: yzd-v/cls_KD, mmcls/distillation/losses/nkd.py)

The soft-target loss is split at the label, and the non-target part is
normalised so that it no longer shrinks with the teacher's confidence:

    L = - t_y log s_y  -  gamma * T^2 * sum_{i != y} t^_i log s^_i

where t = softmax(z_t), s = softmax(z_s) (temperature 1) give the target
term, and t^, s^ = softmax over the C - 1 non-target logits divided by T (the
non-target probabilities renormalised to sum to 1). Both terms are averaged
over the batch; the two weighted terms are logged on their own
(train_kd_target, train_kd_non_target).

As in the paper and its code, both terms are cross-entropies: they exceed
the KLs by the teacher's entropies (constant in the student), so the
gradients are those of the KL form and the loss does not reach 0 when the
student matches.

Defaults: the official CIFAR-100 configuration
(configs/distillers/cifar100/res34_distill_res18_cifar.py: temp 3, gamma 3.5,
loss weight 1 next to the CE weight 1). The paper gives no CIFAR-10 setting.
The temperature is the shared --T flag.

Under --protocol crd (the CIFAR-100 benchmark): the same official CIFAR-100
configuration (CE weight 1, loss weight 1, T 3, gamma 3.5).
"""
import torch.nn as nn
import torch.nn.functional as F

from .dkd import non_target_index
from .registry import ConfigError, Distiller, Flag, Method, register

__all__ = ['NKD']


class NKD(nn.Module):
    def __init__(self, T, gamma):
        super().__init__()
        self.T, self.gamma = T, gamma

    def terms(self, out_s, out_t, target):
        """{'target': target term, 'non_target': gamma T^2 non-target term}, float32 scalars."""
        out_s, out_t = out_s.float(), out_t.float()
        tgt = target.view(-1, 1)
        log_s_y = F.log_softmax(out_s, dim=1).gather(1, tgt)
        t_y = F.softmax(out_t, dim=1).gather(1, tgt)
        target_term = -(t_y * log_s_y).mean()
        idx = non_target_index(target, out_s.shape[1])
        log_s_hat = F.log_softmax(out_s.gather(1, idx) / self.T, dim=1)
        t_hat = F.softmax(out_t.gather(1, idx) / self.T, dim=1)
        non_target = -(t_hat * log_s_hat).sum(dim=1).mean()
        return {'target': target_term, 'non_target': self.gamma * self.T ** 2 * non_target}

    def forward(self, out_s, out_t, target):
        parts = self.terms(out_s, out_t, target)
        return parts['target'] + parts['non_target']


class NKDDistiller(Distiller):
    loss_terms = ('target', 'non_target')

    def __init__(self, loss):
        super().__init__()
        self.nkd = loss

    def forward(self, s, t, batch):
        return self.nkd.terms(s.out, t.out.detach(), batch.target)


def build(ctx):
    a = ctx.args
    if a.nkd_gamma < 0:
        raise ConfigError(f'nkd: --nkd_gamma must be >= 0, got {a.nkd_gamma}')
    if ctx.num_class < 2:
        raise ConfigError('nkd splits target and non-target classes: it needs 2 classes or more')
    return NKDDistiller(NKD(a.T, a.nkd_gamma))


register(Method(
    name='nkd', title='normalized knowledge distillation', paper='https://arxiv.org/abs/2303.13005',
    transfers='logits: target probability (T = 1) and renormalised non-target softmax at T',
    build=build,
    defaults={'lambda_kd': 1.0, 'T': 3.0, 'nkd_gamma': 3.5},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 1.0, 'T': 3.0, 'nkd_gamma': 3.5}},
    flags={'T': Flag(float, 'softmax temperature', positive=True),
           'nkd_gamma': Flag(float, 'nkd: weight of the normalised non-target term')},
))
