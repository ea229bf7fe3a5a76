"""Attention transfer.

Zagoruyko, Komodakis: "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer",
ICLR 2017, https://arxiv.org/abs/1612.03928

Attention map = sum over channels of |f|^p, flattened and L2-normalised per
sample (1e-6 added to the norm); the loss is the MSE between the student's
and the teacher's maps. As in the seed, the sum of |f|^p is used (the paper
also studies mean and max) and the stage losses are averaged, over every
stage both networks have (`ctx.stage_keys`: rb1..3, or rb1..4).

Across networks the channel counts need not match (the map sums over
channels). Where the spatial sizes differ, the larger feature map is
adaptively average-pooled to the smaller one's size before its attention map
is taken, as the CIFAR-100 benchmark's code does (RepDistiller
distiller_zoo/AT.py, mdistiller); equal sizes are left as they are.

Under --protocol crd (the benchmark): CE weight 1, AT weight 1000, p 2
(RepDistiller scripts/run_cifar_distill.sh `--distill attention -a 0 -b 1000`;
mdistiller engine/cfg.py AT.P 2, LOSS CE_WEIGHT 1, FEAT_WEIGHT 1000). The
benchmark sums the stage losses where this mode averages them: per stage its
weight is 3 (4) times this one for three- (four-) stage networks.
"""
import torch.nn as nn
import torch.nn.functional as F

from .registry import FeatureDistiller, Flag, Method, register

__all__ = ['AT']


def pool_to_smaller(fm_s, fm_t):
    """Both maps at the smaller one's spatial size: the larger is adaptively
    average-pooled (per dimension, the smaller of the two sizes); maps of equal
    size are returned unchanged. A branch on shapes only."""
    if fm_s.shape[2:] == fm_t.shape[2:]:
        return fm_s, fm_t
    size = tuple(min(a, b) for a, b in zip(fm_s.shape[2:], fm_t.shape[2:]))
    return tuple(fm if tuple(fm.shape[2:]) == size else F.adaptive_avg_pool2d(fm, size)
                 for fm in (fm_s, fm_t))


class AT(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def attention_map(self, fm, eps=1e-6):
        am = fm.abs().pow(self.p).sum(dim=1).flatten(1)
        return am / (am.norm(dim=1, keepdim=True) + eps)

    def forward(self, fm_s, fm_t):
        fm_s, fm_t = pool_to_smaller(fm_s, fm_t)
        return F.mse_loss(self.attention_map(fm_s), self.attention_map(fm_t))


register(Method(
    name='at', title='attention transfer', paper='https://arxiv.org/abs/1612.03928',
    transfers='every stage post-activation attention maps (the larger map pooled to the smaller), mean',
    variant='attention = sum over channels of |f|^p (p=2); the stages averaged',
    build=lambda ctx: FeatureDistiller(AT(ctx.args.p), ctx.stage_keys('at'), act='post'),
    defaults={'lambda_kd': 1000.0, 'p': 2.0},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 1000.0, 'p': 2.0}},
    flags={'p': Flag(float, 'power of |f| in the attention map', positive=True)},
))
