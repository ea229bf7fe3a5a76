"""What every network of the zoo returns and offers: the features that
distillation methods read (`Features`, `Features4`) and the base class with
`name`, `num_class`, `feature_shapes`, `head` and `head_map`, and the
initialisation the families share. The network families import this
module; `network` registers the families."""
from typing import NamedTuple, Tuple

import torch
import torch.nn as nn

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


def last_stage(shapes):
    """The key of the last stage ('rb3' or 'rb4') in a network's feature shapes."""
    return [k for k in shapes if k.startswith('rb')][-1]


def untracked_batch_stats(norm, layers, x):
    """`layers(x)` with the BatchNorm `norm` (nn.BatchNorm2d, nn.SyncBatchNorm
    or distributed.GlobalBatchNorm2d) leaving its running statistics and
    batch count alone: in train mode it normalises by the batch's statistics
    as usual but counts nothing, in eval mode it reads the running ones. For
    a layer run again on a batch the forward already counted. A plain
    attribute toggle, so torch.compile(fullgraph=True) traces it."""
    tracked = norm.track_running_stats
    norm.track_running_stats = False
    try:
        return layers(x)
    finally:
        norm.track_running_stats = tracked


class ZooNetwork(nn.Module):
    """What every network offers besides forward: subclasses set `name` and
    `num_class` and define `feature_shapes` and `head`.

    `head_map(x)` is the map whose global average is `feat`, computed from
    the last stage's post-activation map x (`features.rbK[1]`): x itself
    where the classifier reads the last stage pooled (here), the output of
    the extra 1x1 conv + BN + ReLU after it in MobileNetV2 and ShuffleV2,
    which override it. It changes no state (BN statistics are not counted
    again), so methods that pool the map by regions (SDD) can call it after
    the forward. `head_map_shape` is its per-sample shape."""

    name: str
    num_class: int

    def head_map(self, x):
        return x

    @property
    def head_map_shape(self):
        return tuple(self.feature_shapes[last_stage(self.feature_shapes)])

    def get_channel_num(self):  # the seed's accessor
        return [s[0] for s in self.feature_shapes.values()]

    def get_chw_num(self):  # the seed's accessor
        return list(self.feature_shapes.values())


def initialise(net, linear_std=None, zero_linear_bias=False):
    """The CIFAR families' initialisation: He-normal convolutions (fan out),
    zero convolution biases, unit BN scales and zero shifts; linear layers
    N(0, linear_std) with zero bias where linear_std is given (VGG,
    MobileNetV2), PyTorch's default otherwise (zeroing only the bias where
    zero_linear_bias: WRN). Modules in order, so a seed gives the weights it
    gave before this was shared."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(m.bias)


class ResStage(nn.Sequential):
    """A stage of blocks that each return (pre, post); returns the last pair."""

    def forward(self, x):
        for block in self:
            pair = block(x)
            x = pair[1]
        return pair
