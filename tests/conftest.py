"""Shared fixtures: tiny CIFAR datasets written in the standard python layout
(so the real loading code runs), and a baseline run to take checkpoints from."""
import atexit
import os
import pickle
import shutil
import tempfile

import numpy as np
import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

# Inductor's kernel cache is shared by every process of the machine under
# /tmp; a suite run beside another (or a compiling run killed mid-write) could
# then load a half-written kernel. Each suite run compiles into its own folder,
# inherited by the runs the tests start as subprocesses.
os.environ['TORCHINDUCTOR_CACHE_DIR'] = tempfile.mkdtemp(prefix='kdzoo-inductor-')
atexit.register(shutil.rmtree, os.environ['TORCHINDUCTOR_CACHE_DIR'], ignore_errors=True)

# Ten colours far apart: a tiny net separates them in a few steps.
PALETTE = np.array([[r, g, b] for r in (30, 225) for g in (30, 225) for b in (30, 225)]
                   + [[128, 128, 30], [30, 128, 225]], dtype=np.int64)


def make_images(labels, rng, learnable):
    n = len(labels)
    if not learnable:
        return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    colour = PALETTE[labels % len(PALETTE)][:, :, None]                # [n, 3, 1]
    noise = rng.integers(-25, 26, size=(n, 3, 1024))
    return np.clip(colour + noise, 0, 255).astype(np.uint8).reshape(n, 3072)


def write_cifar(root, name='cifar10', n_train=100, n_test=40, learnable=False, seed=0):
    """Write a tiny dataset in the official pickle layout under `root`; returns
    the arrays written: {'train': (data, labels), 'test': (data, labels)}."""
    rng = np.random.default_rng(seed)
    num_class = 10 if name == 'cifar10' else 100
    out = {}
    for split, n in (('train', n_train), ('test', n_test)):
        labels = np.arange(n) % num_class
        rng.shuffle(labels)
        out[split] = (make_images(labels, rng, learnable), labels)
    if name == 'cifar10':
        folder = os.path.join(root, 'cifar-10-batches-py')
        os.makedirs(folder, exist_ok=True)
        data, labels = out['train']
        for i, chunk in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            dump(os.path.join(folder, f'data_batch_{i}'),
                 {'batch_label': f'training batch {i} of 5', 'labels': labels[chunk].tolist(),
                  'data': data[chunk], 'filenames': [f'{j}.png' for j in chunk]})
        data, labels = out['test']
        dump(os.path.join(folder, 'test_batch'),
             {'batch_label': 'testing batch 1 of 1', 'labels': labels.tolist(), 'data': data,
              'filenames': [f'{j}.png' for j in range(n_test)]})
        dump(os.path.join(folder, 'batches.meta'),
             {'label_names': [f'class{i}' for i in range(10)], 'num_vis': 3072})
    else:
        folder = os.path.join(root, 'cifar-100-python')
        os.makedirs(folder, exist_ok=True)
        for split in ('train', 'test'):
            data, labels = out[split]
            dump(os.path.join(folder, split),
                 {'filenames': [f'{j}.png' for j in range(len(labels))], 'batch_label': split,
                  'fine_labels': labels.tolist(), 'coarse_labels': (labels // 5).tolist(),
                  'data': data})
        dump(os.path.join(folder, 'meta'), {'fine_label_names': [f'c{i}' for i in range(100)],
                                            'coarse_label_names': [f'g{i}' for i in range(20)]})
    return out


def dump(path, obj):
    with open(path, 'wb') as f:
        pickle.dump(obj, f, protocol=2)


@pytest.fixture(scope='session')
def cifar10_root(tmp_path_factory):
    root = tmp_path_factory.mktemp('cifar10')
    write_cifar(str(root), 'cifar10', n_train=100, n_test=40, learnable=True)
    return str(root)


@pytest.fixture(scope='session')
def base_run(tmp_path_factory, cifar10_root):
    """A one-epoch resnet20 baseline on the tiny data: its initial weights and
    trained checkpoint serve as student start and teacher in KD tests."""
    import train_base
    save_root = str(tmp_path_factory.mktemp('base'))
    # lr 0.02: at 0.1 one epoch leaves eval-mode outputs far off (test loss ~50),
    # and a teacher that wild makes the feature methods' first steps diverge
    train_base.main(['--data_name', 'cifar10', '--net_name', 'resnet20', '--img_root', cifar10_root,
                     '--save_root', save_root, '--note', 'r20', '--epochs', '1', '--lr', '0.02',
                     '--batch_size', '32', '--device', 'cpu', '--no_download'])
    run_dir = os.path.join(save_root, 'r20')
    return {'dir': run_dir, 'img_root': cifar10_root,
            'initial': os.path.join(run_dir, 'initial_r20.pth.tar'),
            'best': os.path.join(run_dir, 'model_best.pth.tar')}


SHAPES = {'stem': (16, 32, 32), 'rb1': (16, 32, 32), 'rb2': (32, 16, 16), 'rb3': (64, 8, 8),
          'feat': (64,)}


def make_features(batch=8, num_class=10, seed=0, requires_grad=False, scale=1.0):
    """Random network.Features with the resnet20/110 shapes: pre-activations
    from a normal distribution, post = relu(pre). With requires_grad, every
    pre-activation, `feat` and `out` is a leaf that collects gradients (the
    post-activations are computed from the pre leaves)."""
    from network import Features
    g = torch.Generator().manual_seed(seed)
    leaves = {}

    def leaf(name, shape):
        t = (torch.randn((batch, *shape), generator=g) * scale).requires_grad_(requires_grad)
        leaves[name] = t
        return t

    pairs = {}
    for key in ('stem', 'rb1', 'rb2', 'rb3'):
        pre = leaf(key, SHAPES[key])
        pairs[key] = (pre, torch.relu(pre))
    feat = leaf('feat', SHAPES['feat'])
    out = leaf('out', (num_class,))
    return Features(pairs['stem'], pairs['rb1'], pairs['rb2'], pairs['rb3'], feat, out), leaves


def make_context(mode, overrides=None, n_data=100, num_class=10, student=None, teacher=None,
                 data_name='cifar10'):
    """A registry Context for `mode` with the seed defaults (plus `overrides`)."""
    import argparse
    from kd_losses import METHODS, Context
    method = METHODS[mode]
    args = argparse.Namespace(kd_mode=mode, data_name=data_name, lr=0.1, momentum=0.9,
                              weight_decay=1e-4, epochs=200, num_class=num_class,
                              **method.defaults_for(data_name))
    for k, v in (overrides or {}).items():
        setattr(args, k, v)
    shapes = {**SHAPES, 'out': (num_class,)}
    labels = torch.arange(n_data) % num_class
    return Context(args=args, student_shapes=shapes, teacher_shapes=shapes, num_class=num_class,
                   n_data=n_data, train_labels=labels, device=torch.device('cpu'),
                   student=student, teacher=teacher)


# ----------------------------------------------------------------------------- a run stopped and resumed

class StopRun(BaseException):
    """Raised to stop a run in-process right after a checkpoint, as a kill would."""


def shaped_features(shapes, batch, seed, requires_grad=False):
    """Random Features / Features4 with a network's per-sample `shapes` (no
    network run): pre-activations normal, post = relu(pre). Returns them and
    the leaves (every pre-activation, `feat` and `out`), which collect
    gradients with requires_grad."""
    from network import Features, Features4
    g = torch.Generator().manual_seed(seed)
    stages = [k for k in shapes if k.startswith('rb')]
    leaves = {k: torch.randn((batch, *shapes[k]), generator=g).requires_grad_(requires_grad)
              for k in ['stem', *stages, 'feat', 'out']}
    pairs = [(leaves[k], torch.relu(leaves[k])) for k in ['stem', *stages]]
    cls = Features if len(stages) == 3 else Features4
    return cls(*pairs, leaves['feat'], leaves['out']), leaves


def distill_argv(base_run, save_root, note, mode, epochs=1, batch_size=50, extra=()):
    """train_kd.py's arguments for `mode`, resnet20 -> resnet20 on the tiny
    CIFAR-10 of `base_run` (its best checkpoint teaches, its initial weights
    start the student), on CPU; `extra` flags last."""
    return ['--data_name', 'cifar10', '--img_root', base_run['img_root'], '--save_root', str(save_root),
            '--note', note, '--s_name', 'resnet20', '--t_name', 'resnet20', '--s_init', base_run['initial'],
            '--t_model', base_run['best'], '--kd_mode', mode, '--epochs', str(epochs), '--batch_size',
            str(batch_size), '--device', 'cpu', '--no_download', *extra]


def stop_after_first_epoch_then_resume(monkeypatch, argv):
    """train_kd.main(argv) stopped right after its first epoch's checkpoint,
    then the same command with --resume, to the end."""
    import records
    import train_kd
    save = records.Checkpointer.__call__

    def save_then_stop(self, *a, **k):
        save(self, *a, **k)
        raise StopRun
    monkeypatch.setattr(records.Checkpointer, '__call__', save_then_stop)
    with pytest.raises(StopRun):
        train_kd.main(argv)
    monkeypatch.setattr(records.Checkpointer, '__call__', save)
    train_kd.main(argv + ['--resume'])


def run_capturing_distiller(monkeypatch, mode, argv):
    """train_kd.main(argv); returns the distiller's state right after it was built."""
    import dataclasses
    import train_kd
    from kd_losses import METHODS
    built, method = {}, METHODS[mode]

    def build(ctx):
        distiller = method.build(ctx)
        built.update({k: v.detach().clone() for k, v in distiller.state_dict().items()})
        return distiller
    monkeypatch.setitem(METHODS, mode, dataclasses.replace(method, build=build))
    train_kd.main(argv)
    monkeypatch.setitem(METHODS, mode, method)
    return built


def metrics_rows(run_dir):
    """metrics.csv's rows without the timing columns (which differ between equal runs)."""
    import csv
    with open(os.path.join(run_dir, 'metrics.csv')) as f:
        return [{k: v for k, v in r.items() if k not in ('seconds', 'img_per_s')}
                for r in csv.DictReader(f)]


def assert_same_run(a_dir, b_dir, net_keys=('net',)):
    """Two runs of one command (say, one uninterrupted and one stopped and
    resumed) ended with bitwise-equal networks and distiller state and wrote
    the same metrics, wall-clock columns aside."""
    a, b = (torch.load(os.path.join(d, 'checkpoint.pth.tar'), weights_only=True) for d in (a_dir, b_dir))
    for key in (*net_keys, 'distiller'):
        assert set(a.get(key, {})) == set(b.get(key, {})), f'{key}: different entries'
        for name, value in a.get(key, {}).items():
            assert torch.equal(value, b[key][name]), f'{key}.{name} differs after resume'
    assert metrics_rows(a_dir) == metrics_rows(b_dir)


# ----------------------------------------------------------------------------- head maps

# The module whose forward hook sees the map the classifier averages (before
# its ReLU where the ReLU is not part of it).
HEAD_MAP_MODULE = {'MobileNetV2': ('conv2', False), 'ShuffleV2': ('bn2', True)}


def hook_head_maps(net):
    """The list that collects, at each call, the map the classifier averages."""
    module, then_relu = HEAD_MAP_MODULE[net.name]
    maps = []
    getattr(net, module).register_forward_hook(
        lambda m, inputs, out: maps.append(torch.relu(out) if then_relu else out.clone()))
    return maps


def head_bn(net):
    """The BatchNorm of the extra conv."""
    return net.conv2[1] if net.name == 'MobileNetV2' else net.bn2


def bn_state(net):
    bn = head_bn(net)
    return [b.clone() for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
