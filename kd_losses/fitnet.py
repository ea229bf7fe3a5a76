"""Hints.

Romero, Ballas, Kahou, Chassang, Gatta, Bengio: "FitNets: Hints for Thin Deep
Nets", ICLR 2015, https://arxiv.org/abs/1412.6550

The student's guided layer is pulled towards the teacher's hint layer with an
L2 loss. The seed's variant: the hint is the last stage's post-activation
(the last of `ctx.stage_keys`: rb3, or rb4 for four-stage networks), the loss
is the element-wise MSE, and it is trained jointly with the cross-entropy
instead of the paper's separate hint-training phase.

Where student and teacher maps have the same shape (the seed's resnet pairs)
there is no regressor, as in the seed. Where they differ, the student map
passes the paper's convolutional regressor to the teacher map's shape, in the
form of the CIFAR-100 benchmark's code (RepDistiller models/util.py ConvReg,
also mdistiller): a convolution chosen by the spatial sizes (3x3 stride 2 when
the student map is twice the teacher's; 4x4 stride-2 transposed when it is
half; otherwise a valid convolution of size 1 + s - t, which needs the
student map at least as large), then BN and ReLU. Other size ratios raise
ConfigError. The regressor is trained with the student and saved with the
distiller.

Under --protocol crd (the CIFAR-100 benchmark): CE weight 1, hint weight 100
(RepDistiller scripts/run_cifar_distill.sh `--distill hint -a 0 -b 100`;
mdistiller engine/cfg.py FITNET.LOSS CE_WEIGHT 1, FEAT_WEIGHT 100). The
benchmark's hint is its second stage (`--hint_layer 2`), not the last one.
"""
import torch.nn as nn
import torch.nn.functional as F

from .registry import ConfigError, FeatureDistiller, Method, register

__all__ = ['Hint']


class Hint(nn.Module):
    def forward(self, fm_s, fm_t):
        return F.mse_loss(fm_s.float(), fm_t.float())


def regressor_conv(s_shape, t_shape):
    """The convolution taking a [C, H, W] student map to the teacher's channels
    and size, or None where no such convolution is defined (see the docstring)."""
    (s_c, s_h, s_w), (t_c, t_h, t_w) = s_shape, t_shape
    if (s_h, s_w) == (2 * t_h, 2 * t_w):
        return nn.Conv2d(s_c, t_c, 3, stride=2, padding=1)
    if (2 * s_h, 2 * s_w) == (t_h, t_w):
        return nn.ConvTranspose2d(s_c, t_c, 4, stride=2, padding=1)
    if s_h >= t_h and s_w >= t_w:
        return nn.Conv2d(s_c, t_c, (1 + s_h - t_h, 1 + s_w - t_w))
    return None


def check_regressible(mode, key, s_shape, t_shape):
    """ConfigError, naming both shapes, where no regressor maps the student's
    `key` map onto the teacher's."""
    if regressor_conv(s_shape, t_shape) is None:
        raise ConfigError(f'{mode}: no regressor maps the student {key} {tuple(s_shape)} onto the '
                          f'teacher {key} {tuple(t_shape)}: the student map must be at least as '
                          'large as the teacher\'s or exactly half its size')


class HintRegressor(nn.Sequential):
    """Student map [B, C_s, H_s, W_s] -> [B, C_t, H_t, W_t]: conv (regressor_conv),
    BN, and a ReLU when the target is a post-activation map."""

    def __init__(self, s_shape, t_shape, relu=True):
        conv = regressor_conv(s_shape, t_shape)
        if conv is None:  # builds check first (check_regressible), with the method's name
            raise ValueError(f'no regressor maps {tuple(s_shape)} onto {tuple(t_shape)}')
        super().__init__(conv, nn.BatchNorm2d(t_shape[0]), *([nn.ReLU()] if relu else []))


class ThroughConnector(nn.Module):
    """`loss(connector(student map), teacher map)`: a loss behind a learnable
    connector on the student side, as one module per feature of a FeatureDistiller."""

    def __init__(self, connector, loss):
        super().__init__()
        self.connector, self.loss = connector, loss

    def forward(self, fm_s, fm_t):
        return self.loss(self.connector(fm_s), fm_t)


def build(ctx):
    key = ctx.stage_keys('fitnet')[-1]
    s_shape, t_shape = tuple(ctx.student_shapes[key]), tuple(ctx.teacher_shapes[key])
    if s_shape == t_shape:  # the seed: no regressor
        return FeatureDistiller(Hint(), [key], act='post')
    check_regressible('fitnet', key, s_shape, t_shape)
    return FeatureDistiller([ThroughConnector(HintRegressor(s_shape, t_shape), Hint())], [key],
                            act='post')


register(Method(
    name='fitnet', title='hints (FitNets)', paper='https://arxiv.org/abs/1412.6550',
    transfers='last stage post-activation (through a regressor where the shapes differ); MSE',
    variant='one phase with CE; the hint is the last stage; a regressor only where the maps differ in shape',
    build=build,
    defaults={'lambda_kd': 0.1},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 100.0}},
))
