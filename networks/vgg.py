"""VGG networks of Simonyan and Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition" (ICLR 2015, https://arxiv.org/abs/1409.1556),
with batch normalisation and one linear classifier, as the CRD benchmark
(RepDistiller's models/vgg.py, `vgg8_bn` .. `vgg19_bn`, named vgg8 .. vgg19
in its model_dict) defines them for CIFAR.

Five blocks of 3x3 conv(+bias)-BN-ReLU, the last ReLU of each block applied by
the network; 2x2 max pooling after blocks 0, 1 and 2 (RepDistiller pools after
block 3 too only for 64x64 inputs; these are CIFAR networks, 32x32 only), then
global average pooling. The features follow RepDistiller's lists:

- `stem`: block0 (64 x 32 x 32) before and after its ReLU; RepDistiller's f0
  is the post-ReLU tensor, so block0 is the stem, not a stage.
- `rb1`..`rb4`: blocks 1..4 before (RepDistiller's preact f1..f4) and after
  their ReLU: 128 x 16 x 16, 256 x 8 x 8, 512 x 4 x 4, 512 x 4 x 4.
- `feat`: the average of rb4's post, 512 values.

Parameter names are RepDistiller's (`block0..4.<index in the block>`,
`classifier`).
"""
import torch.nn as nn
import torch.nn.functional as F

from networks.base import Features4, ZooNetwork, initialise

# Output channels of the convs of blocks 0..4.
CONFIGS = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    19: [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def vgg_block(in_channels, widths):
    """conv-BN-ReLU per width, without the last ReLU."""
    layers = []
    for w in widths:
        layers += [nn.Conv2d(in_channels, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_channels = w
    return nn.Sequential(*layers[:-1])


class VGG(ZooNetwork):
    def __init__(self, depth, num_class=10):
        super().__init__()
        cfg = CONFIGS[depth]
        self.depth, self.name, self.num_class = depth, f'vgg{depth}', num_class
        self.block0 = vgg_block(3, cfg[0])
        self.block1 = vgg_block(cfg[0][-1], cfg[1])
        self.block2 = vgg_block(cfg[1][-1], cfg[2])
        self.block3 = vgg_block(cfg[2][-1], cfg[3])
        self.block4 = vgg_block(cfg[3][-1], cfg[4])
        self.classifier = nn.Linear(cfg[4][-1], num_class)
        self.widths = tuple(c[-1] for c in cfg)
        initialise(self, linear_std=0.01)

    @property
    def head(self):
        return self.classifier

    @property
    def feature_shapes(self):
        w = self.widths
        return {'stem': (w[0], 32, 32), 'rb1': (w[1], 16, 16), 'rb2': (w[2], 8, 8),
                'rb3': (w[3], 4, 4), 'rb4': (w[4], 4, 4), 'feat': (w[4],), 'out': (self.num_class,)}

    def forward(self, x):
        pairs = []
        for i, block in enumerate((self.block0, self.block1, self.block2, self.block3, self.block4)):
            if 0 < i < 4:
                x = F.max_pool2d(x, 2)
            pre = block(x)
            x = F.relu(pre)
            pairs.append((pre, x))
        feat = x.mean(dim=(2, 3))
        return Features4(*pairs, feat, self.classifier(feat))


def vgg8(num_class=10):
    return VGG(8, num_class)


def vgg11(num_class=10):
    return VGG(11, num_class)


def vgg13(num_class=10):
    return VGG(13, num_class)


def vgg16(num_class=10):
    return VGG(16, num_class)


def vgg19(num_class=10):
    return VGG(19, num_class)
