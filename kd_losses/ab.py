"""Activation boundaries.

Heo, Lee, Yun, Choi: "Knowledge Transfer via Distillation of Activation
Boundaries Formed by Hidden Neurons", AAAI 2019, https://arxiv.org/abs/1811.03233

On pre-activations with margin m, each position costs (s+m)² where the
teacher's neuron is off (t <= 0) but the student's is not safely off
(s > -m), and (s-m)² where the teacher's is on (t > 0) but the student's is
not safely on (s <= m); the loss is the mean. As in the seed, the mean
replaces the paper's sum, the stages (every stage both networks have,
`ctx.stage_keys`) are averaged, and AB only initialises the student: 'init'
epochs on this loss alone, then the normal schedule with cross-entropy only,
both phases on one SGD optimiser whose momentum carries over, and the init
phase decaying the classifier the loss does not reach (see _two_phase).

Where a stage's maps have the same shape (the seed's resnet pairs) the
student map is compared directly, as in the seed. Where they differ, the
student's pre-activation first passes a connector to the teacher map's shape,
as the CIFAR-100 benchmark's code does (RepDistiller
models/util.py Connector: its ConvReg without the ReLU, i.e. a convolution
chosen by the spatial sizes, then BN; see fitnet.py). The connectors are
trained with the student in the 'init' phase and saved with the distiller;
the main phase does not use them. A size ratio no connector handles raises
ConfigError.

Under --protocol crd (the CIFAR-100 benchmark, RepDistiller): margin 1
(its ABLoss default), 30 init epochs of its 240 (`--init_epochs 30`), CE
weight 1 in the main phase and KD weight 1 on the init loss (its
`--distill abound -a 0 -b 1`: the init phase's loss is unweighted, the
main phase cross-entropy alone). Its init loss sums the stages with weights
2^(k-K) and the entries divided by the batch and 1000/3, where ours averages
both; its init phase runs at the constant main lr (ours: 0.1, 0.01, 0.001 of
it, the seed's), with an optimiser of its own (no Nesterov, its momentum not
carried into the main phase) over the connectors and the student's feature
layers, classifier excluded (ours: the seed's one optimiser, classifier included).
"""
import torch.nn as nn

from ._two_phase import INIT_DEFAULTS, INIT_FLAGS, InitThenCE
from .fitnet import HintRegressor, ThroughConnector, check_regressible
from .registry import ConfigError, FeatureDistiller, Flag, Method, register

__all__ = ['AB']


class AB(nn.Module):
    def __init__(self, margin):
        super().__init__()
        self.margin = margin

    def forward(self, fm_s, fm_t):
        s, t, m = fm_s.float(), fm_t.float(), self.margin
        teacher_on = t > 0
        push_down = (s + m).pow(2) * ((s > -m) & ~teacher_on)
        push_up = (s - m).pow(2) * ((s <= m) & teacher_on)
        return (push_down + push_up).mean()


def build(ctx):
    if ctx.args.m < 0:
        raise ConfigError(f'ab: the margin --m must be >= 0, got {ctx.args.m}')
    keys = ctx.stage_keys('ab')
    per_stage = []
    for key in keys:
        s_shape, t_shape = tuple(ctx.student_shapes[key]), tuple(ctx.teacher_shapes[key])
        if s_shape == t_shape:  # the seed: the maps are compared as they are
            connector = nn.Identity()
        else:  # a pre-activation target: the regressor without its ReLU
            check_regressible('ab', key, s_shape, t_shape)
            connector = HintRegressor(s_shape, t_shape, relu=False)
        per_stage.append(ThroughConnector(connector, AB(ctx.args.m)))
    return InitThenCE(FeatureDistiller(per_stage, keys, act='pre'))


register(Method(
    name='ab', title='activation boundaries (student initialisation, then CE)',
    paper='https://arxiv.org/abs/1811.03233',
    transfers='every stage pre-activation (through a connector where the shapes differ), mean; '
              'init phase only',
    variant='two phases on one optimiser (momentum carried over): 50 epochs of initialisation with '
            'the AB loss alone, then CE only (no soft targets)',
    build=build,
    defaults={'lambda_kd': 10.0, 'm': 2.0, **INIT_DEFAULTS},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 1.0, 'm': 1.0, 'init_epochs': 30}},
    flags={'m': Flag(float, 'margin of the activation boundary loss (AB)'), **INIT_FLAGS},
))
