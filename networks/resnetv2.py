"""ResNet-50 of He et al., "Deep Residual Learning for Image Recognition" (CVPR
2016, https://arxiv.org/abs/1512.03385), the ImageNet bottleneck design with a
3x3 stride-1 stem and no max pooling for 32x32 inputs, as the CRD benchmark
(RepDistiller's models/resnetv2.py, `ResNet50`) defines it.

The features follow RepDistiller's lists:

- `stem`: the stem's BN output before and after its ReLU (f0 is the post),
  64 x 32 x 32.
- `rb1`..`rb4`: each stage's last bottleneck, its residual sum before and
  after the ReLU (preact f1..f4 and f1..f4): 256 x 32 x 32, 512 x 16 x 16,
  1024 x 8 x 8, 2048 x 4 x 4.
- `feat`: the average of rb4's post, 2048 values.

Parameter names are RepDistiller's (`conv1, bn1, layer1..4.i.{conv1..3,
bn1..3, shortcut.{0,1}}, linear`).
"""
import torch.nn as nn
import torch.nn.functional as F

from networks.base import Features4, ResStage, ZooNetwork, initialise


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4; a 1x1 conv + BN
    shortcut when the shape changes. Returns (pre, post)."""

    expansion = 4

    def __init__(self, in_channels, channels, stride):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        pre = self.bn3(self.conv3(out)) + self.shortcut(x)
        return pre, F.relu(pre)


class BottleneckResNet(ZooNetwork):
    def __init__(self, blocks=(3, 4, 6, 3), num_class=10, name='ResNet50'):
        super().__init__()
        self.name, self.num_class = name, num_class
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, channels = [], 64
        for k, n in enumerate(blocks):
            width = 64 * 2 ** k
            stages.append(ResStage(*[Bottleneck(channels if i == 0 else width * 4, width,
                                                (1 if k == 0 else 2) if i == 0 else 1)
                                     for i in range(n)]))
            channels = width * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(channels, num_class)
        initialise(self)

    @property
    def head(self):
        return self.linear

    @property
    def feature_shapes(self):
        return {'stem': (64, 32, 32), 'rb1': (256, 32, 32), 'rb2': (512, 16, 16),
                'rb3': (1024, 8, 8), 'rb4': (2048, 4, 4), 'feat': (2048,), 'out': (self.num_class,)}

    def forward(self, x):
        pre = self.bn1(self.conv1(x))
        stem = (pre, F.relu(pre))
        rb1 = self.layer1(stem[1])
        rb2 = self.layer2(rb1[1])
        rb3 = self.layer3(rb2[1])
        rb4 = self.layer4(rb3[1])
        feat = rb4[1].mean(dim=(2, 3))
        return Features4(stem, rb1, rb2, rb3, rb4, feat, self.linear(feat))


def ResNet50(num_class=10):
    return BottleneckResNet((3, 4, 6, 3), num_class)
