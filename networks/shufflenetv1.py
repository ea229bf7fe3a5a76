"""ShuffleNet of Zhang et al., "ShuffleNet: An Extremely Efficient
Convolutional Neural Network for Mobile Devices" (CVPR 2018,
https://arxiv.org/abs/1707.01083), in the CIFAR form of the CRD benchmark
(RepDistiller's models/ShuffleNetv1.py, `ShuffleV1`: 3 groups, stages of 240,
480 and 960 channels with 4, 8 and 4 units).

A 1x1 stem conv at full resolution; each stage's first unit halves the
resolution and concatenates its average-pooled input to the new channels. The
features follow RepDistiller's preact list:

- `stem`: the stem's BN output before and after its ReLU (f0 is the post),
  24 x 32 x 32.
- `rbK`: the stage's last unit, its residual sum before and after the ReLU
  (preact f1..f3 and f1..f3): 240 x 16 x 16, 480 x 8 x 8, 960 x 4 x 4.
- `feat`: the average of rb3's post, 960 values.

Parameter names are RepDistiller's (`conv1, bn1, layer1..3.i.{conv1, bn1,
conv2, bn2, conv3, bn3}, linear`); PyTorch's default initialisation, as there.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.base import Features, ResStage, ZooNetwork


def channel_shuffle(x, groups):
    """[N, g*c, H, W] -> channels reordered as [c, g]: mixes information across groups."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class ShuffleUnit(nn.Module):
    """Grouped 1x1 conv, shuffle, depthwise 3x3, grouped 1x1 conv; added to the
    input, or at stride 2 concatenated to its 3x3 average pool. Returns (pre, post)."""

    def __init__(self, in_channels, out_channels, stride, groups):
        super().__init__()
        self.stride = stride
        mid = out_channels // 4
        # The stem's 24 channels are too few to split into groups.
        self.first_groups = 1 if in_channels == 24 else groups
        self.conv1 = nn.Conv2d(in_channels, mid, 1, groups=self.first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_channels, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        if self.first_groups > 1:
            out = channel_shuffle(out, self.first_groups)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)), inplace=True)))
        if self.stride == 2:
            pre = torch.cat([out, F.avg_pool2d(x, 3, 2, 1)], 1)
        else:
            pre = out + x
        return pre, F.relu(pre)


class ShuffleNetV1(ZooNetwork):
    def __init__(self, num_class=10, widths=(240, 480, 960), blocks=(4, 8, 4), groups=3):
        super().__init__()
        self.name, self.num_class, self.widths = 'ShuffleV1', num_class, tuple(widths)
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        stages, channels = [], 24
        for width, n in zip(widths, blocks):
            # The first unit adds width - channels new channels to its pooled input.
            units = [ShuffleUnit(channels, width - channels, 2, groups)]
            units += [ShuffleUnit(width, width, 1, groups) for _ in range(n - 1)]
            stages.append(ResStage(*units))
            channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(channels, num_class)

    @property
    def head(self):
        return self.linear

    @property
    def feature_shapes(self):
        w1, w2, w3 = self.widths
        return {'stem': (24, 32, 32), 'rb1': (w1, 16, 16), 'rb2': (w2, 8, 8), 'rb3': (w3, 4, 4),
                'feat': (w3,), 'out': (self.num_class,)}

    def forward(self, x):
        pre = self.bn1(self.conv1(x))
        stem = (pre, F.relu(pre))
        rb1 = self.layer1(stem[1])
        rb2 = self.layer2(rb1[1])
        rb3 = self.layer3(rb2[1])
        feat = rb3[1].mean(dim=(2, 3))
        return Features(stem, rb1, rb2, rb3, feat, self.linear(feat))


def ShuffleV1(num_class=10):
    return ShuffleNetV1(num_class)
