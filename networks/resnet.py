"""The CIFAR ResNets of He et al., "Deep Residual Learning for Image
Recognition" (CVPR 2016, https://arxiv.org/abs/1512.03385, Table 6), as the
original zoo and the CRD benchmark use them: resnet8..resnet110 (widths
16-16-32-64) and resnet8x4, resnet32x4 (32-64-128-256, so their first block
changes channels at stride 1).

Parameter names are the original zoo's (`conv1, bn1, res1..3, fc`; inside a
block `conv1, bn1, conv2, bn2, ds`), so its checkpoints load unchanged;
`networks.checkpoint_layouts.adapt_state_dict` renames the benchmark's
(RepDistiller's `layerK`, `downsample`) to them. resnet20 and resnet110 are
exactly the seed's networks.
"""
import torch.nn as nn
import torch.nn.functional as F

from networks.base import Features, ResStage, ZooNetwork, initialise


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
        initialise(self)

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
