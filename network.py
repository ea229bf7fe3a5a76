"""CIFAR ResNets of He et al., "Deep Residual Learning for Image Recognition"
(CVPR 2016, https://arxiv.org/abs/1512.03385, Table 6), as the knowledge
distillation zoo uses them.

Parameter names are the original zoo's (`conv1, bn1, res1..3, fc`; inside a
block `conv1, bn1, conv2, bn2, ds`), so its checkpoints load unchanged.

`forward` returns `Features(stem, rb1, rb2, rb3, feat, out)`: `stem` and each
`rbK` are `(pre_activation, post_activation)` pairs, `feat` is the pooled
64-d vector before the classifier and `out` the logits. `Features` is a
tuple, so `stem, rb1, rb2, rb3, feat, out = net(x)` works as in the seed.
"""
from typing import NamedTuple, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class Features(NamedTuple):
    stem: Tuple[torch.Tensor, torch.Tensor]
    rb1: Tuple[torch.Tensor, torch.Tensor]
    rb2: Tuple[torch.Tensor, torch.Tensor]
    rb3: Tuple[torch.Tensor, torch.Tensor]
    feat: torch.Tensor
    out: torch.Tensor


class ResBlock(nn.Module):
    """Basic block; a channel change means stride 2 and a 1x1 conv + BN shortcut."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        stride = 2 if in_channels != out_channels else 1
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.ds = None
        if stride != 1:
            self.ds = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                    nn.BatchNorm2d(out_channels))

    def forward(self, x):
        residual = x if self.ds is None else self.ds(x)
        pre = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)), inplace=True))) + residual
        return pre, F.relu(pre)


class ResStage(nn.Sequential):
    """A stage of blocks; returns the last block's (pre, post) pair."""

    def forward(self, x):
        for block in self:
            pair = block(x)
            x = pair[1]
        return pair


class CifarResNet(nn.Module):
    def __init__(self, depth, num_class=10):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 14:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 2, got {depth}")
        n = (depth - 2) // 6
        self.depth, self.num_class = depth, num_class
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.res1 = ResStage(*[ResBlock(16, 16) for _ in range(n)])
        self.res2 = ResStage(ResBlock(16, 32), *[ResBlock(32, 32) for _ in range(n - 1)])
        self.res3 = ResStage(ResBlock(32, 64), *[ResBlock(64, 64) for _ in range(n - 1)])
        self.fc = nn.Linear(64, num_class)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def name(self):
        return f'resnet{self.depth}'

    @property
    def feature_shapes(self):
        """Per-sample shape of each output, for methods that build connectors."""
        return {'stem': (16, 32, 32), 'rb1': (16, 32, 32), 'rb2': (32, 16, 16),
                'rb3': (64, 8, 8), 'feat': (64,), 'out': (self.num_class,)}

    def get_channel_num(self):  # the seed's accessor
        return [s[0] for s in self.feature_shapes.values()]

    def get_chw_num(self):  # the seed's accessor
        return list(self.feature_shapes.values())

    def forward(self, x):
        pre = self.bn1(self.conv1(x))
        stem = (pre, F.relu(pre))
        rb1 = self.res1(stem[1])
        rb2 = self.res2(rb1[1])
        rb3 = self.res3(rb2[1])
        feat = rb3[1].mean(dim=(2, 3))  # global average pooling (AvgPool2d(8) in the seed)
        return Features(stem, rb1, rb2, rb3, feat, self.fc(feat))


def resnet20(num_class=10):
    return CifarResNet(20, num_class)


def resnet110(num_class=10):
    return CifarResNet(110, num_class)


NETWORKS = {'resnet20': resnet20, 'resnet110': resnet110}


def build_network(name, num_class):
    """The network called `name`; an unknown name raises ValueError listing the known ones."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; choose one of {', '.join(NETWORKS)}")
    return NETWORKS[name](num_class)
