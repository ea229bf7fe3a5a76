"""The networks of the zoo: the CIFAR ResNets of He et al., "Deep Residual
Learning for Image Recognition" (CVPR 2016, https://arxiv.org/abs/1512.03385,
Table 6), defined here, and the other networks of the CIFAR-100 benchmark of
Tian et al., "Contrastive Representation Distillation" (CRD, ICLR 2020), in
the package `networks/`. Everything else imports networks from this module.

CIFAR ResNet parameter names are the original zoo's (`conv1, bn1, res1..3,
fc`; inside a block `conv1, bn1, conv2, bn2, ds`), so its checkpoints load
unchanged; `networks.checkpoint_layouts.adapt_state_dict` renames the benchmark's
(RepDistiller's `layerK`, `downsample`) to them. resnet8..resnet110 have
widths 16-16-32-64; resnet8x4 and resnet32x4 have 32-64-128-256, so their
first block changes channels at stride 1.

Every network returns the features distillation methods read:

- `Features(stem, rb1, rb2, rb3, feat, out)` from the 3-stage networks (CIFAR
  ResNets, wrn_*, ShuffleV1, ShuffleV2);
- `Features4(stem, rb1, rb2, rb3, rb4, feat, out)` from the 4-stage ones
  (vgg*, MobileNetV2, ResNet50).

`stem` and each `rbK` are `(pre_activation, post_activation)` pairs: the
tensor before the stage's final ReLU and after it (the same tensor twice where
a stage ends without one); `feat` is the pooled vector before the classifier
and `out` the logits. Which tensors these are follows the `forward(is_feat=
True, preact=...)` feature lists of RepDistiller, each family's docstring says
how. Both are tuples, so `stem, rb1, rb2, rb3, feat, out = net(x)` works as in
the seed; `.stages` gives the stage pairs.

Every network also has `name` (its key in NETWORKS), `num_class`,
`feature_shapes` (per-sample shape of each output) and `head` (the final
nn.Linear, `out = head(feat)`).
"""
from typing import NamedTuple, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Pair = Tuple[torch.Tensor, torch.Tensor]


class Features(NamedTuple):
    stem: Pair
    rb1: Pair
    rb2: Pair
    rb3: Pair
    feat: torch.Tensor
    out: torch.Tensor

    @property
    def stages(self):
        return (self.rb1, self.rb2, self.rb3)


class Features4(NamedTuple):
    stem: Pair
    rb1: Pair
    rb2: Pair
    rb3: Pair
    rb4: Pair
    feat: torch.Tensor
    out: torch.Tensor

    @property
    def stages(self):
        return (self.rb1, self.rb2, self.rb3, self.rb4)


class ZooNetwork(nn.Module):
    """What every network offers besides forward: subclasses set `name` and
    `num_class` and define `feature_shapes` and `head`."""

    name: str
    num_class: int

    def get_channel_num(self):  # the seed's accessor
        return [s[0] for s in self.feature_shapes.values()]

    def get_chw_num(self):  # the seed's accessor
        return list(self.feature_shapes.values())


class ResBlock(nn.Module):
    """Basic block. By default (the seed's blocks) a channel change means
    stride 2; a 1x1 conv + BN shortcut comes with any stride or channel change."""

    def __init__(self, in_channels, out_channels, stride=None):
        super().__init__()
        if stride is None:
            stride = 2 if in_channels != out_channels else 1
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.ds = None
        if stride != 1 or in_channels != out_channels:
            self.ds = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                    nn.BatchNorm2d(out_channels))

    def forward(self, x):
        residual = x if self.ds is None else self.ds(x)
        pre = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)), inplace=True))) + residual
        return pre, F.relu(pre)


class ResStage(nn.Sequential):
    """A stage of blocks that each return (pre, post); returns the last pair."""

    def forward(self, x):
        for block in self:
            pair = block(x)
            x = pair[1]
        return pair


class CifarResNet(ZooNetwork):
    def __init__(self, depth, num_class=10, widths=(16, 16, 32, 64), name=None):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        w0, w1, w2, w3 = widths
        self.depth, self.num_class, self.widths = depth, num_class, tuple(widths)
        self.name = name or f'resnet{depth}'
        self.conv1 = nn.Conv2d(3, w0, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w0)
        self.res1 = ResStage(ResBlock(w0, w1, 1), *[ResBlock(w1, w1) for _ in range(n - 1)])
        self.res2 = ResStage(ResBlock(w1, w2, 2), *[ResBlock(w2, w2) for _ in range(n - 1)])
        self.res3 = ResStage(ResBlock(w2, w3, 2), *[ResBlock(w3, w3) for _ in range(n - 1)])
        self.fc = nn.Linear(w3, num_class)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def head(self):
        return self.fc

    @property
    def feature_shapes(self):
        """Per-sample shape of each output, for methods that build connectors."""
        w0, w1, w2, w3 = self.widths
        return {'stem': (w0, 32, 32), 'rb1': (w1, 32, 32), 'rb2': (w2, 16, 16),
                'rb3': (w3, 8, 8), 'feat': (w3,), 'out': (self.num_class,)}

    def forward(self, x):
        pre = self.bn1(self.conv1(x))
        stem = (pre, F.relu(pre))
        rb1 = self.res1(stem[1])
        rb2 = self.res2(rb1[1])
        rb3 = self.res3(rb2[1])
        feat = rb3[1].mean(dim=(2, 3))  # global average pooling (AvgPool2d(8) in the seed)
        return Features(stem, rb1, rb2, rb3, feat, self.fc(feat))


def _cifar_resnet(depth, widths=(16, 16, 32, 64), suffix=''):
    def make(num_class=10):
        return CifarResNet(depth, num_class, widths, f'resnet{depth}{suffix}')
    make.__name__ = make.__qualname__ = f'resnet{depth}{suffix}'
    make.__doc__ = f'CIFAR ResNet-{depth}{suffix} (widths {"-".join(map(str, widths))}).'
    return make


resnet8 = _cifar_resnet(8)
resnet14 = _cifar_resnet(14)
resnet20 = _cifar_resnet(20)
resnet32 = _cifar_resnet(32)
resnet44 = _cifar_resnet(44)
resnet56 = _cifar_resnet(56)
resnet110 = _cifar_resnet(110)
resnet8x4 = _cifar_resnet(8, (32, 64, 128, 256), 'x4')
resnet32x4 = _cifar_resnet(32, (32, 64, 128, 256), 'x4')

# The families below import Features, Features4, ZooNetwork and ResStage from
# this module, which is far enough defined by now.
from networks.mobilenetv2 import MobileNetV2  # noqa: E402
from networks.resnetv2 import ResNet50  # noqa: E402
from networks.shufflenetv1 import ShuffleV1  # noqa: E402
from networks.shufflenetv2 import ShuffleV2  # noqa: E402
from networks.vgg import vgg8, vgg11, vgg13, vgg16, vgg19  # noqa: E402
from networks.wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2  # noqa: E402

# The seed's two first, so an error lists what the seed offered first.
NETWORKS = {f.__name__: f for f in (
    resnet20, resnet110, resnet8, resnet14, resnet32, resnet44, resnet56, resnet8x4, resnet32x4,
    wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2, vgg8, vgg11, vgg13, vgg16, vgg19,
    MobileNetV2, ShuffleV1, ShuffleV2, ResNet50)}


def build_network(name, num_class):
    """The network called `name`; an unknown name raises ValueError listing the known ones."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose one of {', '.join(NETWORKS)}")
    return NETWORKS[name](num_class)
