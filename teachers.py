"""Released teacher checkpoints: find them in a folder, identify what they
hold, hash them and verify their test accuracy against the published value.

The CIFAR-100 benchmark of Tian et al., "Contrastive Representation
Distillation" (ICLR 2020) releases its teachers as `{'epoch', 'model',
'accuracy', 'optimizer'}` files, one per network: the state dict under
'model', where mdistiller reads it too ('net' is accepted as well). A folder
of them has one of two layouts:

- RepDistiller (https://github.com/HobbitLong/RepDistiller):
  `<DIR>/<net>_vanilla/ckpt_epoch_240.pth`
- mdistiller (https://github.com/megvii-research/mdistiller):
  `<DIR>/cifar_teachers/<net>_vanilla/ckpt_epoch_240.pth`

`<net>` is the benchmark's network name, which is ours (network.NETWORKS):
resnet56, resnet110, resnet32x4, wrn_40_2, vgg13, ResNet50.

A file is identified by its parameter names and shapes (which network of
the zoo, how many classes: the classifier's rows), named by the sha256 of
its bytes, and its test top-1 is measured once and cached in a JSON file
keyed by that sha256. `verify` refuses (exit code 1, one line) a teacher
more than `TOLERANCE` points below its published top-1.

    python teachers.py find ./teachers resnet32x4
    python teachers.py verify ./teachers resnet32x4 --img_root ./datasets
"""
import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from checkpoints import file_digest, load_checkpoint, load_network_weights, network_state
from errors import ArgumentParser, UserError, cli
from network import NETWORKS, build_network
from networks.checkpoint_layouts import identify_network

RELEASED_FILE = 'ckpt_epoch_240.pth'
# Layout name -> the folder under DIR that holds the `<net>_vanilla/` folders.
LAYOUTS = {'RepDistiller': '', 'mdistiller': 'cifar_teachers'}
CACHE_NAME = 'released_teachers.json'
TOLERANCE = 1.0  # points of top-1 a teacher may lie below its published value
DATA_OF_CLASSES = {10: 'cifar10', 100: 'cifar100'}


def released_path(folder, layout, net_name):
    return os.path.join(folder, LAYOUTS[layout], f'{net_name}_vanilla', RELEASED_FILE)


def find_teacher(folder, net_name):
    """find_teacher(folder: str, net_name: str) -> str

    The released checkpoint of `net_name` under `folder`, in RepDistiller's
    layout or mdistiller's. A UserError (one line) when the folder or the
    file is missing, or when both layouts hold different files for it."""
    if not os.path.isdir(folder):
        raise UserError(f'teachers folder {folder} does not exist (or is not a folder)')
    found = [p for p in (released_path(folder, layout, net_name) for layout in LAYOUTS)
             if os.path.isfile(p)]
    if not found:
        present = sorted(n for n in NETWORKS for layout in LAYOUTS
                         if os.path.isfile(released_path(folder, layout, n)))
        raise UserError(f'no released teacher for {net_name} in {folder}: looked for '
                        f'{" and ".join(released_path(folder, layout, net_name) for layout in LAYOUTS)}'
                        f' (the folder holds {", ".join(present) if present else "none"})')
    if len(found) > 1 and file_digest(found[0]) != file_digest(found[1]):
        raise UserError(f'{folder} holds two different teachers for {net_name}, {found[0]} and '
                        f'{found[1]}: keep one')
    return found[0]


def layout_of(path):
    """'RepDistiller' or 'mdistiller' when `path` lies where that layout puts
    a released teacher, else None (a checkpoint of this zoo, for instance)."""
    parts = os.path.normpath(os.path.abspath(path)).split(os.sep)
    if parts[-1] != RELEASED_FILE or len(parts) < 3 or not parts[-2].endswith('_vanilla'):
        return None
    return 'mdistiller' if parts[-3] == LAYOUTS['mdistiller'] else 'RepDistiller'


@dataclass(frozen=True)
class TeacherFile:
    """What a checkpoint file holds: the network (its name in NETWORKS), the
    number of classes, the sha256 of the file's bytes, the layout it was
    found in (None outside the released layouts)."""
    path: str
    network: str
    num_class: int
    sha256: str
    layout: str = None

    def describe(self):
        return f'{self.network} with {self.num_class} classes, sha256 {self.sha256[:12]}'


def identify(path, what='teacher'):
    """identify(path: str, what: str = 'teacher') -> TeacherFile

    Load `path` safely (weights only) and name the network and class count
    its state dict holds (under 'model', 'net', ... or the dict itself), by
    parameter names and shapes. A file that holds no network of the zoo is a
    UserError."""
    state = network_state(load_checkpoint(path, what), path)
    found = identify_network(state)
    if found is None:
        raise UserError(f'{what} {path} holds no network of this zoo (its {len(state)} parameters '
                        f'match none of {", ".join(NETWORKS)})')
    return TeacherFile(path, found[0], found[1], file_digest(path), layout_of(path))


def require(teacher, net_name, num_class=None):
    """Refuse (UserError, one line) a file that holds another network, or
    another number of classes, than the one asked for."""
    if teacher.network != net_name or (num_class is not None and teacher.num_class != num_class):
        wanted = net_name if num_class is None else f'{net_name} with {num_class} classes'
        raise UserError(f'{teacher.path} holds {teacher.network} with {teacher.num_class} classes, '
                        f'not {wanted}')
    return teacher


def published_teacher_top1(net_name):
    """The published CIFAR-100 test top-1 (%) of the benchmark's teacher
    `net_name` (published.py's first record of it: RepDistiller's README), or
    None for a network the benchmark releases no teacher of. The one place
    the published numbers are looked up from."""
    import published
    for record in published.RECORDS:
        if (record.method, record.teacher, record.dataset, record.benchmark, record.net) == (
                'teacher', net_name, 'cifar100', 'crd', 'net'):
            return record.top1
    return None


def default_cache(folder):
    """Where `verify` caches accuracies by default: beside the teachers folder."""
    return os.path.join(os.path.dirname(os.path.abspath(folder)), CACHE_NAME)


def read_cache(path):
    """The cache's entries by sha256 ({} when there is none; a file that is
    not such a JSON object is a UserError naming it)."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            cache = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'accuracy cache {path} cannot be read ({e}); remove it to measure again') from None
    if not isinstance(cache, dict):
        raise UserError(f'accuracy cache {path} is not a JSON object; remove it to measure again')
    return cache


def measure_top1(teacher, img_root, device='cpu', no_download=False):
    """Test top-1 and top-5 (%) of `teacher` (a TeacherFile) on the test split
    of CIFAR-10 or CIFAR-100 (by its class count) under `img_root`."""
    from dataset import make_loaders  # data and evaluation: only when something is measured
    from utils import evaluate
    data_name = DATA_OF_CLASSES.get(teacher.num_class)
    if data_name is None:
        raise UserError(f'{teacher.path} holds {teacher.num_class} classes: no CIFAR test split to '
                        f'measure it on (10 or 100 classes)')
    net = build_network(teacher.network, teacher.num_class)
    net = load_network_weights(net, teacher.path, 'teacher').to(device).eval()
    loader_args = SimpleNamespace(data_name=data_name, img_root=img_root, no_download=no_download,
                                  eval_batch_size=1000, channels_last=False)
    _, test = make_loaders(loader_args, torch.device(device), log=lambda *a: None, training=False)
    result = evaluate(net, test)
    return {'top1': result['top1'], 'top5': result['top5'], 'data_name': data_name,
            'test_images': len(test.labels)}


def teacher_accuracy(teacher, img_root, cache_path, device='cpu'):
    """(entry, cached): the teacher's test accuracy from the cache at
    `cache_path` (keyed by the file's sha256), or measured once and added
    there."""
    cache = read_cache(cache_path)
    if teacher.sha256 in cache:
        return cache[teacher.sha256], True
    entry = {'network': teacher.network, 'num_class': teacher.num_class,
             'file': os.path.abspath(teacher.path),
             **measure_top1(teacher, img_root, device),
             'measured': time.strftime('%Y-%m-%d %H:%M:%S')}
    from records import write_text_atomically
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    cache = read_cache(cache_path)  # another process may have added a teacher meanwhile
    cache[teacher.sha256] = entry
    write_text_atomically(cache_path, json.dumps(cache, indent=2, sort_keys=True))
    return entry, False


class BelowPublished(UserError):
    """A teacher more than TOLERANCE points below its published top-1."""


def verify(folder, net_name, img_root, cache_path=None, device='cpu'):
    """Find, identify and hash the released teacher of `net_name` in
    `folder`, and measure (or read from the cache) its test top-1; returns
    (TeacherFile, cache entry, cached). A file for another network is a
    UserError; a teacher more than TOLERANCE points below its published
    top-1 is a BelowPublished error."""
    teacher = require(identify(find_teacher(folder, net_name)), net_name)
    entry, cached = teacher_accuracy(teacher, img_root, cache_path or default_cache(folder), device)
    published = published_teacher_top1(net_name)
    if published is not None and entry['top1'] < published - TOLERANCE:
        raise BelowPublished(f'teacher {teacher.path} ({teacher.describe()}) has test top-1 '
                             f'{entry["top1"]:.2f}, more than {TOLERANCE:g} point below its '
                             f'published {published:.2f}: not used')
    return teacher, entry, cached


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('command', choices=('find', 'verify'),
                        help='find: print the path of NET\'s released checkpoint in DIR; verify: '
                             'also identify and hash it and check its test top-1')
    parser.add_argument('folder', metavar='DIR', help='folder of released teachers (either layout)')
    parser.add_argument('net_name', metavar='NET', choices=sorted(NETWORKS),
                        help='the network, as --t_name names it')
    parser.add_argument('--img_root', default='./datasets',
                        help='verify: folder holding cifar-100-python/ [./datasets]')
    parser.add_argument('--cache', metavar='FILE', default=None,
                        help=f'verify: JSON file of measured accuracies, by sha256 [DIR/../{CACHE_NAME}]')
    parser.add_argument('--device', default=None, help='verify: cpu or cuda [cuda when available]')
    return parser


@cli
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == 'find':
        print(find_teacher(args.folder, args.net_name))
        return
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        teacher, entry, cached = verify(args.folder, args.net_name, args.img_root, args.cache, device)
    except BelowPublished as e:  # a verdict on the file, not a usage error: exit code 1
        print(f'error: {e}', file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    published = published_teacher_top1(args.net_name)
    against = f'published {published:.2f}' if published is not None else 'no published value'
    print(f'{teacher.path}: {teacher.describe()}, test top-1 {entry["top1"]:.2f} '
          f'({"cached" if cached else "measured"}; {against}): ok')


if __name__ == '__main__':
    main()
