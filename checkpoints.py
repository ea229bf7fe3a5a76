"""Checkpoint files: atomic writes, safe loading, and the original zoo's format.

Every file is written to a temporary name, flushed and renamed, so a crash
leaves the previous file whole; every file is read with weights_only=True,
so a checkpoint cannot run code. Each file carries a digest of its content,
checked on load, so a damaged file is refused instead of silently changing
a result (files without one, e.g. the original zoo's, load unchecked).
Network weights are stored as the original
Knowledge-Distillation-Zoo stored them (`{'epoch', 'net', 'prec@1',
'prec@5'}`, keys prefixed `module.`), so its scripts read ours and ours
read its files, including its KD runs' `'snet'`.
"""
import hashlib
import os
import pickle
import re

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


def content_digest(obj, h=None):
    """sha256 (hex) of a checkpoint's content: every tensor's dtype, shape and
    bytes and every other value's repr, walked in a fixed order."""
    top = h is None
    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f'T{t.dtype}{tuple(t.shape)}'.encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(b'{')
        for key in sorted(obj, key=str):
            h.update(repr(key).encode())
            content_digest(obj[key], h)
        h.update(b'}')
    elif isinstance(obj, (list, tuple)):
        h.update(b'[')
        for value in obj:
            content_digest(value, h)
        h.update(b']')
    else:
        h.update(repr(obj).encode())
    return h.hexdigest() if top else h


def file_digest(path):
    """sha256 (hex) of a file's bytes: what a run was built from (teacher, initial weights)."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(state, path):
    """Write atomically, with a digest of the content: a temporary file in the
    same folder, flushed to disk, then renamed over `path`, so a crash leaves
    the previous file intact. A failed write (disk full, read-only folder) is
    a UserError and leaves no temporary file. Under torchrun only rank 0 writes."""
    if not WORLD.main:
        return
    state = {**state, 'digest': content_digest(state)}
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise UserError(f'cannot write {path}: {e.strerror or e}; the previous file is kept') from None


def load_checkpoint(path, what='checkpoint'):
    """Load a checkpoint with weights_only=True and check its digest; any
    failure is a UserError naming the file and saying what is wrong."""
    if not os.path.exists(path):
        raise UserError(f'{what} {path} does not exist')
    if not os.path.isfile(path):
        raise UserError(f'{what} {path} is not a regular file')
    if os.path.getsize(path) == 0:
        raise UserError(f'{what} {path} is empty (0 bytes): a write was interrupted or the file '
                        f'was truncated')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        refused = refused_global(e)
        if refused is not None:  # a class or function: unpickling it could run code
            raise UserError(f'{what} {path} is refused: it holds objects other than tensors and '
                            f'plain values ({refused}), and loading those could run code') from None
        raise UserError(f'{what} {path} cannot be loaded: it is truncated, corrupted or not a '
                        f'PyTorch checkpoint') from None
    except Exception as e:
        raise UserError(f'{what} {path} cannot be loaded: it is truncated, corrupted or not a '
                        f'PyTorch checkpoint ({_first_line(e)})') from None
    if not isinstance(ckpt, dict):
        raise UserError(f'{what} {path} holds a {type(ckpt).__name__}, not a checkpoint dict')
    if 'digest' in ckpt:
        stored = ckpt.pop('digest')
        if stored != content_digest(ckpt):
            raise UserError(f'{what} {path} is corrupted: its content does not match the digest '
                            f'stored when it was written')
    return ckpt


def refused_global(error):
    """The class or function whose import torch's weights-only loader refused,
    or None when the load failed for another reason. torch words it
    'Unsupported global: GLOBAL x was not an allowed global' or, for a module
    it blocks outright (os, subprocess, ...), 'unsupported GLOBAL x whose
    module ... is blocked'."""
    text = str(error)
    if 'unsupported global' not in text.lower():
        return None
    found = re.search(r'GLOBAL\s+([\w.]+)', text)
    return found.group(1) if found else 'a class or function'


def _first_line(error):
    lines = str(error).strip().splitlines()
    return f'{type(error).__name__}: {lines[0][:200]}' if lines else type(error).__name__


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
