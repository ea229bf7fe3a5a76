"""Softmax regression representation learning.

Yang, Martinez, Bulat, Tzimiropoulos: "Knowledge distillation via softmax
regression representation learning", ICLR 2021,
https://openreview.net/forum?id=ZzwDy_wiWv

The student's penultimate feature `feat` (the pooled vector) passes a
connector to the teacher's feature dimension: a 1x1 conv without bias on the
vector as a 1x1 map, BN, ReLU (the SimKD toolbox's CIFAR-100 SRRL,
DefangChen/SimKD models/util.py). Two terms:

- feature matching: fm = MSE(connector(feat_s), feat_t);
- softmax regression: the connected feature through the teacher's frozen
  classifier (`teacher.head`, read functionally: its weights are not part of
  this module) must give the teacher's logits, sr = MSE(head_t(connector(feat_s)),
  out_t).

The KD loss is srrl_alpha * fm + srrl_beta * sr; both terms are logged
(train_kd_fm, train_kd_sr). Defaults: alpha = beta = 1, lambda 1, as the
authors' code (jingyang2017/KD_SRRL train_imagenet_distillation.py: the two
terms summed, weight 1) and the SimKD toolbox's CIFAR-100 script (`-b 1`).

Departures: the authors' code applies the connector to the last feature map
and matches spatial means; the CIFAR-100 toolbox (followed here) connects the
pooled vector, which works for every pair, including students and teachers
whose head reads an extra conv after the last stage (MobileNetV2, ShuffleV2).
The toolbox's runs also add Hinton's KD (T 4, weight 1) and CE weight 1;
this mode is SRRL alone (the logit KD is the `st` mode). Losses in float32.

Under --protocol crd (the CIFAR-100 benchmark's schedule): the same weights
(CE weight 1, loss weight 1, alpha 1, beta 1; the toolbox's CIFAR-100 script).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import ConfigError, Distiller, Flag, Method, register

__all__ = ['SRRL']


class SRRL(nn.Module):
    """The connector and both losses; returns (fm, sr), unweighted."""

    def __init__(self, s_dim, t_dim):
        super().__init__()
        self.connector = nn.Sequential(nn.Conv2d(s_dim, t_dim, 1, bias=False),
                                       nn.BatchNorm2d(t_dim), nn.ReLU(inplace=True))
        nn.init.kaiming_normal_(self.connector[0].weight, mode='fan_out', nonlinearity='relu')

    def connect(self, feat_s):
        return self.connector(feat_s[:, :, None, None]).flatten(1)

    def forward(self, feat_s, feat_t, out_t, head_weight, head_bias=None):
        h = self.connect(feat_s)
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            fm = F.mse_loss(h, feat_t.float())
            bias = None if head_bias is None else head_bias.detach().float()
            logits = F.linear(h, head_weight.detach().float(), bias)
            sr = F.mse_loss(logits, out_t.float())
        return fm, sr


class SRRLDistiller(Distiller):
    loss_terms = ('fm', 'sr')

    def __init__(self, ctx, alpha, beta):
        super().__init__()
        if ctx.teacher is None:
            raise ConfigError("srrl uses the teacher's classifier: the context must give the teacher")
        head = ctx.teacher.head
        s_dim, t_dim = ctx.student_shapes['feat'][0], ctx.teacher_shapes['feat'][0]
        if head.in_features != t_dim:
            raise ConfigError(f"srrl: the teacher's classifier reads {head.in_features} features, "
                              f"its feat has {t_dim} (student feat {s_dim})")
        self.srrl = SRRL(s_dim, t_dim)
        self.alpha, self.beta = alpha, beta
        self.nets = (ctx.teacher,)  # a plain tuple: read, never owned

    def forward(self, s, t, batch):
        head = self.nets[0].head
        fm, sr = self.srrl(s.feat, t.feat.detach(), t.out.detach(), head.weight, head.bias)
        return {'fm': self.alpha * fm, 'sr': self.beta * sr}


def build(ctx):
    return SRRLDistiller(ctx, ctx.args.srrl_alpha, ctx.args.srrl_beta)


register(Method(
    name='srrl', title='softmax regression representation learning',
    paper='https://openreview.net/forum?id=ZzwDy_wiWv',
    transfers="feat through a 1x1-conv+BN+ReLU connector: MSE to the teacher's feat, and MSE of "
              "the teacher's frozen classifier on it to the teacher's logits",
    variant='connector on the pooled feature (CIFAR toolbox), not the map; no logit KD added',
    build=build,
    defaults={'lambda_kd': 1.0, 'srrl_alpha': 1.0, 'srrl_beta': 1.0},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 1.0, 'srrl_alpha': 1.0,
                               'srrl_beta': 1.0}},
    flags={'srrl_alpha': Flag(float, 'srrl: weight of the feature-matching term'),
           'srrl_beta': Flag(float, 'srrl: weight of the softmax-regression term')},
))
