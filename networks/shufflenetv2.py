"""ShuffleNet V2 of Ma et al., "ShuffleNet V2: Practical Guidelines for
Efficient CNN Architecture Design" (ECCV 2018, https://arxiv.org/abs/1807.11164),
in the CIFAR form of the CRD benchmark (RepDistiller's models/ShuffleNetv2.py,
`ShuffleV2`: the 1x size, stages of 116, 232 and 464 channels with 3, 7 and 3
basic units after a downsampling unit, then a 1x1 conv to 1024).

The features follow RepDistiller's preact list:

- `stem`: the 1x1 stem's BN output before and after its ReLU (f0 is the
  post), 24 x 32 x 32.
- `rbK`: the stage's last unit: 116 x 16 x 16, 232 x 8 x 8, 464 x 4 x 4. post
  is that unit's output, RepDistiller's f1..f3 exactly. RepDistiller's preact
  f1..f3 is `cat(kept half, branch before its ReLU)`, taken before the unit's
  channel shuffle while the output is after it; pre here is that tensor
  shuffled the same way (the same values, channels in output order), so that
  post == relu(pre) (the kept half is post-ReLU already).
- `feat`: the 1x1 conv's activation averaged, 1024 values. `head_map(x)`
  recomputes that activation (1024 x 4 x 4) from rb3's map x.

Parameter names are RepDistiller's (`conv1, bn1, layer1..3.i.{conv1..5,
bn1..5}, conv2, bn2, linear`); PyTorch's default initialisation, as there.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from networks.base import Features, ZooNetwork, untracked_batch_stats
from networks.shufflenetv1 import channel_shuffle


class BasicUnit(nn.Module):
    """Keeps half the channels, sends the other half through 1x1, depthwise
    3x3, 1x1; concatenates and shuffles. Returns (pre, post)."""

    def __init__(self, channels):
        super().__init__()
        self.keep = channels // 2
        c = channels - self.keep
        self.conv1 = nn.Conv2d(c, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x):
        kept, x = x[:, :self.keep], x[:, self.keep:]
        out = self.bn3(self.conv3(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)), inplace=True)))))
        pre = channel_shuffle(torch.cat([kept, out], 1), 2)
        return pre, F.relu(pre)


class DownUnit(nn.Module):
    """Two stride-2 branches (depthwise 3x3, 1x1; and 1x1, depthwise 3x3, 1x1),
    concatenated and shuffled: half the resolution, `out_channels` channels."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 2, 1, groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleStage(nn.Sequential):
    """A DownUnit, then BasicUnits; returns the last unit's (pre, post)."""

    def forward(self, x):
        for i, unit in enumerate(self):
            if i == 0:
                x = unit(x)
            else:
                pair = unit(x)
                x = pair[1]
        return pair


class ShuffleNetV2(ZooNetwork):
    def __init__(self, num_class=10, widths=(116, 232, 464), blocks=(3, 7, 3), last_channels=1024):
        super().__init__()
        self.name, self.num_class, self.widths = 'ShuffleV2', num_class, tuple(widths)
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        stages, channels = [], 24
        for width, n in zip(widths, blocks):
            stages.append(ShuffleStage(DownUnit(channels, width), *[BasicUnit(width) for _ in range(n)]))
            channels = width
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(channels, last_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(last_channels)
        self.linear = nn.Linear(last_channels, num_class)

    @property
    def head(self):
        return self.linear

    def head_conv(self, x):
        """The 1x1 conv to `last_channels`, BN and ReLU after the last stage:
        the map the forward averages into `feat`."""
        return F.relu(self.bn2(self.conv2(x)))

    def head_map(self, x):
        """head_conv(x) from rb3's map x, its BN not counting the batch again."""
        return untracked_batch_stats(self.bn2, self.head_conv, x)

    @property
    def head_map_shape(self):
        return (self.linear.in_features, *self.feature_shapes['rb3'][1:])

    @property
    def feature_shapes(self):
        w1, w2, w3 = self.widths
        return {'stem': (24, 32, 32), 'rb1': (w1, 16, 16), 'rb2': (w2, 8, 8), 'rb3': (w3, 4, 4),
                'feat': (self.linear.in_features,), 'out': (self.num_class,)}

    def forward(self, x):
        pre = self.bn1(self.conv1(x))
        stem = (pre, F.relu(pre))
        rb1 = self.layer1(stem[1])
        rb2 = self.layer2(rb1[1])
        rb3 = self.layer3(rb2[1])
        feat = self.head_conv(rb3[1]).mean(dim=(2, 3))
        return Features(stem, rb1, rb2, rb3, feat, self.linear(feat))


def ShuffleV2(num_class=10):
    return ShuffleNetV2(num_class)
