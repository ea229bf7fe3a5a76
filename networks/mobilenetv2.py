"""MobileNetV2 of Sandler et al., "MobileNetV2: Inverted Residuals and Linear
Bottlenecks" (CVPR 2018, https://arxiv.org/abs/1801.04381), in the CIFAR form
of the CRD benchmark (RepDistiller's models/mobilenetv2.py, `mobile_half`:
expansion 6, width 0.5; named MobileNetV2 in mdistiller).

A stride-2 3x3 stem (so 16 x 16 from the start), seven groups of inverted
residual blocks, a 1x1 conv to 1280 channels, average pooling. The features
follow RepDistiller's list (at width 0.5):

- `stem`: the stem's BN output before and after its ReLU (f0 is the post),
  16 x 16 x 16.
- `rb1`..`rb4`: the outputs of block groups 1, 2, 4 and 6 (f1..f4): 12 x 16 x
  16, 16 x 8 x 8, 48 x 4 x 4, 160 x 2 x 2. Each ends in a linear bottleneck
  (BN, no ReLU), so pre and post are the same tensor.
- `feat`: the 1x1 conv's activation averaged, 1280 values. `head_map(x)`
  recomputes that activation (1280 x 2 x 2) from rb4's map x.

Parameter names are RepDistiller's (`conv1.{0,1}`, `blocks.g.i.conv.k`,
`conv2.{0,1}`, `classifier.0`).
"""
import torch.nn as nn
import torch.nn.functional as F

from networks.base import Features4, ZooNetwork, initialise, untracked_batch_stats

# (expansion, channels, blocks, first stride) per group; expansion None = the network's.
GROUPS = [(1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
          (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1)]


def conv_bn_relu(in_channels, out_channels, kernel, stride):
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):
    """1x1 expansion, 3x3 depthwise, linear 1x1 projection; identity shortcut
    when the shape is kept."""

    def __init__(self, in_channels, out_channels, stride, expansion):
        super().__init__()
        hidden = in_channels * expansion
        self.use_residual = stride == 1 and in_channels == out_channels
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(ZooNetwork):
    """The benchmark's MobileNetV2 (expansion 6, width 0.5) by default."""

    def __init__(self, num_class=10, expansion=6, width=0.5):
        super().__init__()
        self.name, self.num_class = 'MobileNetV2', num_class
        channels = int(32 * width)
        self.conv1 = conv_bn_relu(3, channels, 3, 2)
        self.blocks = nn.ModuleList()
        self.widths = [channels]
        for t, c, n, s in GROUPS:
            out = int(c * width)
            group = []
            for i in range(n):
                group.append(InvertedResidual(channels, out, s if i == 0 else 1, t or expansion))
                channels = out
            self.blocks.append(nn.Sequential(*group))
            self.widths.append(out)
        self.last_channels = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = conv_bn_relu(channels, self.last_channels, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channels, num_class))
        initialise(self, linear_std=0.01)

    @property
    def head(self):
        return self.classifier[0]

    def head_map(self, x):
        """The 1x1 conv's activation, whose average is `feat`, from rb4's map x;
        its BN does not count the batch again."""
        return untracked_batch_stats(self.conv2[1], self.conv2, x)

    @property
    def head_map_shape(self):
        return (self.last_channels, *self.feature_shapes['rb4'][1:])

    @property
    def feature_shapes(self):
        w = self.widths  # stem, then groups 0..6
        return {'stem': (w[0], 16, 16), 'rb1': (w[2], 16, 16), 'rb2': (w[3], 8, 8),
                'rb3': (w[5], 4, 4), 'rb4': (w[7], 2, 2), 'feat': (self.last_channels,),
                'out': (self.num_class,)}

    def forward(self, x):
        pre = self.conv1[1](self.conv1[0](x))
        stem = (pre, F.relu(pre))
        x = stem[1]
        stages = []
        for i, group in enumerate(self.blocks):
            x = group(x)
            if i in (1, 2, 4, 6):
                stages.append((x, x))
        feat = self.conv2(x).mean(dim=(2, 3))
        return Features4(stem, *stages, feat, self.head(feat))
