"""Flow of solution procedure.

Yim, Joo, Bae, Kim: "A Gift from Knowledge Distillation: Fast Optimization,
Network Minimization and Transfer Learning", CVPR 2017,
https://openaccess.thecvf.com/content_cvpr_2017/papers/Yim_A_Gift_From_CVPR_2017_paper.pdf

FSP matrix of two maps: the larger one is average-pooled to the smaller's
size, then G[c1, c2] = Σ_positions f1[c1]·f2[c2] / (H·W). The loss is the MSE
between the student's and the teacher's matrices for the consecutive pairs
of stem and every stage both networks have (`ctx.stage_keys`): (stem, rb1),
(rb1, rb2), (rb2, rb3)[, (rb3, rb4)], post-activation, averaged with equal
weights as in the seed (the paper weights pairs and sums). Like the paper,
FSP only initialises the student: 'init' epochs on this loss alone, then the
normal schedule with cross-entropy only, both phases on one SGD optimiser
whose momentum carries over, and the init phase decaying the classifier the
loss does not reach, as in the seed (see _two_phase).

Each network's matrices are taken within that network, so its maps' spatial
sizes need not match the other's; but the student's and the teacher's
matrices are compared entry by entry, so stem and every stage need the same
channel counts in both. There is no connector in the paper or in the
CIFAR-100 benchmark's code, which refuses such pairs too (RepDistiller
distiller_zoo/FSP.py): ConfigError naming both shapes.

Under --protocol crd (the benchmark, RepDistiller): 30 init epochs of its 240
(`--init_epochs 30`), KD weight 1 on the init loss and CE weight 1 in
the main phase. Its script's `--distill fsp -a 0 -b 50` weight multiplies a
main-phase term it sets to 0 (helper/loops.py); the init phase takes the sum
of the pairs' losses unweighted (helper/pretrain.py), which this mode
averages. Its init phase runs at the constant main lr (here 0.1, 0.01, 0.001
of it, the seed's), with an optimiser of its own (no Nesterov, its momentum
not carried into the main phase) over the student's feature layers,
classifier excluded (here the seed's one optimiser, classifier included).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ._two_phase import INIT_DEFAULTS, INIT_FLAGS, InitThenCE
from .registry import ConfigError, Distiller, Method, pick, register

__all__ = ['FSP']


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
    def __init__(self, keys=('stem', 'rb1', 'rb2', 'rb3')):
        super().__init__()
        self.fsp = FSP()
        self.pairs = tuple(zip(keys[:-1], keys[1:]))  # consecutive maps

    def forward(self, s, t, batch):
        total = 0.0
        for first, second in self.pairs:
            total = total + self.fsp(pick(s, first, 'post'), pick(s, second, 'post'),
                                     pick(t, first, 'post').detach(),
                                     pick(t, second, 'post').detach())
        return total / len(self.pairs)


def build(ctx):
    keys = ('stem',) + tuple(ctx.stage_keys('fsp'))
    for key in keys:
        s_shape, t_shape = tuple(ctx.student_shapes[key]), tuple(ctx.teacher_shapes[key])
        if s_shape[0] != t_shape[0]:
            raise ConfigError(f'fsp: student and teacher {key} channels differ '
                              f'({s_shape} vs {t_shape}); their FSP matrices could not be '
                              'compared')
    return InitThenCE(FSPDistiller(keys))


register(Method(
    name='fsp', title='flow of solution procedure (student initialisation, then CE)',
    paper='https://openaccess.thecvf.com/content_cvpr_2017/papers/Yim_A_Gift_From_CVPR_2017_paper.pdf',
    transfers='FSP matrices of consecutive maps (stem, rb1), (rb1, rb2), ... post-activation, '
              'mean; init phase only; equal channels only',
    variant='two phases as AB, on one optimiser: initialisation with the FSP loss alone, then CE only',
    build=build,
    defaults={'lambda_kd': 1.0, **INIT_DEFAULTS},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 1.0, 'init_epochs': 30}},
    flags=dict(INIT_FLAGS),
))
