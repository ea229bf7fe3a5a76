"""Distil a frozen teacher into a student with one method of kd_losses/.

The student starts from --s_init (a baseline's initial weights) or, without
it, from a fresh initialisation drawn from --seed and saved in the run
directory as initial.pth.tar (the same for every run of one seed and
network). The teacher is --t_model: a trained baseline, a released
benchmark teacher, or a folder of released teachers (teachers.py finds
--t_name's there); its identity and sha256 go to args.json. Both accept the
original zoo's checkpoint files. The loss is ce_weight * CE + lambda_kd * KD,
with the mode's defaults where a flag is not given; `--optimizer dot` trains
with DOT's separate momenta for the two terms. Methods with pre-training phases (AB/FSP
initialisation, FT's paraphraser) run them first. Everything a method needs
comes from its registry entry in kd_losses/: this script names no method.

    python train_kd.py --data_name cifar10 --t_name resnet110 --s_name resnet20 \\
        --t_model ./results/base/base-c10-r110/model_best.pth.tar \\
        --s_init ./results/base/base-c10-r20/initial_r20.pth.tar \\
        --kd_mode at --save_root ./results/at --note at-c10-r110-r20

A comma list of modes trains one student per mode on one teacher pass, each
in its own run directory <save_root>/<note>/<mode>/ (see --kd_mode):

    python train_kd.py --data_name cifar10 --t_name resnet110 --s_name resnet20 \\
        --t_model ./results/base/base-c10-r110/model_best.pth.tar \\
        --s_init ./results/base/base-c10-r20/initial_r20.pth.tar \\
        --kd_mode st,at,fitnet,crd,ab,dkd,simkd --save_root ./results/row --note row-c10-r110-r20
"""
import argparse
import os

import torch
import torch.nn.functional as F

from capture import grads_of
from checkpoints import file_digest, load_network_weights, save_checkpoint, zoo_record
from dataset import make_loaders
from distributed import WORLD, sync_batchnorm
from errors import ArgumentParser, cli, UserError
from flags import (SCHEDULE_FLAGS, HelpFormatter, add_common_args,
                   finalize_common_args, finite, flags_given, non_negative, positive,
                   protocol_epochs, schedule_lines, schedule_sources, small_lr_nets)
from kd_losses import METHODS, ConfigError, Context, all_flags
from kd_losses.registry import COMMON_DEFAULTS
from network import NETWORKS, build_network
from teachers import find_teacher, layout_of
import shared_teacher
from utils import (autocast, begin, begin_process, cast_frozen_weights, check_run,
                   configure_backend, cross_entropy_stats, describe_device, EpochStats, evaluate,
                   Evaluator, LOG, main_schedule, make_optimizer, make_sgd, memory_layout, Phase,
                   rng_state, seed_everything, set_rng_state, show_progress, train_phases)

# mdistiller engine/cfg.py SOLVER.DOT.DELTA and configs/cifar100/dot/*.yaml: 0.075
DOT_DELTA = 0.075


def show_value(value):
    """A setting's value as --help shows it: 0.1, 4 (not 4.0), on/off."""
    if isinstance(value, bool):
        return 'on' if value else 'off'
    return f'{value:g}' if isinstance(value, float) else str(value)


def mode_defaults(name):
    """--help's default of a distillation setting: each mode's that reads it
    (a default every mode shares once, then the modes that differ), with the
    values a dataset, a --protocol or a switch of the mode gives instead, and
    whether the official configs set it per teacher:student pair (`python -m
    kd_losses --defaults MODE --pair T:S` shows a pair's)."""
    shared = COMMON_DEFAULTS.get(name)
    parts = []
    for mode in sorted(METHODS):
        m = METHODS[mode]
        if name not in m.defaults and shared is None:
            continue
        value = m.defaults.get(name, shared)
        others = [(f'{d}', o) for d, o in m.dataset_defaults.items()]
        others += [(f'--protocol {p}', o) for p, o in m.protocol_defaults.items()]
        others += [(f'with --{switch}', o) for switch, o in m.switch_defaults.items()]
        differs = [f'{where} {show_value(o[name])}' for where, o in others
                   if name in o and o[name] != value]
        if any(name in p.values for p in m.pair_defaults.values()):
            differs.append('per pair under --protocol crd')
        if value == shared and not differs:
            continue
        parts.append(f'{mode} {show_value(value)}' + (f' ({"; ".join(differs)})' if differs else ''))
    if shared is None:
        return ', '.join(parts)
    return f'{show_value(shared)}' + (f'; {", ".join(parts)}' if parts else '')


def kd_modes(text):
    """--kd_mode's value: one mode, or a comma list of distinct modes (checked here, kept as given)."""
    names = text.split(',')
    for name in names:
        if name not in METHODS:
            raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from "
                                             f"{', '.join(map(repr, sorted(METHODS)))})")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(twice)} listed twice in {text!r}")
    return text


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_args(parser)
    g = parser.add_argument_group('optimiser')
    g.add_argument('--optimizer', choices=('sgd', 'dot'), default='sgd',
                   help='sgd: one momentum for the whole gradient; dot: the distillation-oriented '
                        'trainer (Zhao et al., ICCV 2023): the cross-entropy gradient with momentum '
                        '--momentum minus --dot_delta, the distillation gradient with --momentum plus '
                        '--dot_delta, each in a buffer of its own; no Nesterov')
    g.add_argument('--dot_delta', type=finite(float), default=None,
                   help=f'with --optimizer dot: the momentum difference [{DOT_DELTA}]')
    g = parser.add_argument_group('teacher and student')
    g.add_argument('--s_init', default=None,
                   help="student's initial weights (a baseline's initial_rNN.pth.tar) [none: a fresh "
                        "initialisation drawn from --seed, saved as initial.pth.tar in the run directory]")
    g.add_argument('--t_model', required=True,
                   help="teacher's trained weights: a baseline's model_best.pth.tar, a released "
                        "teacher's ckpt_epoch_240.pth, or a folder of released teachers "
                        "(RepDistiller's or mdistiller's layout), where --t_name's is found")
    g.add_argument('--s_name', required=True, choices=sorted(NETWORKS))
    g.add_argument('--t_name', required=True, choices=sorted(NETWORKS))
    g = parser.add_argument_group('distillation (a flag left out takes the mode\'s default, '
                                  'shown per mode in brackets)')
    g.add_argument('--kd_mode', required=True, type=kd_modes, metavar='MODE[,MODE...]',
                   help=f"the method ({', '.join(sorted(METHODS))}); a comma list (e.g. st,at,crd) "
                        f"trains one student per mode in one process, every other flag shared: each "
                        f"batch is drawn once and the teacher runs once for all of them, each student "
                        f"writes the run directory its own run would, under --note's folder "
                        f"(<save_root>/<note>/<mode>/), with the same results "
                        f"(python -m kd_losses --shareable: the modes that can share)")
    g.add_argument('--lambda_kd', type=non_negative(float), default=None,
                   help=f"weight of the KD loss [{mode_defaults('lambda_kd')}]")
    g.add_argument('--ce_weight', type=non_negative(float), default=None,
                   help=f"weight of the cross-entropy loss [{mode_defaults('ce_weight')}]")
    for name, (flag, _) in sorted(all_flags().items(), key=lambda kv: kv[0].lower()):
        default_text = mode_defaults(name)
        if flag.type is bool:  # an on/off switch
            g.add_argument(f'--{name}', action=argparse.BooleanOptionalAction, default=None,
                           help=f'{flag.help} [{default_text}]')
            continue
        kind = flag.type if flag.type is str else positive(flag.type) if flag.positive else finite(flag.type)
        scaling = f'; scaled to --epochs from a {flag.epochs_of}-epoch schedule' if flag.epochs_of else ''
        g.add_argument(f'--{name}', type=kind, choices=flag.choices, default=None,
                       help=f'{flag.help} [{default_text}{scaling}]')
    return parser


def method_schedule(method, args, given):
    """{schedule flag: Default} that the mode sets under args.protocol for the
    run's pair and the command line leaves out (Method.schedule: its
    `schedule_defaults`, whose lr gives way to the protocol's own lower lr for
    small students, flags.small_lr_nets, and the pair's official schedule)."""
    out = method.schedule(args.protocol, args.t_name, args.s_name, small_lr_nets(args.protocol),
                          {name: getattr(args, name) for name in given if name in SCHEDULE_FLAGS})
    unknown = sorted(set(out) - set(SCHEDULE_FLAGS))
    if unknown:
        raise ValueError(f'{method.name}: schedule defaults for flags that are not schedule flags {unknown}')
    return out


def parse_args(argv=None, mode=None):
    """Parsed flags, the mode's defaults filled in; also returns where each
    schedule and method setting came from, for the log, and the method flags
    given that the mode does not read. `mode`: one mode of a --kd_mode list
    (the flags as that student's separate run resolves them).

    A method setting left out takes, in this order of precedence, the mode's
    default with its on/off switch on (switch_defaults), the teacher:student
    pair's official setting under --protocol crd (pair_defaults), the
    protocol's, the dataset's, the mode's own (kd_losses/registry.py)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if mode is not None:
        args.kd_mode = mode
    method = METHODS[args.kd_mode]
    on_command_line = flags_given(parser, argv)
    from_method = method_schedule(method, args, on_command_line)
    for name, default in from_method.items():
        setattr(args, name, default.value)
    args = finalize_common_args(parser, args, args.s_name)
    if os.path.isdir(args.t_model):  # a folder of released teachers: --t_name's file in it
        try:
            args.t_model = find_teacher(args.t_model, args.t_name)
        except UserError as e:
            raise UserError(f'--t_model: {e}') from None
    sources = schedule_sources(args, on_command_line, args.s_name)
    for name, default in from_method.items():
        sources[name] = default.where
    check_optimizer(parser, args, on_command_line, sources)
    given = {name: getattr(args, name) for name in method.defaults_for(args.data_name, args.protocol)
             if getattr(args, name) is not None}
    resolved = method.resolve(args.data_name, args.protocol, args.t_name, args.s_name, given)
    for name, default in resolved.items():
        if name in given:
            sources[name] = 'command line'
            continue
        value, sources[name] = default.value, default.where
        # the schedule a default number of epochs is meant for: the protocol's
        # for its own and its pairs' values
        reference = protocol_epochs(args.protocol) if default.level in ('protocol', 'pair') else None
        flag = method.flags.get(name)
        scales = flag is not None and default.level != 'switch'  # a switch's values are taken as they are
        if scales and flag.scaled(value, args.epochs, reference) != value:
            sources[name] += (f', {value} of {reference or flag.epochs_of} epochs scaled to '
                              f'{args.epochs}')
            value = flag.scaled(value, args.epochs, reference)
        setattr(args, name, value)
    ignored = [f'--{n}' for n in all_flags() if n not in method.flags and getattr(args, n) is not None]
    return args, sources, ignored


def check_optimizer(parser, args, on_command_line, sources):
    """--optimizer dot's settings: its delta (default DOT_DELTA), both momenta
    within [0, 1), and no Nesterov (DOT has none: off unless asked for, and
    then refused); records where the optimiser settings came from in `sources`."""
    sources['optimizer'] = 'command line' if 'optimizer' in on_command_line else 'default'
    if args.optimizer != 'dot':
        if args.dot_delta is not None:
            parser.error('--dot_delta goes with --optimizer dot')
        return
    sources['dot_delta'] = 'default for --optimizer dot' if args.dot_delta is None else 'command line'
    if args.dot_delta is None:
        args.dot_delta = DOT_DELTA
    if not (0 <= args.momentum - args.dot_delta and args.momentum + args.dot_delta < 1):
        parser.error(f'--optimizer dot: --momentum {args.momentum} minus and plus --dot_delta '
                     f'{args.dot_delta} must both lie in [0, 1)')
    if args.nesterov and 'nesterov' in on_command_line:
        parser.error('--optimizer dot has no Nesterov form: leave out --nesterov')
    if args.nesterov:
        args.nesterov = False
        sources['nesterov'] = f"off: --optimizer dot has none ({sources['nesterov']}: on)"


def optimizer_line(args, sources):
    """The log's line on the optimiser."""
    if args.optimizer != 'dot':
        return f"  optimizer = sgd ({sources['optimizer']})"
    return (f'  optimizer = dot (command line): cross-entropy gradient momentum '
            f'{args.momentum - args.dot_delta:g}, distillation gradient momentum '
            f'{args.momentum + args.dot_delta:g}, each its own buffer; dot_delta = {args.dot_delta} '
            f"({sources['dot_delta']})")


class KDStep:
    """One training step: ce_weight * CE + kd_scale * KD, its gradient, SGD
    (with --optimizer dot, the gradients of the two terms apart, for DOT's
    two momenta: two backward passes through the student).

    `kd_scale` (lambda_kd times the method's weight for the epoch) lives in a
    device tensor, so a new value is a write, not a new step. Two variants:
    `distill`, and `cross_entropy` alone (no teacher forward) for epochs
    whose KD weight is 0; `current()` is the one in use. Each adds the
    batch's sums to `stats` (named by `stat_names`: CE, KD, the method's own
    loss terms, accuracy) and returns them.

    A mode with two `views` (weak, strong: MLKD) trains on both: the student
    runs once per view (BatchNorm sees each view's batch alone), the frozen
    teacher once on both together; CE is the sum of both views' CE (in the
    CE-only step too), and the accuracy is the weak view's. One-view modes
    run exactly as before."""

    def __init__(self, student, teacher, distiller, optimizer, args, views=('weak',)):
        self.student, self.teacher, self.distiller = student, teacher, distiller
        self.optimizer, self.args = optimizer, args
        self.two_views = len(views) == 2
        if self.two_views and distiller.teacher_grad:
            raise ValueError('a two-view step runs the teacher without autograd')
        self.params = optimizer.params
        self.two_momenta = hasattr(optimizer, 'update_both')
        self.terms = tuple(distiller.loss_terms)
        self.loss_names = ['ce', 'kd'] + [f'kd_{t}' for t in self.terms]
        self.stat_names = self.loss_names + ['correct1', 'correct5', 'n']
        device = next(student.parameters()).device
        self.stats = EpochStats(self.stat_names, self.loss_names, device)
        self.kd_scale = torch.zeros((), device=device)
        self.kd_on = False
        self.zero = torch.zeros((), device=device)  # the KD terms of a CE-only step, made once

    @property
    def capturable(self):
        return self.distiller.capturable

    @property
    def why_not_capturable(self):
        return f'--kd_mode {self.args.kd_mode} synchronises with the host'

    @property
    def uses_teacher(self):
        """Whether the step in use runs the teacher (a CE-only epoch does not)."""
        return self.kd_on

    def set_kd_scale(self, value):
        self.kd_scale.fill_(value)
        self.kd_on = value != 0.0
        return value

    def current(self):
        return self.distill if self.kd_on else self.cross_entropy

    def __call__(self, batch):
        return self.current()(batch)

    def cross_entropy(self, batch):
        """CE only (warm-up, or the main schedule after an initialisation phase);
        a two-view mode's on both views, as its distillation step."""
        with autocast(self.args):
            s = self.student(batch.img)
            ce = F.cross_entropy(s.out.float(), batch.target)
            if self.two_views:
                ce = ce + F.cross_entropy(self.student(batch.strong).out.float(), batch.target)
        self.optimizer.update(grads_of(self.args.ce_weight * ce, self.params))
        return self.record(s.out, batch.target, ce, self.zero, [self.zero] * len(self.terms))

    def distill(self, batch):
        if self.two_views:
            return self.distill_two_views(batch)
        img = batch.img
        with autocast(self.args):
            if self.distiller.teacher_grad:  # the loss differentiates through the teacher
                img = img.detach().requires_grad_(True)
                batch = batch._replace(img=img)
            s = self.student(img)
            with torch.set_grad_enabled(self.distiller.teacher_grad):
                t = self.teacher(img)
            ce = F.cross_entropy(s.out.float(), batch.target)
            kd = self.distiller(s, t, batch)
            terms = []
            if self.terms:  # a dict of named terms whose sum is the KD loss
                terms = [kd[name] for name in self.terms]
                kd = sum(terms)
            task, distillation = self.args.ce_weight * ce, self.kd_scale * kd
        self.update(task, distillation)
        return self.record(s.out, batch.target, ce, kd, terms)

    def update(self, task, distillation):
        """The optimiser's step on the task (CE) and distillation losses."""
        if self.two_momenta:  # DOT: the two gradients reach the optimiser apart
            self.optimizer.update_both(grads_of(task, self.params, retain_graph=True),
                                       grads_of(distillation, self.params))
        else:
            self.optimizer.update(grads_of(task + distillation, self.params))

    def distill_two_views(self, batch):
        """The step of a ('weak', 'strong') mode: the distiller gets (weak,
        strong) pairs of the student's and the teacher's features."""
        n = batch.img.shape[0]
        with autocast(self.args):
            s = (self.student(batch.img), self.student(batch.strong))
            with torch.no_grad():
                t = split_views(self.teacher(torch.cat([batch.img, batch.strong])), n)
            ce = (F.cross_entropy(s[0].out.float(), batch.target)
                  + F.cross_entropy(s[1].out.float(), batch.target))
            kd = self.distiller(s, t, batch)
            terms = []
            if self.terms:
                terms = [kd[name] for name in self.terms]
                kd = sum(terms)
            task, distillation = self.args.ce_weight * ce, self.kd_scale * kd
        self.update(task, distillation)
        return self.record(s[0].out, batch.target, ce, kd, terms)

    def record(self, logits, target, ce, kd, terms):
        sums = cross_entropy_stats(logits, target, ce, kd, *terms)
        self.stats.add(sums)
        return sums


def split_views(features, n):
    """Features of a batch of two views stacked ([2n, ...] each, pairs of
    tensors too) -> (first view's, second view's)."""
    def part(value, rows):
        if isinstance(value, tuple):
            return tuple(part(v, rows) for v in value)
        return value[rows]
    return tuple(type(features)(*(part(v, rows) for v in features))
                 for rows in (slice(0, n), slice(n, None)))


class PretrainStep:
    """One step of a method's pre-training phase: the teacher (no grad), the
    student if the phase trains it, the phase's loss alone, and an update of
    every parameter the optimiser holds (a zero gradient where the loss does
    not reach: weight decay and momentum still apply, as in the seed); adds
    the batch's sums to `stats` and returns them."""

    def __init__(self, phase, student, teacher, optimizer, args):
        self.phase, self.student, self.teacher = phase, student, teacher
        self.optimizer, self.args = optimizer, args
        self.params = optimizer.params
        self.stat_names = ['loss', 'correct1', 'correct5', 'n'] if phase.needs_student else ['loss', 'n']
        self.stats = EpochStats(self.stat_names, ['loss'], next(student.parameters()).device)

    uses_teacher = True

    def __call__(self, batch):
        with autocast(self.args):
            with torch.no_grad():
                t = self.teacher(batch.img)
            s = self.student(batch.img) if self.phase.needs_student else None
            loss = self.phase.loss(s, t, batch)
        grads = grads_of(loss, self.params)
        # The seed's AB/FSP init loss adds 0 * CE, so its SGD decays the classifier
        # (which the KD loss does not reach) and runs its momentum: a zero gradient here.
        self.optimizer.update([torch.zeros_like(p) if g is None else g
                               for p, g in zip(self.params, grads)])
        if s is None:
            n = batch.target.shape[0]
            sums = torch.stack([loss.detach().float() * n, loss.new_full((), n).float()])
        else:
            sums = cross_entropy_stats(s.out, batch.target, loss)
        self.stats.add(sums)
        return sums


INITIAL_FILE = 'initial.pth.tar'  # a student's fresh initialisation, in its run directory


def fresh_initialisation(net_name, num_class, seed):
    """The network `net_name` as initialised right after seeding torch with
    `seed`: the same weights for every run of one seed and network (and the
    initial weights train_base.py saves for that seed), drawn without
    touching the global random stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_network(net_name, num_class)


def frozen_teacher(net, args, device, load_weights=True):
    """The teacher network `net` with --t_model's weights, on `device`, in
    eval mode without gradients (bf16 convolution weights with --amp)."""
    if load_weights:
        load_network_weights(net, args.t_model, 'teacher (--t_model)')
    net = memory_layout(net.to(device), args).eval().requires_grad_(False)
    return cast_frozen_weights(net, args)


def build_distillation(args, device, n_data, train_labels, load_weights=True, s_init=None, teacher=None,
                       teacher_forward=None):
    """Student, teacher, the method's distiller and the training phases, as
    train_kd.py runs them (bench.py builds its KD configurations here too,
    with load_weights=False: random weights). The student starts from the
    file `s_init` (default --s_init) or, with neither, from
    fresh_initialisation(--s_name, classes, --seed). Returns (model, teacher,
    distiller, pretrain phases, main phase, KDStep): `model` is what is
    trained, evaluated and saved as the student. A phase that shares the
    main optimiser (AB/FSP's init) holds the same SGD object as the main
    phase: its momentum carries over, and the checkpoint of either phase
    saves it.

    Students sharing one teacher (--kd_mode a,b,...) pass the teacher built
    once (`teacher`) and what their steps call for its features
    (`teacher_forward`: shared_teacher.TeacherPass's, which runs it once per
    batch for all of them)."""
    student = build_network(args.s_name, args.num_class)
    # Built even when shared: a separate run draws the teacher's initialisation
    # here, so the distiller's draws that follow are the same in both
    own_teacher = build_network(args.t_name, args.num_class)
    if load_weights:
        s_init = s_init or args.s_init
        if s_init:
            load_network_weights(student, s_init, 'student initialisation (--s_init)')
        else:
            fresh = fresh_initialisation(args.s_name, args.num_class, args.seed)
            student.load_state_dict(fresh.state_dict())
    if teacher is None:
        teacher = frozen_teacher(own_teacher, args, device, load_weights)
    del own_teacher
    student = memory_layout(sync_batchnorm(student.to(device), args.sync_bn), args)  # torchrun: global-batch BN
    forward = teacher if teacher_forward is None else teacher_forward

    method = METHODS[args.kd_mode]
    ctx = Context(args=args, student_shapes=student.feature_shapes,
                  teacher_shapes=teacher.feature_shapes, num_class=args.num_class,
                  n_data=n_data, train_labels=train_labels, device=device, student=student,
                  teacher=teacher)
    try:
        distiller = memory_layout(sync_batchnorm(method.build(ctx).to(device), args.sync_bn), args)
        pretrain = distiller.pretrain_phases(ctx)
        model = distiller.wrap_student(student)
    except ConfigError as e:
        raise UserError(f'--kd_mode {args.kd_mode}: {e}') from None
    except (MemoryError, RuntimeError, OverflowError, TypeError) as e:
        # e.g. --feat_dim 2**31-1: an allocation fails; --k 1e30: a size overflows
        if not isinstance(e, (MemoryError, OverflowError)) and not any(
                word in str(e).lower() for word in ('alloc', 'memory', 'overflow')):
            raise
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else 'out of memory'
        raise UserError(f'--kd_mode {args.kd_mode}: cannot be built with these settings ({reason}); '
                        f'is one of its flags (a size, a factor, an order) too large?') from None

    # the main schedule: ce_weight * CE + lambda_kd * kd_weight(epoch) * KD, on one SGD
    # that also holds the parameters of the phases sharing it (the seed's AB/FSP)
    shared = [p for pp in pretrain if pp.shares_main_optimizer for p in pp.params]
    optimizer = make_optimizer(list(model.parameters()) + list(distiller.learnable_parameters()) + shared,
                               args)
    step = KDStep(model, forward, distiller, optimizer, args, views=method.views)

    def pretrain_phase(pp):
        if not pp.shares_main_optimizer:
            phase_optimizer = make_sgd(pp.params, args, nesterov=pp.nesterov)
        elif pp.nesterov is None:
            phase_optimizer = optimizer
        else:
            raise ValueError(f'phase {pp.name}: on the main optimiser, it has that one\'s Nesterov setting')

        def begin_epoch(epoch):
            model.train(pp.needs_student)
            distiller.eval()
            for m in pp.train_modules:
                m.train()

        pretrain_step = PretrainStep(pp, model, forward, phase_optimizer, args)
        return Phase(pp.name, pp.epochs, lambda epoch: pp.lr_scale(epoch) * args.lr, phase_optimizer,
                     pretrain_step, pretrain_step.stats, begin_epoch=begin_epoch)

    def begin_epoch(epoch):
        model.train()
        distiller.train()
        distiller.begin_epoch(epoch, args.epochs)
        return {'kd_weight': step.set_kd_scale(args.lambda_kd * distiller.kd_weight(epoch, args.epochs))}

    main_phase = Phase('main', args.epochs, main_schedule(args), optimizer, step, step.stats,
                       begin_epoch=begin_epoch, extra_columns=['kd_weight'])
    return model, teacher, distiller, [pretrain_phase(pp) for pp in pretrain], main_phase, step


def n_epochs(n):
    return f'{n} epoch' if n == 1 else f'{n} epochs'


def stages(method, args):
    """The log's lines on the method's stages in epochs (its pre-training
    phases and warm-ups, as its flags declare them: `Flag.phase`,
    `Flag.warms_up`), and a warning for each that spans half of --epochs or
    more, naming the flag that sets it."""
    epochs, lines, warnings = args.epochs, [], []
    phases = [(flag.phase, name) for name, flag in method.flags.items() if flag.phase]
    order = ''.join(f'{phase} {n_epochs(getattr(args, name))} (--{name}), then '
                    for phase, name in phases)
    lines.append(f'  stages: {order}main {n_epochs(epochs)} (--epochs)')
    for phase, name in phases:
        length = getattr(args, name)
        if 2 * length >= epochs:
            warnings.append(f'the {phase} phase (--{name} {length}) lasts half or more of the '
                            f'{epochs}-epoch main schedule: the stage takes {length} of the '
                            f'run\'s {length + epochs} epochs; lower --{name} (or raise --epochs)')
    for name, flag in method.flags.items():
        if not flag.warms_up:
            continue
        length = getattr(args, name)
        lines.append(f'  warm-up: {flag.warms_up}, over the first {n_epochs(length)} (--{name})'
                     if length else f'  warm-up: none, {flag.warms_up} at full strength from the '
                                    f'start (--{name} 0)')
        if length and 2 * length >= epochs:
            outcome = ('never reaches full strength in this run (at best in its last epoch)'
                       if length >= epochs else
                       f'reaches full strength only after {length} of the run\'s {epochs} epochs')
            warnings.append(f'--{name} {length} spans half or more of the {epochs}-epoch run: '
                            f'{flag.warms_up} {outcome}; lower --{name} (or raise --epochs)')
    return lines, warnings


def log_schedule(args, sources, ignored):
    """log.txt's opening: the run's whole schedule, where each value came
    from, the method's settings and stages, and what in them defeats the method."""
    for line in schedule_lines(args, sources):
        LOG.info(line)
    LOG.info(optimizer_line(args, sources))
    method = METHODS[args.kd_mode]
    LOG.info(f'kd_mode {args.kd_mode} ({method.title}, {method.paper}): {method.transfers}')
    for name in method.defaults_for(args.data_name, args.protocol):
        LOG.info(f'  {name} = {getattr(args, name)} ({sources[name]})')
    if ignored:
        LOG.info(f"  ignored (not read by {args.kd_mode}): {', '.join(ignored)}")
    stage_lines, warnings = stages(method, args)
    for line in stage_lines:
        LOG.info(line)
    for warning in warnings:
        LOG.info(f'warning: {warning}')
    if method.views == ('weak', 'strong'):
        LOG.info(f'  views: weak (crop, flip) and strong (crop, flip, RandAugment 2 ops, Cutout: '
                 f'strong_augment.py), student and teacher on both')


def build_student(args, run, resume, device, train_loader, test_loader, teacher=None, teacher_forward=None):
    """One student as train_kd.py trains it, alone or beside others on one
    teacher (`teacher`, `teacher_forward`: see build_distillation): its
    network, the teacher, the method's distiller, every phase (the main one
    evaluated on `test_loader`), with the log's lines and args.json's
    records on them; and what its fresh start does besides the teacher's
    test line (save a fresh initialisation). Returns (model, teacher,
    distiller, phases, on_fresh_start)."""
    # Without --s_init, a resumed run's student is built from the initial weights
    # its fresh start saved (the checkpoint then restores its training).
    initial = os.path.join(run.dir, INITIAL_FILE)
    saved_initial = initial if not args.s_init and resume is not None and os.path.isfile(initial) else None
    model, teacher, distiller, pretrain, main_phase, _ = build_distillation(
        args, device, len(train_loader.labels), train_loader.labels, s_init=saved_initial,
        teacher=teacher, teacher_forward=teacher_forward)
    main_phase.evaluate = Evaluator(model, test_loader, args.amp, args.compile, show_progress(args))
    start = (args.s_init or saved_initial or
             f'a fresh initialisation drawn from --seed {args.seed} (saved to {initial})')
    LOG.info(f'student {args.s_name} from {start}; teacher {args.t_name} from '
             f'{args.t_model}; on {describe_device(device)}')
    # args.json names the teacher file by content: the network and classes it
    # holds (the strict load above checked them) and its sha256
    run.records['teacher'] = {'path': os.path.abspath(args.t_model), 'network': args.t_name,
                              'num_class': args.num_class, 'sha256': run.inputs['t_model'],
                              'layout': layout_of(args.t_model)}
    if args.s_init:
        run.records['student_init'] = {'path': os.path.abspath(args.s_init),
                                       'sha256': run.inputs['s_init']}
    n_extra = sum(p.numel() for p in distiller.learnable_parameters())
    if n_extra:
        LOG.info(f'{args.kd_mode} adds {n_extra / 1e6:.3f}M learnable parameters')

    def save_initialisation():
        if not args.s_init:  # the start every run of this seed and network shares
            save_checkpoint(zoo_record(fresh_initialisation(args.s_name, args.num_class, args.seed), 0),
                            initial)
            if WORLD.main:  # rank 0 wrote it
                run.record('student_init', {'path': os.path.abspath(initial),
                                            'sha256': file_digest(initial), 'seed': args.seed})
    return model, teacher, distiller, pretrain + [main_phase], save_initialisation


def teacher_test_line(teacher, test_loader, args):
    teacher_test = evaluate(teacher, test_loader, amp=args.amp)
    return f"teacher test top-1 {teacher_test['top1']:.2f} top-5 {teacher_test['top5']:.2f}"


@cli
def main(argv=None):
    modes = build_parser().parse_args(argv).kd_mode.split(',')
    if len(modes) > 1:  # one student per mode, sharing the batches and the teacher's pass
        return train_shared(argv, modes)
    args, sources, ignored = parse_args(argv)
    # Every check happens before anything is written: run directory, resume
    # file, both checkpoints, the method's settings, the data.
    run, resume, device = begin(args, 'train_kd.py', argv)
    log_schedule(args, sources, ignored)
    method = METHODS[args.kd_mode]
    train_loader, test_loader = make_loaders(args, device, log=LOG.info,
                                             strong_view='strong' in method.views)
    model, teacher, distiller, phases, save_initialisation = build_student(
        args, run, resume, device, train_loader, test_loader)

    def on_fresh_start():
        save_initialisation()
        LOG.info(teacher_test_line(teacher, test_loader, args))

    train_phases(run, resume, phases, {'net': model}, train_loader, args, device,
                 state={'distiller': distiller}, on_fresh_start=on_fresh_start)


def train_shared(argv, modes):
    """--kd_mode a,b,...: one student per mode over one loader and one
    teacher pass (shared_teacher.py), each writing its own run directory
    <save_root>/<note>/<mode>/ as its separate run would. Checks first, for
    every student (flags, run directory, resume checkpoint), then the data
    and the teacher once; a method that cannot share the teacher's pass
    stops the whole run before anything is written."""
    two_views = [m for m in modes if len(METHODS[m].views) > 1]
    if two_views:  # their loader draws a second, strong view: the others' batches would change
        raise UserError(f'--kd_mode {",".join(modes)}: {", ".join(two_views)} (it trains on weak and strong '
                        f'views of each image, drawn by a loader of its own) cannot share the teacher\'s '
                        f'pass with other students; run it on its own')
    students = []
    for mode in modes:
        args, sources, ignored = parse_args(argv, mode)
        args.note = os.path.join(args.note, mode)
        students.append(shared_teacher.Student(mode, args, sources, ignored))
    args = students[0].args
    begin_process(args, log_file=False)  # the process's own lines: stdout (each student has a log.txt)
    device = torch.device(args.device)
    for s in students:
        s.args.device = args.device
        s.check(check_run, 'train_kd.py', argv)
    configure_backend(args)
    seed_everything(args.seed)
    data_lines = []
    train_loader, test_loader = make_loaders(args, device, log=data_lines.append)
    for line in data_lines:
        LOG.info(line)
    seeded = rng_state()  # where each student's stream starts, as its separate run's does
    teacher = frozen_teacher(build_network(args.t_name, args.num_class), args, device)
    teacher_pass = shared_teacher.TeacherPass(teacher, args, device)
    for s in students:
        if s.finished:
            continue
        set_rng_state(seeded)
        with s.active():
            log_schedule(s.args, s.sources, s.ignored)
            for line in data_lines:
                LOG.info(line)
            s.build(lambda a: build_student(a, s.run, s.resume, device, train_loader, test_loader, teacher,
                                            teacher_pass))
    unshareable = [f'{s.mode} ({s.distiller.teacher_sharing})' for s in students
                   if s.distiller is not None and s.distiller.teacher_sharing]
    if unshareable:
        raise UserError(f'--kd_mode {",".join(modes)}: {", ".join(unshareable)} cannot share the '
                        f'teacher\'s pass with other students; run '
                        f'{"it" if len(unshareable) == 1 else "each"} on its own')
    return shared_teacher.train_students(
        students, teacher_pass, train_loader, args, device,
        teacher_test=lambda: teacher_test_line(teacher, test_loader, args))


if __name__ == '__main__':
    main()
