"""What every network of the zoo returns and offers: the features that
distillation methods read (`Features`, `Features4`) and the base class with
`name`, `num_class`, `feature_shapes` and `head`. The network families import
this module; `network` registers the families."""
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


class ZooNetwork(nn.Module):
    """What every network offers besides forward: subclasses set `name` and
    `num_class` and define `feature_shapes` and `head`."""

    name: str
    num_class: int

    def get_channel_num(self):  # the seed's accessor
        return [s[0] for s in self.feature_shapes.values()]

    def get_chw_num(self):  # the seed's accessor
        return list(self.feature_shapes.values())


class ResStage(nn.Sequential):
    """A stage of blocks that each return (pre, post); returns the last pair."""

    def forward(self, x):
        for block in self:
            pair = block(x)
            x = pair[1]
        return pair
