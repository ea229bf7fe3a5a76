"""Flow of solution procedure.

Yim, Joo, Bae, Kim: "A Gift from Knowledge Distillation: Fast Optimization,
Network Minimization and Transfer Learning", CVPR 2017,
https://openaccess.thecvf.com/content_cvpr_2017/papers/Yim_A_Gift_From_CVPR_2017_paper.pdf

FSP matrix of two maps: the larger one is average-pooled to the smaller's
size, then G[c1, c2] = Σ_positions f1[c1]·f2[c2] / (H·W). The loss is the MSE
between the student's and the teacher's matrices for the pairs (stem, rb1),
(rb1, rb2), (rb2, rb3) (post-activation), averaged with equal weights as in
the seed (the paper weights pairs and sums). Like the paper, FSP only
initialises the student: 'init' epochs on this loss alone, then the normal
schedule with cross-entropy only (see _two_phase).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._two_phase import INIT_DEFAULTS, INIT_FLAGS, InitThenCE
from .registry import ConfigError, Distiller, Method, pick, register

__all__ = ['FSP']

PAIRS = (('stem', 'rb1'), ('rb1', 'rb2'), ('rb2', 'rb3'))


class FSP(nn.Module):
    def forward(self, fm_s1, fm_s2, fm_t1, fm_t2):
        return F.mse_loss(self.fsp_matrix(fm_s1, fm_s2), self.fsp_matrix(fm_t1, fm_t2))

    @staticmethod
    def fsp_matrix(fm1, fm2):
        fm1, fm2 = fm1.float(), fm2.float()
        if fm1.shape[2:] != fm2.shape[2:]:
            small = min(fm1.shape[2:], fm2.shape[2:], key=lambda hw: hw[0] * hw[1])
            fm1, fm2 = F.adaptive_avg_pool2d(fm1, small), F.adaptive_avg_pool2d(fm2, small)
        positions = fm1.shape[2] * fm1.shape[3]
        return torch.bmm(fm1.flatten(2), fm2.flatten(2).transpose(1, 2)) / positions


class FSPDistiller(Distiller):
    def __init__(self):
        super().__init__()
        self.fsp = FSP()

    def forward(self, s, t, batch):
        total = 0.0
        for first, second in PAIRS:
            total = total + self.fsp(pick(s, first, 'post'), pick(s, second, 'post'),
                                     pick(t, first, 'post').detach(),
                                     pick(t, second, 'post').detach())
        return total / len(PAIRS)


def build(ctx):
    for key in ('stem', 'rb1', 'rb2', 'rb3'):
        if ctx.student_shapes[key][0] != ctx.teacher_shapes[key][0]:
            raise ConfigError(f'fsp: student and teacher {key} channels differ '
                              f'({ctx.student_shapes[key][0]} vs {ctx.teacher_shapes[key][0]}); '
                              'their FSP matrices could not be compared')
    return InitThenCE(FSPDistiller())


register(Method(
    name='fsp', title='flow of solution procedure (student initialisation, then CE)',
    paper='https://openaccess.thecvf.com/content_cvpr_2017/papers/Yim_A_Gift_From_CVPR_2017_paper.pdf',
    transfers='FSP matrices of (stem, rb1), (rb1, rb2), (rb2, rb3) post-activation, mean; '
              'init phase only',
    variant='two phases as AB: initialisation with the FSP loss alone, then CE only',
    build=build,
    defaults={'lambda_kd': 1.0, **INIT_DEFAULTS},
    flags=dict(INIT_FLAGS),
))
