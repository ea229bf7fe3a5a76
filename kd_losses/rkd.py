"""Relational knowledge distillation.

Park, Kim, Lu, Cho: "Relational Knowledge Distillation", CVPR 2019,
https://arxiv.org/abs/1904.05068

Distance term: the batch's pairwise Euclidean distances, each divided by the
mean of the positive (off-diagonal) distances, compared with smooth-L1.
Angle term: for every triplet (i, j, k) the cosine of the angle at i between
f_j - f_i and f_k - f_i, compared with smooth-L1. Loss = w_dist * distance +
w_angle * angle, applied to `feat` as in the seed; the two weighted terms are
logged on their own. Distances and angles are taken within each network,
so student and teacher `feat` of any widths pair without a connector.

Under --protocol crd (the CIFAR-100 benchmark): CE weight 1, RKD weight 1,
distance weight 25, angle weight 50 (RepDistiller scripts/run_cifar_distill.sh
`--distill rkd -a 0 -b 1` and distiller_zoo/RKD.py's weights, on the pooled
feature as here; mdistiller engine/cfg.py RKD).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from distributed import gather_batch

from .registry import ConfigError, Distiller, Flag, Method, register

__all__ = ['RKD']


class RKD(nn.Module):
    def __init__(self, w_dist, w_angle):
        super().__init__()
        self.w_dist, self.w_angle = w_dist, w_angle

    @staticmethod
    def distances(feat, eps=1e-12):
        """Pairwise distances divided by their mean over the positive entries."""
        sq_norm = feat.pow(2).sum(dim=1)
        sq_dist = (sq_norm[:, None] + sq_norm[None, :] - 2 * feat @ feat.t()).clamp(min=eps)
        off_diagonal = 1 - torch.eye(len(feat), device=feat.device, dtype=feat.dtype)
        dist = sq_dist.sqrt() * off_diagonal
        positive = (dist > 0).to(dist.dtype)
        # masked mean without a host sync; the clamps only matter for a batch of one
        mean = (dist * positive).sum() / positive.sum().clamp(min=1)
        return dist / mean.clamp(min=eps)

    @staticmethod
    def angles(feat):
        """[B, B, B]: cosine between f_j - f_i and f_k - f_i at entry (i, j, k)."""
        diff = F.normalize(feat[None, :, :] - feat[:, None, :], dim=2)
        return torch.bmm(diff, diff.transpose(1, 2))

    def terms(self, feat_s, feat_t):
        """The weighted terms {'distance', 'angle'}; their sum is the loss."""
        feat_s, feat_t = feat_s.float(), feat_t.float()
        dist_loss = F.smooth_l1_loss(self.distances(feat_s), self.distances(feat_t))
        angle_loss = F.smooth_l1_loss(self.angles(feat_s), self.angles(feat_t))
        return {'distance': self.w_dist * dist_loss, 'angle': self.w_angle * angle_loss}

    def forward(self, feat_s, feat_t):
        parts = self.terms(feat_s, feat_t)
        return parts['distance'] + parts['angle']


class RKDDistiller(Distiller):
    """RKD on `feat`, teacher detached, both terms logged (train_kd_distance,
    train_kd_angle). The relations span the batch, so under torchrun they are
    computed on the global batch gathered from every process."""

    loss_terms = ('distance', 'angle')

    def __init__(self, loss):
        super().__init__()
        self.rkd = loss

    def forward(self, s, t, batch):
        return self.rkd.terms(gather_batch(s.feat, differentiable=True),
                              gather_batch(t.feat.detach()))


def build(ctx):
    if ctx.args.w_dist < 0 or ctx.args.w_angle < 0:
        raise ConfigError(f'rkd: --w_dist ({ctx.args.w_dist}) and --w_angle '
                          f'({ctx.args.w_angle}) must be >= 0')
    return RKDDistiller(RKD(ctx.args.w_dist, ctx.args.w_angle))


register(Method(
    name='rkd', title='relational knowledge distillation', paper='https://arxiv.org/abs/1904.05068',
    transfers='feat; pairwise distances and triplet angles, smooth-L1',
    variant='distance and angle terms on feat',
    build=build,
    defaults={'lambda_kd': 1.0, 'w_dist': 25.0, 'w_angle': 50.0},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 1.0, 'w_dist': 25.0,
                               'w_angle': 50.0}},
    flags={'w_dist': Flag(float, 'weight of the RKD distance term'),
           'w_angle': Flag(float, 'weight of the RKD angle term')},
))
