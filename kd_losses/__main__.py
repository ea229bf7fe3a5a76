"""The registry from the command line: what the README and the sweep script read.

    python -m kd_losses                        # the method table (wrapped to a terminal's width)
    python -m kd_losses --markdown             # the README's method table (also when piped)
    python -m kd_losses --names                # the --kd_mode names, one line
    python -m kd_losses --applies resnet32x4 ShuffleV1 [TEACHER STUDENT ...] [--why]
    python -m kd_losses --shareable            # the modes that can share one teacher pass
    python -m kd_losses --defaults dkd --pair resnet56:resnet20
    python -m kd_losses --own_epochs vgg13 MobileNetV2 [TEACHER STUDENT ...]

`--defaults MODE` prints each setting a run of MODE takes when its flag is
left out, its value and where it comes from, as the run's log names it:
under `--protocol` (crd unless given) on `--data_name` (cifar100 unless
given), for the teacher:student `--pair` if given (under --protocol crd a
pair may have the official per-pair setting), then the schedule flags the
mode sets over the protocol's (MLKD's lr, and a pair's longer official
schedule), then what the mode's on/off switches change when on.
Precedence (kd_losses/registry.py): the command line, a switch's defaults,
the pair's, the protocol's, the dataset's, the mode's own. Numbers of epochs are the protocol's own; train_kd.py scales
them to --epochs.

`--applies` says, without training, which methods can distil TEACHER into
STUDENT: it builds each method as train_kd.py does (the flags train_kd.py
resolves, a `Context` with the two networks and their feature shapes) and
prints, one line per pair, the modes that build without a ConfigError.
`--why` adds a `# skipped: MODE does not apply to T->S: REASON` line for each
of the others (the sweep script prints these). The networks are built on the
meta device, so no weights are allocated; the data is the full CIFAR train
split (50000 images, equal classes), as a real run sees it.

`--shareable` prints on one line the modes that can train beside others on
one teacher pass (train_kd.py --kd_mode a,b,...), then a `# not shareable:
MODE: REASON` line for each of the others (each method built as
`--applies` builds it, for the seed's resnet110 -> resnet20 pair).

`--own_epochs` prints, one line per TEACHER STUDENT pair, `MODE:EPOCHS` for
each mode whose authors train that pair for a length of its own under
`--protocol` (crd unless given; MLKD's longer schedules), an empty line where
none does: the sweep's SCHEDULES=authors runs those as their authors do.
"""
import functools
import shutil
import sys
import tempfile
import textwrap

from . import METHODS, ConfigError, Context
from .registry import PAIR_PROTOCOL

# Both CIFAR train splits: 50000 images, the same number per class. Methods
# that sample negatives (CRD) check their counts against this.
CIFAR_TRAIN_SIZE = 50000


def cell(text):
    return str(text).replace('|', '\\|')


def defaults_text(m, code=lambda text: f'`{text}`'):
    """A method's defaults as flags, with its per-dataset ones in parentheses."""
    defaults = ' '.join(code(f'--{k} {v}') for k, v in m.defaults.items())
    per_data = '; '.join(f'{d}: ' + ' '.join(code(f'--{k} {v}') for k, v in o.items())
                         for d, o in m.dataset_defaults.items())
    return defaults + (f' ({per_data})' if per_data else '')


def method_table():
    """The method table in Markdown (the README's)."""
    rows = ['| `--kd_mode` | method | transfers | variant | defaults |',
            '|---|---|---|---|---|']
    for name in sorted(METHODS):
        m = METHODS[name]
        rows.append(f'| `{name}` | [{cell(m.title)}]({m.paper}) | {cell(m.transfers)} | '
                    f'{cell(m.variant or "as the paper")} | {defaults_text(m)} |')
    return '\n'.join(rows)


def plain_method_table(width):
    """The method table as plain text for a terminal `width` characters wide
    (each paper's link on a line of its own under its row)."""
    methods = sorted(METHODS.items())
    rows = [[name, m.title, m.transfers, m.variant or 'as the paper',
             defaults_text(m, code=lambda text: text.replace(' ', NO_BREAK))] for name, m in methods]
    return wrapped_table(['--kd_mode', 'method', 'transfers', 'variant', 'defaults'], rows, width,
                         below=[m.paper for _, m in methods])


NO_BREAK = '\xa0'  # a space that wrapping keeps (e.g. between a flag and its value)


def wrapped_table(header, rows, width, below=None, gap='  ', narrowest=8):
    """Text cells in columns that fit `width` (none narrower than its longest
    word where the table can fit so, nor than `narrowest`): the widest
    column gives way first, each cell is wrapped within its
    column, a blank line separates the rows, and `below[i]` (if given) is a
    line under row i, from the second column where it fits."""
    columns = [[h, *(r[i] for r in rows)] for i, h in enumerate(header)]
    widths = [max(len(cell) for cell in column) for column in columns]
    room = width - len(gap) * (len(header) - 1)
    # a column keeps its longest word whole while the table can fit; where it
    # cannot, the widest columns narrow further (down to `narrowest`)
    floors = [max(len(word) for cell in column for word in cell.split(' ')) for column in columns]
    while sum(floors) > room and max(floors) > narrowest:
        floors[floors.index(max(floors))] -= 1
    while sum(widths) > room:
        shrinkable = [i for i, w in enumerate(widths) if w > floors[i]]
        if not shrinkable:
            break
        widths[max(shrinkable, key=lambda i: widths[i])] -= 1

    def lines_of(cells):
        wrapped = [textwrap.wrap(cell, w, break_on_hyphens=False) or [''] for cell, w in zip(cells, widths)]
        return [gap.join(column[i].ljust(w) if i < len(column) else ' ' * w
                         for column, w in zip(wrapped, widths)).rstrip()
                for i in range(max(len(column) for column in wrapped))]

    out = lines_of(header) + [gap.join('-' * w for w in widths)]
    for i, r in enumerate(rows):
        out += lines_of(r)
        if below:  # not wrapped (a link stays one piece): moved left where it would overflow
            out.append(' ' * max(0, min(widths[0] + len(gap), width - len(below[i]))) + below[i])
        out.append('')
    return '\n'.join(out).rstrip('\n').replace(NO_BREAK, ' ')


def mode_names():
    """The registered --kd_mode names, sorted (the sweep's default MODES)."""
    return sorted(METHODS)


@functools.lru_cache(maxsize=None)
def meta_network(name, num_class):
    """The network on the meta device: its modules and shapes, no weights (built
    once per name: a network's modules take a while to build even there)."""
    import torch
    from network import build_network
    with torch.device('meta'):
        return build_network(name, num_class)


def applicability(teacher_name, student_name, data_name='cifar100', protocol='crd', modes=None,
                  built=None):
    """{mode: None if it builds for teacher -> student, else the reason it does
    not}; each distiller built goes into `built` ({mode: distiller}) if given."""
    import torch
    import train_kd  # the flags as a run resolves them (protocol and dataset defaults, scaling)
    from network import build_network
    from dataset import DATASETS

    num_class = DATASETS[data_name].num_class
    labels = torch.arange(CIFAR_TRAIN_SIZE) % num_class
    meta_nets = meta_network(student_name, num_class), meta_network(teacher_name, num_class)
    result = {}
    for mode in modes or mode_names():
        args, _, _ = train_kd.parse_args([
            '--data_name', data_name, '--protocol', protocol, '--t_name', teacher_name,
            '--s_name', student_name, '--kd_mode', mode, '--s_init', '-', '--t_model', '-',
            '--device', 'cpu', '--save_root', tempfile.gettempdir()])
        result[mode] = None
        # The method's own modules on the meta device too (CRD's memory banks are
        # large); a method that reads tensor values while building fails there
        # with an error other than ConfigError, so it is built again on the CPU.
        for device in ('meta', 'cpu'):
            try:
                with torch.device(device):
                    nets = meta_nets if device == 'meta' else (
                        build_network(student_name, num_class), build_network(teacher_name, num_class))
                    ctx = Context(args=args, student_shapes=nets[0].feature_shapes,
                                  teacher_shapes=nets[1].feature_shapes, num_class=num_class,
                                  n_data=CIFAR_TRAIN_SIZE, train_labels=labels,
                                  device=torch.device('cpu'), student=nets[0], teacher=nets[1])
                    distiller = METHODS[mode].build(ctx)  # the calls of train_kd.build_distillation
                    distiller.pretrain_phases(ctx)
                    distiller.wrap_student(nets[0])
                if built is not None:
                    built[mode] = distiller
                break
            except ConfigError as e:
                reason = str(e)
                result[mode] = reason[len(mode) + 2:] if reason.startswith(f'{mode}: ') else reason
                break
            except Exception as e:  # noqa: BLE001 - not a ConfigError: the meta device, or a bug
                if device == 'cpu':  # on the CPU as well: a bug in the method, given as the reason
                    result[mode] = f'building it failed ({type(e).__name__}: {e})'.splitlines()[0]
    return result


def sharing():
    """{mode: '' if it can share one teacher pass with other students, else why not}."""
    built = {}
    applicability('resnet110', 'resnet20', 'cifar10', 'seed', built=built)
    return {mode: ('it trains on weak and strong views of each image, drawn by a loader of its own'
                   if len(METHODS[mode].views) > 1 else
                   built[mode].teacher_sharing if mode in built else 'it does not build for the seed pair')
            for mode in mode_names()}


def own_epochs(teacher, student, protocol='crd'):
    """[(mode, epochs)] of the modes whose authors train teacher -> student for
    a schedule length of its own under `protocol` (a PairSetting.schedule
    with epochs: train_kd.py takes it when --epochs is left out)."""
    out = []
    for mode in mode_names():
        schedule = METHODS[mode].schedule(protocol, teacher, student)
        if 'epochs' in schedule and schedule['epochs'].level == 'pair':
            out.append((mode, schedule['epochs'].value))
    return out


def defaults_lines(mode, data_name='cifar100', protocol='crd', pair=None):
    """The lines of `--defaults`: each setting of `mode` with its value and
    source, then the settings each on/off switch of the mode changes."""
    method = METHODS[mode]
    teacher, student = pair or (None, None)
    resolved = method.resolve(data_name, protocol, teacher, student)
    where = f' for {teacher}->{student}' if pair else ''
    if pair and protocol != PAIR_PROTOCOL:
        where += f' (a pair\'s official settings apply under --protocol {PAIR_PROTOCOL} only)'
    lines = [f'{mode} on {data_name} under --protocol {protocol}{where}:']
    lines += [f'  {name} = {d.value} ({d.where})' for name, d in resolved.items()]
    from flags import small_lr_nets  # the students that keep the protocol's own lr
    schedule = method.schedule(protocol, teacher, student, small_lr_nets(protocol))
    if schedule:
        lines.append(f'schedule, over --protocol {protocol}\'s when the flag is left out:')
        lines += [f'  {name} = {d.value} ({d.where})' for name, d in schedule.items()]
    for switch in method.switch_defaults:
        switched = method.resolve(data_name, protocol, teacher, student, {switch: True})
        lines.append(f'with --{switch}:')
        lines += [f'  {name} = {d.value} ({d.where})' for name, d in switched.items()
                  if name != switch and d != resolved[name]]
    return lines


def build_parser():
    from errors import ArgumentParser  # a mistake is one line, `error: ...`, exit code 2
    from flags import HelpFormatter
    parser = ArgumentParser(prog='python -m kd_losses', description=__doc__,
                            formatter_class=HelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument('--markdown', action='store_true',
                      help='the method table in Markdown, as in the README [on when the output '
                           'is not a terminal; on a terminal, a plain table fitted to its width]')
    what.add_argument('--names', action='store_true', help='print the --kd_mode names on one line')
    what.add_argument('--shareable', action='store_true',
                      help='print the modes that can train beside others on one teacher pass '
                           '(train_kd.py --kd_mode a,b,...), then why each other cannot')
    what.add_argument('--applies', nargs='+', metavar='NET',
                      help='TEACHER STUDENT [TEACHER STUDENT ...]: print, one line per pair, the '
                           'modes that can distil TEACHER into STUDENT')
    what.add_argument('--own_epochs', nargs='+', metavar='NET',
                      help='TEACHER STUDENT [TEACHER STUDENT ...]: print, one line per pair, '
                           'MODE:EPOCHS for each mode whose authors train the pair for a schedule '
                           'of its own under --protocol (MLKD: 480 or 960 epochs for five pairs; '
                           'the sweep\'s SCHEDULES=authors reads them)')
    what.add_argument('--defaults', metavar='MODE',
                      help="print each setting of MODE left out on the command line: its value "
                           "and where it comes from (the method's, the dataset's, the protocol's, "
                           "the pair's, a switch's)")
    parser.add_argument('--pair', metavar='TEACHER:STUDENT',
                        help=f'with --defaults: the pair, whose official setting applies under '
                             f'--protocol {PAIR_PROTOCOL} [none]')
    parser.add_argument('--why', action='store_true',
                        help='with --applies: a "# skipped: ..." line for each mode that does not apply')
    parser.add_argument('--data_name', default='cifar100', help='with --applies or --defaults [cifar100]')
    parser.add_argument('--protocol', default='crd',
                        help='with --applies or --defaults [crd: the CIFAR-100 benchmark]')
    return parser


def parse_args(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.pair is not None and args.defaults is None:
        parser.error('--pair goes with --defaults')
    if args.applies is None and (args.why or (args.defaults is None and args.own_epochs is None and (
            '--data_name' in argv or '--protocol' in argv))):
        parser.error('--why, --data_name and --protocol go with --applies (the last two '
                     'also with --defaults, --protocol with --own_epochs)')
    pairs = args.applies if args.applies is not None else args.own_epochs
    if pairs is None and args.defaults is None:
        return args
    from network import NETWORKS
    if args.defaults is not None:
        if args.defaults not in METHODS:
            parser.error(f'--defaults: unknown mode {args.defaults!r}; modes: {" ".join(mode_names())}')
        if args.pair is not None:
            nets = args.pair.split(':')
            if len(nets) != 2 or any(n not in NETWORKS for n in nets):
                parser.error(f'--pair {args.pair!r} is not TEACHER:STUDENT of known networks; '
                             f'networks: {" ".join(NETWORKS)}')
            args.pair = tuple(nets)
    else:
        flag = '--applies' if args.applies is not None else '--own_epochs'
        if len(pairs) % 2:
            parser.error(f'{flag} takes TEACHER STUDENT pairs, got {len(pairs)} names')
        unknown = [n for n in pairs if n not in NETWORKS]
        if unknown:
            parser.error(f'{flag}: unknown network {unknown[0]!r}; networks: {" ".join(NETWORKS)}')
    import train_kd  # its own choices, wherever they are defined
    choices = {a.dest: a.choices for a in train_kd.build_parser()._actions}
    for name in ('data_name', 'protocol'):
        if getattr(args, name) not in choices[name]:
            parser.error(f'--{name} {getattr(args, name)!r} is unknown; choose from {" ".join(choices[name])}')
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.names:
        print(' '.join(mode_names()))
    elif args.shareable:
        reasons = sharing()
        print(' '.join(m for m, reason in reasons.items() if not reason))
        for mode, reason in reasons.items():
            if reason:
                print(f'# not shareable: {mode}: {reason}')
    elif args.defaults:
        print('\n'.join(defaults_lines(args.defaults, args.data_name, args.protocol, args.pair)))
    elif args.own_epochs:
        for teacher, student in zip(args.own_epochs[::2], args.own_epochs[1::2]):
            print(' '.join(f'{mode}:{length}' for mode, length in own_epochs(teacher, student, args.protocol)))
    elif args.applies:
        for teacher, student in zip(args.applies[::2], args.applies[1::2]):
            result = applicability(teacher, student, args.data_name, args.protocol)
            print(' '.join(m for m, reason in result.items() if reason is None))
            if args.why:
                for mode, reason in result.items():
                    if reason is not None:
                        print(f'# skipped: {mode} does not apply to {teacher}->{student}: {reason}')
    elif args.markdown or not sys.stdout.isatty():
        print(method_table())
    else:
        print(plain_method_table(shutil.get_terminal_size().columns))


if __name__ == '__main__':
    main()
