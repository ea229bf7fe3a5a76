"""Similarity-preserving distillation.

Tung, Mori: "Similarity-Preserving Knowledge Distillation", ICCV 2019,
https://arxiv.org/abs/1907.09682

G = f f^T over the batch's flattened feature maps (B x B), each row
L2-normalised; the loss is the MSE between the student's and the teacher's
normalised G, i.e. the paper's ||G_s - G_t||_F^2 / B^2. As in the seed it is
applied to the post-activations of the stages and averaged (every stage both
networks have, `ctx.stage_keys`). G is B x B whatever the maps' shapes, so
student and teacher maps of any channels and sizes pair without a connector.

Under --protocol crd (the CIFAR-100 benchmark): CE weight 1, SP weight 3000
(RepDistiller scripts/run_cifar_distill.sh `--distill similarity -a 0 -b
3000`; mdistiller engine/cfg.py SP.LOSS CE_WEIGHT 1, FEAT_WEIGHT 3000). The
benchmark applies it to the last stage only; this mode, as the seed,
averages it over the stages.
"""
import torch.nn as nn
import torch.nn.functional as F

from .registry import FeatureDistiller, Method, register

__all__ = ['SP']


class SP(nn.Module):
    @staticmethod
    def similarity(fm):
        fm = fm.flatten(1)
        return F.normalize(fm @ fm.t(), dim=1)

    def forward(self, fm_s, fm_t):
        return F.mse_loss(self.similarity(fm_s.float()), self.similarity(fm_t.float()))


register(Method(
    name='sp', title='similarity preserving', paper='https://arxiv.org/abs/1907.09682',
    transfers='every stage post-activation batch similarity, mean',
    variant='applied to every stage and averaged',
    build=lambda ctx: FeatureDistiller(SP(), ctx.stage_keys('sp'), act='post', relational=True),
    defaults={'lambda_kd': 3000.0},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 3000.0}},
))
