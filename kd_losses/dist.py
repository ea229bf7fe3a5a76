"""DIST: distillation from a stronger teacher by correlation.

Huang, You, Wang, Qian, Xu: "Knowledge Distillation from A Stronger Teacher",
NeurIPS 2022, https://arxiv.org/abs/2205.10536 (official code: hunto/DIST_KD,
its classification submodule hunto/image_classification_sota)

With Y = softmax(Z / tau) for student and teacher ([B, C]) and the Pearson
correlation rho(u, v) = cos(u - mean(u), v - mean(v)), the denominator
plus 1e-8 as in the official code:

- inter-class relation: 1 - mean over the samples (rows) of rho(Y_s[i], Y_t[i]);
- intra-class relation: 1 - mean over the classes (columns) of
  rho(Y_s[:, c], Y_t[:, c]);

loss = tau^2 * (beta * inter + gamma * intra). The two weighted terms are
logged on their own (train_kd_inter, train_kd_intra). The intra term relates
the samples of a batch, so under torchrun both are computed on the global
batch gathered from every process: the loss one process gives.

Defaults: the official CIFAR-100 configuration
(configs/strategies/distill/dist_cifar.yaml: kd dist_t4, i.e. beta 1,
gamma 1, tau 4; KD loss weight 2, CE weight 1). The paper gives no CIFAR-10
setting. The temperature is the shared --T flag.

Under --protocol crd (the CIFAR-100 benchmark): the same official CIFAR-100
configuration (CE weight 1, KD weight 2, beta 1, gamma 1, tau 4).
"""
import torch.nn as nn
import torch.nn.functional as F

from distributed import gather_batch

from .registry import ConfigError, Distiller, Flag, Method, register

__all__ = ['DIST']


def pearson_rows(a, b, eps=1e-8):
    """[N] Pearson correlation of each row of a with the same row of b."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


class DIST(nn.Module):
    def __init__(self, beta, gamma, tau):
        super().__init__()
        self.beta, self.gamma, self.tau = beta, gamma, tau

    def terms(self, out_s, out_t):
        """{'inter': tau^2 beta inter, 'intra': tau^2 gamma intra}, float32 scalars."""
        y_s = F.softmax(out_s.float() / self.tau, dim=1)
        y_t = F.softmax(out_t.float() / self.tau, dim=1)
        inter = 1 - pearson_rows(y_s, y_t).mean()
        intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean()
        scale = self.tau ** 2
        return {'inter': scale * self.beta * inter, 'intra': scale * self.gamma * intra}

    def forward(self, out_s, out_t):
        parts = self.terms(out_s, out_t)
        return parts['inter'] + parts['intra']


class DISTDistiller(Distiller):
    loss_terms = ('inter', 'intra')

    def __init__(self, loss):
        super().__init__()
        self.dist = loss

    def forward(self, s, t, batch):
        # the intra-class term correlates the batch's samples: the global batch under torchrun
        return self.dist.terms(gather_batch(s.out, differentiable=True),
                               gather_batch(t.out.detach()))


def build(ctx):
    a = ctx.args
    if min(a.dist_beta, a.dist_gamma) < 0:
        raise ConfigError(f'dist: --dist_beta ({a.dist_beta}) and --dist_gamma ({a.dist_gamma}) '
                          f'must be >= 0')
    return DISTDistiller(DIST(a.dist_beta, a.dist_gamma, a.T))


register(Method(
    name='dist', title='DIST: inter- and intra-class correlation',
    paper='https://arxiv.org/abs/2205.10536',
    transfers='logits at temperature T; Pearson correlation per sample and per class (global batch)',
    build=build,
    defaults={'lambda_kd': 2.0, 'dist_beta': 1.0, 'dist_gamma': 1.0, 'T': 4.0},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 2.0, 'dist_beta': 1.0,
                               'dist_gamma': 1.0, 'T': 4.0}},
    flags={'dist_beta': Flag(float, 'dist: weight of the inter-class (per-sample) relation'),
           'dist_gamma': Flag(float, 'dist: weight of the intra-class (per-class) relation'),
           'T': Flag(float, 'softmax temperature', positive=True)},
))
