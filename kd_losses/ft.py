"""Factor transfer.

Kim, Park, Kwak: "Paraphrasing Complex Network: Network Compression via
Factor Transfer", NeurIPS 2018, https://arxiv.org/abs/1802.04977

A paraphraser (conv encoder to int(k*C) factor channels, transposed-conv
decoder back to C) first learns to reconstruct the teacher's last-stage
post-activation (the last of `ctx.stage_keys`: rb3, or rb4) with an MSE in
its own phase; the seed trains it for 30 epochs at 0.1 * lr, kept constant
here, with an SGD optimiser of its own: momentum and weight decay as the
main one's, but without Nesterov (the seed's, whatever --nesterov says; the
main phase's optimiser follows --nesterov). Then it is frozen and a
translator (conv encoder, same style) maps the student's last stage to
factors. The loss is the L1 distance between the row-L2-normalised
flattened factors. As in the seed, the convolutions use BatchNorm on
CIFAR-10 only (bias instead of BN otherwise) and LeakyReLU(0.1) after every
layer, decoder output included.

Across networks: the translator takes the student's channels to the
teacher's factor channels (the paper's design), and where the two factor
maps differ in spatial size the larger is adaptively average-pooled to the
smaller's before the comparison, as the CIFAR-100 benchmark's code does
(RepDistiller distiller_zoo/FT.py); equal sizes are compared as they are.

Under --protocol crd (the benchmark, RepDistiller): CE weight 1, FT weight
200 (scripts/run_cifar_distill.sh `--distill factor -a 0 -b 200`), k 0.5,
30 paraphraser epochs of its 240 (`--init_epochs 30`). Departures from it:
its paraphraser trains at a constant lr of 0.01 for resnet and wrn students,
else the main lr (here 0.1 * lr), and its factor is the normalised
channel-mean of the squared factor map (an attention map) rather than the
whole normalised factor (the seed's form, kept).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .at import pool_to_smaller
from .registry import ConfigError, Distiller, Flag, Method, PretrainPhase, pick, register

__all__ = ['FT']


class FT(nn.Module):
    def forward(self, factor_s, factor_t):
        factor_s, factor_t = pool_to_smaller(factor_s, factor_t)
        factor_s = F.normalize(factor_s.float().flatten(1), dim=1)
        factor_t = F.normalize(factor_t.float().flatten(1), dim=1)
        return F.l1_loss(factor_s, factor_t)


def conv_block(conv, in_ch, out_ch, use_bn):
    """3x3 stride-1 (transposed) conv, BN or bias, LeakyReLU(0.1)."""
    layers = [conv(in_ch, out_ch, 3, 1, 1, bias=not use_bn)]
    if use_bn:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.LeakyReLU(0.1))
    return layers


def encoder(in_ch, factor_ch, use_bn):
    return nn.Sequential(*conv_block(nn.Conv2d, in_ch, in_ch, use_bn),
                         *conv_block(nn.Conv2d, in_ch, factor_ch, use_bn),
                         *conv_block(nn.Conv2d, factor_ch, factor_ch, use_bn))


def init_weights(module):
    for m in module.modules():
        if isinstance(m, nn.Conv2d):  # transposed convs keep torch's default, as in the seed
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


class Paraphraser(nn.Module):
    """Teacher map -> factor (encoder) -> reconstruction (decoder)."""

    def __init__(self, in_ch, factor_ch, use_bn):
        super().__init__()
        self.encoder = encoder(in_ch, factor_ch, use_bn)
        self.decoder = nn.Sequential(*conv_block(nn.ConvTranspose2d, factor_ch, factor_ch, use_bn),
                                     *conv_block(nn.ConvTranspose2d, factor_ch, in_ch, use_bn),
                                     *conv_block(nn.ConvTranspose2d, in_ch, in_ch, use_bn))
        init_weights(self)

    def forward(self, x):
        factor = self.encoder(x)
        return factor, self.decoder(factor)


class FTDistiller(Distiller):
    def __init__(self, ctx):
        super().__init__()
        self.key = ctx.stage_keys('ft')[-1]  # the last stage
        s_ch, t_ch = ctx.student_shapes[self.key][0], ctx.teacher_shapes[self.key][0]
        factor_ch = int(t_ch * ctx.args.k)
        if factor_ch < 1:
            raise ConfigError(f'--k {ctx.args.k} leaves no factor channels (int(k * {t_ch}) = 0)')
        use_bn = ctx.args.data_name == 'cifar10'
        self.paraphraser = Paraphraser(t_ch, factor_ch, use_bn)
        self.translator = init_weights(encoder(s_ch, factor_ch, use_bn))
        self.ft = FT()

    def paraphraser_loss(self, s, t, batch):
        target = pick(t, self.key, 'post').detach()
        _, reconstruction = self.paraphraser(target)
        return F.mse_loss(reconstruction.float(), target.float())

    def pretrain_phases(self, ctx):
        return [PretrainPhase('paraphraser', ctx.args.para_epochs, lambda epoch: 0.1,
                              list(self.paraphraser.parameters()), self.paraphraser_loss,
                              needs_student=False, train_modules=[self.paraphraser],
                              nesterov=False)]  # the seed's paraphraser optimiser

    def learnable_parameters(self):
        return list(self.translator.parameters())  # the paraphraser stays as its phase left it

    def train(self, mode=True):
        # The frozen paraphraser's BN keeps its statistics in the main phase
        # (its own phase puts it in train mode directly).
        super().train(mode)
        self.paraphraser.eval()
        return self

    def forward(self, s, t, batch):
        factor_s = self.translator(pick(s, self.key, 'post'))
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(pick(t, self.key, 'post').detach())
        return self.ft(factor_s, factor_t)


register(Method(
    name='ft', title='factor transfer', paper='https://arxiv.org/abs/1802.04977',
    transfers='last stage post-activation factors (paraphraser phase first; the larger factor '
              'map pooled to the smaller), L1',
    variant='paraphraser pre-trained for 30 epochs at 0.1 lr, without Nesterov; BN in paraphraser and '
            'translator on CIFAR-10 only',
    build=FTDistiller,
    defaults={'lambda_kd': 200.0, 'k': 0.5, 'para_epochs': 30},
    protocol_defaults={'crd': {'ce_weight': 1.0, 'lambda_kd': 200.0, 'k': 0.5, 'para_epochs': 30}},
    flags={'k': Flag(float, 'factor channels = int(k * teacher last-stage channels)', positive=True),
           'para_epochs': Flag(int, 'epochs of the paraphraser phase', positive=True, epochs_of=200,
                                 phase='paraphraser')},
))
