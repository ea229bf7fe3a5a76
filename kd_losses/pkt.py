"""Probabilistic knowledge transfer.

Passalis, Tefas: "Learning Deep Representations with Probabilistic Knowledge
Transfer", ECCV 2018, https://arxiv.org/abs/1803.10837

Within a batch, the cosine similarity of two samples' features, mapped to
[0, 1] by (cos + 1) / 2, is turned into a conditional probability by
normalising each row; the loss is the KL divergence from the teacher's to the
student's probabilities, in the seed's form mean(p_t log((p_t + eps) /
(p_s + eps))) over all B x B entries (diagonal included), eps = 1e-6. It is
applied to `feat`; the similarities are B x B whatever the feature's width,
so student and teacher `feat` of any sizes pair without a connector.

Under --protocol crd (the CIFAR-100 benchmark): CE weight 1, PKT weight 30000
(RepDistiller scripts/run_cifar_distill.sh `--distill pkt -a 0 -b 30000`, on
the pooled feature as here; mdistiller engine/cfg.py PKT.LOSS CE_WEIGHT 1,
FEAT_WEIGHT 30000).
"""
import torch
import torch.nn as nn

from .registry import FeatureDistiller, Method, register

__all__ = ['PKTCosSim']


class PKTCosSim(nn.Module):
    def __init__(self, eps=1e-6):
        super().__init__()
        self.eps = eps

    def conditional_probability(self, feat):
        feat = feat / (feat.norm(dim=1, keepdim=True) + self.eps)
        similarity = (feat @ feat.t() + 1.0) / 2.0
        return similarity / similarity.sum(dim=1, keepdim=True)

    def forward(self, feat_s, feat_t):
        p_s = self.conditional_probability(feat_s.float())
        p_t = self.conditional_probability(feat_t.float())
        return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()


register(Method(
    name='pkt', title='probabilistic knowledge transfer', paper='https://arxiv.org/abs/1803.10837',
    transfers='feat; KL between cosine-similarity conditional probabilities',
    variant='cosine-similarity kernel',
    build=lambda ctx: FeatureDistiller(PKTCosSim(), ['feat'], relational=True),
    defaults={'lambda_kd': 10000.0},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 30000.0}},
))
