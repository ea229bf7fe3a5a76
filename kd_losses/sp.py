"""Similarity-preserving distillation.

Tung, Mori: "Similarity-Preserving Knowledge Distillation", ICCV 2019,
https://arxiv.org/abs/1907.09682

G = f f^T over the batch's flattened feature maps (B x B), each row
L2-normalised; the loss is the MSE between the student's and the teacher's
normalised G, i.e. the paper's ||G_s - G_t||_F^2 / B^2. As in the seed it is
applied to the post-activations of the three stages and averaged.
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
    transfers='rb1..3 post-activation batch similarity, mean',
    variant='applied to the three stages and averaged',
    build=lambda ctx: FeatureDistiller(SP(), ['rb1', 'rb2', 'rb3'], act='post',
                                      relational=True),
    defaults={'lambda_kd': 3000.0},
))
