"""The command-line flags every training script shares, and their checks.

Flag names are the original zoo's, so its scripts run unchanged. A bad value
is refused by argparse in one line (errors.ArgumentParser) before anything
is written: numbers must be finite and in range (whole numbers fit a 32-bit
int, real ones a float32), --note a folder name, --save_root writable.
`--protocol` picks a training protocol for the flags left out: the seed
zoo's (the default) or the CIFAR-100 benchmark's of Tian et al.
("Contrastive Representation Distillation", ICLR 2020).
"""
import argparse
import math
import os
import re

import torch

import versions
from dataset import DATASETS


# Whole-number flags (epochs, batch sizes, dimensions, counts) stop at what a
# 32-bit int holds: a larger one is a typo, and it reaches float arithmetic,
# torch and numpy, where it overflows (or a run of 10**20 epochs never ends).
MAX_INT = 2 ** 31 - 1
# Real-valued flags end up in the training step's float32 tensors, where a
# larger magnitude is inf.
MAX_FLOAT = float(torch.finfo(torch.float32).max)


def _shown(text, limit=40):
    """A flag's value as an error message quotes it: cut short when long."""
    return text if len(text) <= limit else f'{text[:limit]}... ({len(text)} characters)'


def _number(kind, text, bounded=True):
    """`text` as int or float, finite and (`bounded`) within +-MAX_INT (int)
    or +-MAX_FLOAT (float)."""
    try:
        value = kind(text)
    except ValueError:  # '1e30' or '2.5' for a whole number, 'abc', or too many digits to read
        if kind is int and re.fullmatch(r'\s*[+-]?\d+\s*', text):
            value = (-1 if text.strip().startswith('-') else 1) * 10 ** 4300  # beyond any bound
        else:
            raise argparse.ArgumentTypeError(
                f'must be {"a whole number" if kind is int else "a number"}, '
                f'got {_shown(text)!r}') from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f'must be a finite number, got {_shown(text)}')
    bound = MAX_INT if kind is int else MAX_FLOAT
    if bounded and abs(value) > bound:
        limit = f'{bound} (a 32-bit int)' if kind is int else f'{bound:.3g} (a float32)'
        raise argparse.ArgumentTypeError(f'must be at {"most " if value > 0 else "least -"}{limit}, '
                                         f'got {_shown(text)}')
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
            raise argparse.ArgumentTypeError(f'must be > 0, got {_shown(text)}')
        return value
    parse.__name__ = f'positive {kind.__name__}'
    return parse


def non_negative(kind):
    """argparse type: a finite number >= 0."""
    def parse(text):
        value = _number(kind, text)
        if value < 0:
            raise argparse.ArgumentTypeError(f'must be >= 0, got {_shown(text)}')
        return value
    parse.__name__ = f'non-negative {kind.__name__}'
    return parse


def in_range(kind, low, high, high_open=False):
    """argparse type: a finite number in [low, high] (or [low, high))."""
    def parse(text):
        value = _number(kind, text, bounded=False)  # the range is the bound
        if not (low <= value < high if high_open else low <= value <= high):
            raise argparse.ArgumentTypeError(f'must lie in [{low}, {high}{")" if high_open else "]"}, '
                                             f'got {_shown(text)}')
        return value
    parse.__name__ = kind.__name__
    return parse


# The longest file name most file systems take (NAME_MAX), in bytes.
MAX_NAME_BYTES = 255


def run_name(text):
    """argparse type for --note: one folder name under --save_root."""
    if text in ('', '.', '..') or '/' in text or '\\' in text or '\0' in text:
        raise argparse.ArgumentTypeError(f'must be a folder name (no "/", not empty, "." or ".."), '
                                         f'got {_shown(text)!r}')
    if len(os.fsencode(text)) > MAX_NAME_BYTES:
        raise argparse.ArgumentTypeError(f'must be a folder name of at most {MAX_NAME_BYTES} bytes, '
                                         f'got {len(os.fsencode(text))}: {_shown(text)!r}')
    return text


def int_list(text):
    """argparse type: epochs such as '150,180,210' (or given as separate words)."""
    words = text.replace(',', ' ').split()
    if not words or not all(re.fullmatch(r'[+-]?\d+', w) for w in words):
        raise argparse.ArgumentTypeError(f'must be whole numbers, got {_shown(text)!r}')
    values = [_number(int, w) for w in words]
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f'must be positive epochs, got {_shown(text)!r}')
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


def small_lr_nets(protocol):
    """The students whose lr `protocol` lowers (none outside --protocol crd)."""
    return CRD_SMALL_LR_NETS if protocol == 'crd' else {}
SEED_SCHEDULE = {'epochs': 200, 'batch_size': 128, 'lr': 0.1, 'weight_decay': 1e-4,
                 'momentum': 0.9, 'nesterov': True, 'lr_decay_epochs': None, 'lr_decay_rate': 0.1}


def protocol_epochs(protocol):
    """The length of `protocol`'s schedule, in epochs."""
    return {**SEED_SCHEDULE, **PROTOCOLS[protocol]}['epochs']


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help that keeps the description's layout and shows every flag's
    default: a flag whose help does not end with it in brackets ('[seed 200,
    crd 240]') gets '[its default]' appended ('[off]' for a switch)."""

    def _get_help_string(self, action):
        text = action.help or ''
        if (not action.option_strings or action.required or text.endswith(']')
                or action.default is argparse.SUPPRESS):
            return text
        return f'{text} [{describe_default(action.default)}]'.strip()


def describe_default(value):
    """A default as --help shows it (on/off for switches, words for lists)."""
    if isinstance(value, bool):
        return 'on' if value else 'off'
    if value is None:
        return 'none'
    if isinstance(value, (list, tuple)):
        return ' '.join(str(v) for v in value)
    return str(value).replace('%', '%%')


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
                   help='number of classes [from --data_name: 10 or 100]')
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
                        "210, wd 5e-4, no Nesterov. A flag given explicitly wins [seed]")
    g.add_argument('--epochs', type=positive(int), default=None,
                   help='epochs of the main schedule [seed 200, crd 240]')
    g.add_argument('--batch_size', type=positive(int), default=None, help='[seed 128, crd 64]')
    g.add_argument('--lr', type=positive(float), default=None,
                   help='initial learning rate [seed 0.1, crd 0.05 or 0.01]')
    g.add_argument('--lr_decay_epochs', type=int_list, default=None, metavar='E1,E2,...',
                   help='epochs after which lr is multiplied by --lr_decay_rate '
                        '[seed: 50%% and 75%% of --epochs, rounded up; crd 150,180,210, scaled '
                        'to --epochs]')
    g.add_argument('--lr_decay_rate', type=positive(float), default=None, help='[0.1]')
    g.add_argument('--momentum', type=in_range(float, 0.0, 1.0, high_open=True), default=None,
                   help='[0.9]')
    g.add_argument('--nesterov', action=argparse.BooleanOptionalAction, default=None,
                   help='Nesterov momentum [seed on, crd off]')
    g.add_argument('--weight_decay', type=non_negative(float), default=None,
                   help='[seed 1e-4, crd 5e-4]')
    g = parser.add_argument_group('speed (the fast path is on by default with CUDA)')
    g.add_argument('--compile', choices=('off', 'auto', 'graphs', 'inductor'), default='off',
                   help='how the training and test steps run: off (eager), graphs (CUDA only: each '
                        'step captured once as a CUDA graph and replayed), auto (graphs on CUDA, '
                        'eager elsewhere), inductor (torch.compile, then captured on CUDA; needs '
                        'torch >= 2.11). What ran is recorded per epoch (metrics.csv step_path)')
    g.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                   help='bf16 autocast for forward passes; losses stay float32 '
                        '[on with CUDA, off on the CPU]')
    g.add_argument('--channels_last', action=argparse.BooleanOptionalAction, default=None,
                   help='channels-last memory layout for images and networks '
                        '[on with CUDA, off on the CPU]')
    g = parser.add_argument_group('device and logging')
    g.add_argument('--device', default=None,
                   help='cuda, cuda:N or cpu [cuda when available, else cpu]')
    g.add_argument('--cuda', type=int, choices=(0, 1), default=None,
                   help="the original zoo's switch, kept for its scripts: 1 = --device cuda, 0 = cpu "
                        "[not given: --device decides]")
    g.add_argument('--seed', type=in_range(int, 0, 2 ** 32 - 1), default=2,
                   help='seed of the initial weights, the data order and augmentation')
    g.add_argument('--deterministic', action='store_true',
                   help='deterministic algorithms where torch has them (slower; identical reruns)')
    g.add_argument('--print_freq', type=positive(int), default=50,
                   help='log running training averages every N steps')
    g.add_argument('--eval_batch_size', type=positive(int), default=1000,
                   help='batch size of the test passes')
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
    if args.compile == 'graphs' and device.type != 'cuda':
        parser.error(f'--compile graphs needs CUDA (this run is on {device.type}); use --compile auto '
                     f'(graphs on CUDA, eager elsewhere) or --compile off')
    versions.require()
    if args.compile == 'inductor':
        versions.require('compile', '--compile inductor')
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


# ----------------------------------------------------------------------------- the schedule in the log

SCHEDULE_FLAGS = ('epochs', 'batch_size', 'lr', 'lr_decay_epochs', 'lr_decay_rate', 'momentum',
                  'nesterov', 'weight_decay')


def flags_given(parser, argv=None):
    """The flags (their dests) that `argv` sets explicitly: it is parsed once
    more into a namespace where every entry already exists, which argparse's
    defaults do not overwrite."""
    unset = object()
    probe = argparse.Namespace(**{a.dest: unset for a in parser._actions})
    parser.parse_args(argv, probe)
    return {name for name, value in vars(probe).items() if value is not unset}


def schedule_sources(args, given, student=None):
    """Where each schedule and speed setting of the resolved `args` came from,
    in words for the log (`given`: the flags set on the command line;
    `student`: the network whose lr the protocol may lower)."""
    protocol = PROTOCOLS[args.protocol]
    sources = {'protocol': 'command line' if 'protocol' in given else 'default'}
    for name in SCHEDULE_FLAGS:
        if name in given:
            sources[name] = 'command line'
        elif name not in protocol:
            sources[name] = 'seed default'
            if name == 'lr_decay_epochs':
                sources[name] += ': 50% and 75% of --epochs, rounded up'
        else:
            sources[name] = f'--protocol {args.protocol} default'
            if name == 'lr' and args.protocol == 'crd' and student in CRD_SMALL_LR_NETS:
                sources[name] += f' for a {student} student'
            full = protocol_epochs(args.protocol)
            if name == 'lr_decay_epochs' and args.epochs != full:
                sources[name] += (f', {",".join(map(str, protocol[name]))} of {full} epochs scaled '
                                  f'to {args.epochs}')
    device = 'with CUDA' if torch.device(args.device).type == 'cuda' else 'on the CPU'
    for name in ('amp', 'channels_last'):
        sources[name] = 'command line' if name in given else f'default {device}'
    sources['compile'] = 'command line' if 'compile' in given else 'default'
    return sources


def schedule_lines(args, sources):
    """The log's opening block: the resolved schedule, precision and compile
    mode, each value with where it came from (see schedule_sources), the lr
    decays as the schedule applies them."""
    from utils import decay_milestones  # utils holds the schedule itself

    def line(name, value):
        return f'  {name} = {value} ({sources[name]})'

    lines = [f"schedule: --protocol {args.protocol} ({sources['protocol']})"]
    for name in SCHEDULE_FLAGS:
        value = getattr(args, name)
        if name == 'lr_decay_epochs':
            value = ','.join(str(e) for e in decay_milestones(args.epochs, value))
        lines.append(line(name, value))
    lines.append(line('amp', 'on: bf16 autocast, float32 losses' if args.amp else 'off: float32'))
    lines.append(line('channels_last', 'on' if args.channels_last else 'off'))
    lines.append(line('compile', args.compile))
    return lines
