"""Wide residual networks of Zagoruyko and Komodakis, "Wide Residual Networks"
(BMVC 2016, https://arxiv.org/abs/1605.07146): wrn_16_1, wrn_16_2, wrn_40_1,
wrn_40_2, as the CRD benchmark (RepDistiller's models/wrn.py) defines them.

Pre-activation blocks (BN-ReLU-conv), so a stage ends with a bare residual sum
and its activation is the next block's `bn1` + ReLU (after the last stage, the
network's `bn1` + ReLU). The features follow RepDistiller's preact list:

- `stem`: the first conv's output, which no BN or ReLU follows until the first
  block: pre and post are that one tensor (RepDistiller's f0).
- `rbK`: pre is the stage's sum through the next BN (`block{K+1}.layer.0.bn1`,
  or `bn1` after block3), exactly RepDistiller's preact f1..f3; post is its
  ReLU, the activation the next stage (or the pooling) consumes. RepDistiller's
  non-preact f1..f3 are the raw sums before that BN, which no (pre, post) pair
  can hold.
- `feat`: the average of rb3's post, 64 * widen values.

Parameter names are RepDistiller's (`conv1, block1..3.layer.i.{bn1, conv1,
bn2, conv2, convShortcut}, bn1, fc`).
"""
import torch.nn as nn
import torch.nn.functional as F

from networks.base import Features, ZooNetwork, initialise


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut: identity, or a 1x1 conv
    of the activated input when the channels change."""

    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.convShortcut = None
        if in_channels != out_channels:
            self.convShortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x):
        return self.from_activated(x, F.relu(self.bn1(x)))

    def from_activated(self, x, act):
        """The block given its input `x` and `act = relu(bn1(x))` already computed."""
        out = self.conv2(F.relu(self.bn2(self.conv1(act)), inplace=True))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class WideStage(nn.Module):
    def __init__(self, blocks, in_channels, out_channels, stride):
        super().__init__()
        self.layer = nn.Sequential(*[WideBlock(in_channels if i == 0 else out_channels, out_channels,
                                               stride if i == 0 else 1) for i in range(blocks)])

    def forward(self, x, act=None):
        """`act`: relu(layer[0].bn1(x)) when the caller has it already."""
        for i, block in enumerate(self.layer):
            x = block.from_activated(x, act) if i == 0 and act is not None else block(x)
        return x


class WideResNet(ZooNetwork):
    def __init__(self, depth, widen, num_class=10):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"wide ResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.depth, self.widen, self.widths = depth, widen, widths
        self.name, self.num_class = f'wrn_{depth}_{widen}', num_class
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.block1 = WideStage(n, widths[0], widths[1], 1)
        self.block2 = WideStage(n, widths[1], widths[2], 2)
        self.block3 = WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_class)
        initialise(self, zero_linear_bias=True)

    @property
    def head(self):
        return self.fc

    @property
    def feature_shapes(self):
        w0, w1, w2, w3 = self.widths
        return {'stem': (w0, 32, 32), 'rb1': (w1, 32, 32), 'rb2': (w2, 16, 16),
                'rb3': (w3, 8, 8), 'feat': (w3,), 'out': (self.num_class,)}

    def forward(self, x):
        s = self.conv1(x)
        h1 = self.block1(s)
        pre1 = self.block2.layer[0].bn1(h1)
        rb1 = (pre1, F.relu(pre1))
        h2 = self.block2(h1, rb1[1])
        pre2 = self.block3.layer[0].bn1(h2)
        rb2 = (pre2, F.relu(pre2))
        h3 = self.block3(h2, rb2[1])
        pre3 = self.bn1(h3)
        rb3 = (pre3, F.relu(pre3))
        feat = rb3[1].mean(dim=(2, 3))
        return Features((s, s), rb1, rb2, rb3, feat, self.fc(feat))


def wrn_16_1(num_class=10):
    return WideResNet(16, 1, num_class)


def wrn_16_2(num_class=10):
    return WideResNet(16, 2, num_class)


def wrn_40_1(num_class=10):
    return WideResNet(40, 1, num_class)


def wrn_40_2(num_class=10):
    return WideResNet(40, 2, num_class)
