"""Reading the teacher checkpoints released with the CIFAR-100 benchmark of
Tian et al., "Contrastive Representation Distillation" (ICLR 2020; RepDistiller
and mdistiller publish them as `{'model': state_dict}`, e.g.
`resnet32x4_vanilla/ckpt_epoch_240.pth`, keys possibly prefixed `module.`).

Two functions, for the checkpoint loader:

- `adapt_state_dict(net, state_dict)`: the state dict under our parameter
  names. Only the CIFAR ResNets are named differently (RepDistiller's
  `layerK.i...downsample.j` is our `resK.i...ds.j`); the other families use
  RepDistiller's names already.
- `identify_network(state_dict)`: which network of NETWORKS, with how many
  classes, a state dict (ours or the benchmark's) holds; None if none.
"""
import functools
import re

import torch

import network

# Benchmark name -> ours, per network class; applied to every key.
_RENAMES = {
    network.CifarResNet: [(re.compile(r'^layer(\d+)\.'), r'res\1.'),
                          (re.compile(r'\.downsample\.'), '.ds.')],
}


def _strip_module(key):
    return key[len('module.'):] if key.startswith('module.') else key


def adapt_state_dict(net, state_dict):
    """adapt_state_dict(net: nn.Module, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]

    `state_dict` (ours, or the CRD benchmark's layout as RepDistiller and
    mdistiller save it) renamed to the parameter names of `net`, one of the
    networks in NETWORKS; a leading 'module.' (DataParallel) is dropped from
    each key. Keys already in our layout are kept as they are, so this is the
    identity for our own checkpoints and for the families that use
    RepDistiller's names. Tensors are not copied. Nothing is checked: load the
    result with `net.load_state_dict(..., strict=True)` to find a mismatch."""
    renames = next((r for cls, r in _RENAMES.items() if isinstance(net, cls)), ())
    out = {}
    for key, value in state_dict.items():
        key = _strip_module(key)
        for pattern, replacement in renames:
            key = pattern.sub(replacement, key)
        out[key] = value
    return out


@functools.lru_cache(maxsize=None)
def _signatures(names):
    """name -> (a shape-only instance, {key: shape}, head weight key, head bias key)."""
    out = {}
    with torch.device('meta'):  # shapes only: no memory, no initialisation cost
        for name in names:
            net = network.NETWORKS[name](1)
            keys = {id(t): k for k, t in net.state_dict(keep_vars=True).items()}
            shapes = {k: tuple(t.shape) for k, t in net.state_dict().items()
                      if not k.endswith('num_batches_tracked')}
            out[name] = (net, shapes, keys[id(net.head.weight)], keys.get(id(net.head.bias)))
    return out


def identify_network(state_dict):
    """identify_network(state_dict: Mapping[str, Tensor]) -> tuple[str, int] | None

    The (name in NETWORKS, number of classes) of the network `state_dict`
    holds, in our layout or the benchmark's ('module.' prefixes allowed): the
    network whose parameters and buffers it has exactly, same names and shapes,
    except the number of rows of the classifier, which gives the class count.
    BN `num_batches_tracked` counters are ignored (older files lack them).
    None for anything else (another network, a partial or junk dict, a value
    that is not a tensor)."""
    if not isinstance(state_dict, dict) or not state_dict:
        return None
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()):
        return None
    for name, (net, shapes, head_w, head_b) in _signatures(tuple(network.NETWORKS)).items():
        state = adapt_state_dict(net, state_dict)
        got = {k: tuple(v.shape) for k, v in state.items() if not k.endswith('num_batches_tracked')}
        if got.keys() != shapes.keys() or len(got[head_w]) != 2:
            continue
        num_class = got[head_w][0]
        expected = dict(shapes, **{head_w: (num_class, shapes[head_w][1])})
        if head_b is not None:
            expected[head_b] = (num_class,)
        if got == expected and num_class > 0:
            return name, num_class
    return None
