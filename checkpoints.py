"""Checkpoint files: atomic writes, safe loading, and the original zoo's format.

Every file is written to a temporary name, flushed and renamed, so a crash
leaves the previous file whole; every file is read with weights_only=True,
so a checkpoint cannot run code. Network weights are stored as the original
Knowledge-Distillation-Zoo stored them (`{'epoch', 'net', 'prec@1',
'prec@5'}`, keys prefixed `module.`), so its scripts read ours and ours
read its files, including its KD runs' `'snet'`.
"""
import os

import torch

from distributed import WORLD
from errors import UserError
from networks.checkpoint_layouts import adapt_state_dict, identify_network

ZOO_PREFIXES = ('module.', '_orig_mod.')


def zoo_state_dict(net):
    """State dict in the original zoo's layout: keys prefixed 'module.' as
    DataParallel saved them, so the seed's scripts load ours too."""
    net = getattr(net, 'module', net)
    net = getattr(net, '_orig_mod', net)
    return {'module.' + k: v.detach().clone() for k, v in net.state_dict().items()}


def strip_prefixes(state_dict):
    out = {}
    for k, v in state_dict.items():
        while k.startswith(ZOO_PREFIXES):
            k = k.split('.', 1)[1]
        out[k] = v
    return out


def save_checkpoint(state, path):
    """Write atomically: a temporary file in the same folder, flushed to disk,
    then renamed over `path`, so a crash leaves the previous file intact.
    Under torchrun only rank 0 writes."""
    if not WORLD.main:
        return
    tmp = f'{path}.tmp'
    with open(tmp, 'wb') as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path, what='checkpoint'):
    """Load a checkpoint with weights_only=True; any failure is a UserError naming the file."""
    if not os.path.isfile(path):
        raise UserError(f'{what} {path} does not exist')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f'{what} {path} cannot be loaded: it is truncated, corrupted or not a '
                        f'PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})')
    if not isinstance(ckpt, dict):
        raise UserError(f'{what} {path} holds a {type(ckpt).__name__}, not a checkpoint dict')
    return ckpt


NET_KEYS = ('net', 'snet', 'state_dict', 'model')


def network_state(ckpt, path, keys=NET_KEYS):
    """The network state dict inside a checkpoint: under 'net' (ours and the
    seed's baselines), 'snet' (the seed's KD runs) or the dict itself."""
    for key in keys:
        if isinstance(ckpt.get(key), dict):
            return strip_prefixes(ckpt[key])
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return strip_prefixes(ckpt)
    raise UserError(f'{path} holds no network weights (looked for keys {", ".join(keys)}; '
                    f'found {", ".join(map(str, ckpt)) or "nothing"})')


def load_network_weights(net, path, what='checkpoint', keys=NET_KEYS):
    """Load a checkpoint into `net`, strictly: ours, the original zoo's, or the
    CIFAR-100 benchmark's released teachers (`{'model': ...}`, their parameter
    names mapped to ours). A file for another architecture or class count is a
    UserError saying which network the file holds."""
    state = adapt_state_dict(net, network_state(load_checkpoint(path, what), path, keys))
    for key, value in net.state_dict().items():  # files from before BN counted its batches
        if key.endswith('num_batches_tracked') and key not in state:
            state[key] = value
    describe_mismatch(net, state, path, what)
    net.load_state_dict(state)
    return net


def describe_mismatch(net, state, path, what):
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or wrong):
        return
    found = identify_network(state)
    held = f'{found[0]} with {found[1]} classes' if found else 'an unknown network'
    expected = f'{getattr(net, "name", type(net).__name__)} with {getattr(net, "num_class", "?")} classes'
    detail = (f'missing {missing[:3]}' if missing else f'unexpected {unexpected[:3]}' if unexpected
              else f'shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, expected '
                   f'{tuple(own[wrong[0]].shape)}')
    raise UserError(f'{what} {path} does not match: expected {expected}, the file holds '
                    f'{held} ({detail})')


def initial_weights_name(net_name):
    """A baseline's initial weights file: the seed's initial_r20.pth.tar for
    resnet20 (initial_r8x4... for the other CIFAR ResNets), initial_<name>
    for the other networks."""
    if net_name.startswith('resnet'):
        return f"initial_r{net_name[len('resnet'):]}.pth.tar"
    return f'initial_{net_name}.pth.tar'


def zoo_record(net, epoch, top1=0.0, top5=0.0):
    """A checkpoint the original zoo's scripts can read."""
    return {'epoch': epoch, 'net': zoo_state_dict(net), 'prec@1': top1, 'prec@5': top5}
