"""The command-line flags every training script shares, and their checks.

Flag names are the original zoo's, so its scripts run unchanged. A bad value
is refused by argparse in one line (errors.ArgumentParser) before anything
is written: numbers must be finite and in range, --note a folder name,
--save_root writable. `--protocol` picks a training protocol for the flags
left out: the seed zoo's (the default) or the CIFAR-100 benchmark's of Tian
et al. ("Contrastive Representation Distillation", ICLR 2020).
"""
import argparse
import math
import os

import torch

from dataset import DATASETS


def _number(kind, text):
    """`text` as int or float; a float must be finite (nan and inf are refused)."""
    value = kind(text)
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f'must be a finite number, got {text}')
    return value


def finite(kind):
    """argparse type: a finite number."""
    def parse(text):
        return _number(kind, text)
    parse.__name__ = kind.__name__
    return parse


def positive(kind):
    """argparse type: a finite number > 0."""
    def parse(text):
        value = _number(kind, text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f'must be > 0, got {text}')
        return value
    parse.__name__ = f'positive {kind.__name__}'
    return parse


def non_negative(kind):
    """argparse type: a finite number >= 0."""
    def parse(text):
        value = _number(kind, text)
        if value < 0:
            raise argparse.ArgumentTypeError(f'must be >= 0, got {text}')
        return value
    parse.__name__ = f'non-negative {kind.__name__}'
    return parse


def in_range(kind, low, high, high_open=False):
    """argparse type: a finite number in [low, high] (or [low, high))."""
    def parse(text):
        value = _number(kind, text)
        if not (low <= value < high if high_open else low <= value <= high):
            raise argparse.ArgumentTypeError(f'must lie in [{low}, {high}{")" if high_open else "]"}, '
                                             f'got {text}')
        return value
    parse.__name__ = kind.__name__
    return parse


def run_name(text):
    """argparse type for --note: one folder name under --save_root."""
    if text in ('', '.', '..') or '/' in text or '\\' in text or '\0' in text:
        raise argparse.ArgumentTypeError(f'must be a folder name (no "/", not empty, "." or ".."), '
                                         f'got {text!r}')
    return text


def int_list(text):
    """argparse type: epochs such as '150,180,210' (or given as separate words)."""
    try:
        values = [int(v) for v in text.replace(',', ' ').split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f'must be whole numbers, got {text!r}') from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f'must be positive epochs, got {text!r}')
    return values


# The CIFAR-100 benchmark's training protocol (Tian et al., "Contrastive
# Representation Distillation", ICLR 2020; RepDistiller and mdistiller): flags
# left out take these values under --protocol crd.
PROTOCOLS = {
    'seed': {},
    'crd': {'epochs': 240, 'batch_size': 64, 'lr': 0.05, 'weight_decay': 5e-4, 'momentum': 0.9,
            'nesterov': False, 'lr_decay_epochs': [150, 180, 210], 'lr_decay_rate': 0.1},
}
# ...and the smaller learning rate it gives these students.
CRD_SMALL_LR_NETS = {'MobileNetV2': 0.01, 'ShuffleV1': 0.01, 'ShuffleV2': 0.01}
SEED_SCHEDULE = {'epochs': 200, 'batch_size': 128, 'lr': 0.1, 'weight_decay': 1e-4,
                 'momentum': 0.9, 'nesterov': True, 'lr_decay_epochs': None, 'lr_decay_rate': 0.1}


def protocol_epochs(protocol):
    """The length of `protocol`'s schedule, in epochs."""
    return {**SEED_SCHEDULE, **PROTOCOLS[protocol]}['epochs']


def add_common_args(parser):
    """Flags every training script shares (names as in the original zoo)."""
    g = parser.add_argument_group('paths and run')
    g.add_argument('--save_root', default='./results', help='runs are written to SAVE_ROOT/NOTE/')
    g.add_argument('--img_root', default='./datasets',
                   help='folder holding cifar-10-batches-py/ or cifar-100-python/')
    g.add_argument('--note', type=run_name, default='try',
                   help='name of this run (its folder under --save_root)')
    g.add_argument('--data_name', required=True, choices=sorted(DATASETS))
    g.add_argument('--num_class', type=positive(int), default=None,
                   help='number of classes (follows from --data_name when omitted)')
    g.add_argument('--no_download', action='store_true',
                   help='never download a missing dataset; stop with a message instead')
    g.add_argument('--resume', action='store_true',
                   help="continue the run in SAVE_ROOT/NOTE/ from its last checkpoint")
    g.add_argument('--overwrite', action='store_true',
                   help='start afresh over an existing run directory, deleting its files')
    g = parser.add_argument_group(
        'schedule (defaults: the seed zoo\'s; --protocol crd gives the CIFAR-100 benchmark\'s)')
    g.add_argument('--protocol', choices=sorted(PROTOCOLS), default='seed',
                   help="seed: 200 epochs, batch 128, lr 0.1 (x0.1 at 50%% and 75%%), wd 1e-4, "
                        "Nesterov; crd: the CIFAR-100 benchmark's 240 epochs, batch 64, lr 0.05 "
                        "(0.01 for MobileNetV2/ShuffleV1/ShuffleV2 students), x0.1 at 150, 180, "
                        "210, wd 5e-4, no Nesterov. A flag given explicitly wins")
    g.add_argument('--epochs', type=positive(int), default=None, help='[seed 200, crd 240]')
    g.add_argument('--batch_size', type=positive(int), default=None, help='[seed 128, crd 64]')
    g.add_argument('--lr', type=positive(float), default=None,
                   help='initial learning rate [seed 0.1, crd 0.05 or 0.01]')
    g.add_argument('--lr_decay_epochs', type=int_list, default=None, metavar='E1,E2,...',
                   help='epochs after which lr is multiplied by --lr_decay_rate '
                        '[seed: 50%% and 75%% of --epochs; crd 150,180,210]')
    g.add_argument('--lr_decay_rate', type=positive(float), default=None, help='[0.1]')
    g.add_argument('--momentum', type=in_range(float, 0.0, 1.0, high_open=True), default=None,
                   help='[0.9]')
    g.add_argument('--nesterov', action=argparse.BooleanOptionalAction, default=None,
                   help='Nesterov momentum [seed on, crd off]')
    g.add_argument('--weight_decay', type=non_negative(float), default=None,
                   help='[seed 1e-4, crd 5e-4]')
    g = parser.add_argument_group('speed (the fast path is on by default with CUDA)')
    g.add_argument('--compile', choices=('off', 'graphs', 'inductor'), default='off',
                   help='how the training and test steps run on CUDA: off (eager), graphs (each '
                        'step captured once as a CUDA graph and replayed), inductor '
                        '(torch.compile, then captured); on the CPU graphs runs eager')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='bf16 autocast for forward passes; losses stay float32 (default: on with CUDA)')
    g.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=None,
                   help='channels-last memory layout for images and networks (default: on with CUDA)')
    g = parser.add_argument_group('device and logging')
    g.add_argument('--device', default=None, help='cuda, cuda:N or cpu (default: cuda when available)')
    g.add_argument('--cuda', type=int, choices=(0, 1), default=None,
                   help="the original zoo's switch, kept for its scripts: 1 = --device cuda, 0 = cpu")
    g.add_argument('--seed', type=in_range(int, 0, 2 ** 32 - 1), default=2)
    g.add_argument('--deterministic', action='store_true',
                   help='deterministic algorithms where torch has them (slower; identical reruns)')
    g.add_argument('--print_freq', type=positive(int), default=50,
                   help='log running training averages every N steps')
    g.add_argument('--eval_batch_size', type=positive(int), default=1000)
    g.add_argument('--no_progress', action='store_true',
                   help='no progress bars, even on a terminal')
    g.add_argument('--sync_bn', action=argparse.BooleanOptionalAction, default=True,
                   help='under torchrun, BatchNorm statistics over the global batch (as one '
                        'process would train); --no-sync_bn keeps them per process (faster)')
    g.add_argument('--tensorboard', action='store_true',
                   help='also write TensorBoard scalars to SAVE_ROOT/NOTE/tensorboard/ '
                        '(needs the tensorboard package)')
    return parser


def finalize_common_args(parser, args, student=None):
    """Derive and check what argparse cannot: the schedule of --protocol for
    flags left out (`student`: the network whose lr the protocol may lower),
    class count, device, paths."""
    protocol = {**SEED_SCHEDULE, **PROTOCOLS[args.protocol]}
    if args.protocol == 'crd' and student in CRD_SMALL_LR_NETS:
        protocol['lr'] = CRD_SMALL_LR_NETS[student]
    if args.epochs is not None and protocol['lr_decay_epochs'] is not None:
        # a shorter (or longer) run keeps the protocol's decays at the same fractions
        full = protocol['epochs']
        protocol['lr_decay_epochs'] = [max(1, math.floor(e * args.epochs / full + 0.5))
                                       for e in protocol['lr_decay_epochs']]
    for name, value in protocol.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.lr_decay_epochs is not None and any(e > args.epochs for e in args.lr_decay_epochs):
        parser.error(f'--lr_decay_epochs {args.lr_decay_epochs}: every decay must lie within the '
                     f'run ({args.epochs} epochs)')
    if args.lr > torch.finfo(torch.float32).max:  # the step keeps lr in a float32 tensor
        parser.error(f'--lr {args.lr} does not fit a float32 (at most '
                     f'{torch.finfo(torch.float32).max:.3g})')
    if args.nesterov and args.momentum == 0:
        parser.error('--nesterov needs --momentum > 0')
    expected = DATASETS[args.data_name].num_class
    if args.num_class is None:
        args.num_class = expected
    elif args.num_class != expected:
        parser.error(f'--num_class {args.num_class} contradicts --data_name {args.data_name} '
                     f'({expected} classes)')
    if args.device is None and args.cuda is not None:
        args.device = 'cuda' if args.cuda else 'cpu'
    if args.device is None:
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f'--device {args.device!r} is not a device name (cpu, cuda, cuda:N)')
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            parser.error(f'--device {args.device}: CUDA is not available on this machine')
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f'--device {args.device}: only {torch.cuda.device_count()} GPU(s) visible')
    elif device.type != 'cpu':
        parser.error(f'--device {args.device}: only cpu and cuda are supported')
    if args.resume and args.overwrite:
        parser.error('--resume and --overwrite exclude each other')
    problem = writable_folder_problem(args.save_root)
    if problem:
        parser.error(f'--save_root {args.save_root}: {problem}')
    on_cuda = device.type == 'cuda'
    args.amp = on_cuda if args.amp is None else args.amp
    args.channels_last = on_cuda if args.channels_last is None else args.channels_last
    return args


def writable_folder_problem(path):
    """Why runs cannot be written under `path` (a file, or a folder we may not
    write to), or None: the folder or its nearest existing parent is checked."""
    if os.path.exists(path) and not os.path.isdir(path):
        return 'is a file, not a folder'
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f'{existing} is a file, not a folder'
    if not os.access(existing, os.W_OK | os.X_OK):
        return f'{existing} is not writable'
    return None
