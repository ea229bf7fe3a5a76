"""The networks of the zoo, by name: the CIFAR ResNets of He et al., "Deep
Residual Learning for Image Recognition" (CVPR 2016,
https://arxiv.org/abs/1512.03385, Table 6) and the other networks of the
CIFAR-100 benchmark of Tian et al., "Contrastive Representation
Distillation" (CRD, ICLR 2020), one family per module in `networks/`.
Everything else imports networks from this module.

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
`feature_shapes` (per-sample shape of each output), `head` (the final
nn.Linear, `out = head(feat)`) and `head_map(x)`: the map whose global
average is `feat`, from the last stage's post-activation map x. That is x
itself except in MobileNetV2 and ShuffleV2, whose classifier reads an extra
1x1 conv + BN + ReLU after the last stage: there head_map runs that conv
again, its BN not counting the batch a second time (same input, same batch
statistics: the forward's map). `head_map_shape` is its per-sample shape.
"""
from networks.base import Features, Features4, ZooNetwork
from networks.mobilenetv2 import MobileNetV2
from networks.resnet import (CifarResNet, resnet8, resnet8x4, resnet14, resnet20,
                             resnet32, resnet32x4, resnet44, resnet56, resnet110)
from networks.resnetv2 import ResNet50
from networks.shufflenetv1 import ShuffleV1
from networks.shufflenetv2 import ShuffleV2
from networks.vgg import vgg8, vgg11, vgg13, vgg16, vgg19
from networks.wrn import wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2

# What other modules import from here: the features, the networks and their registry.
__all__ = ['Features', 'Features4', 'ZooNetwork', 'CifarResNet', 'NETWORKS', 'build_network']

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
