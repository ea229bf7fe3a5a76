"""Distil a frozen teacher into a student with one method of kd_losses/.

The student starts from --s_init (a baseline's initial weights), the teacher
is --t_model (a trained baseline); both accept the original zoo's checkpoint
files. The loss is ce_weight * CE + lambda_kd * KD, with the mode's defaults
where a flag is not given. Methods with pre-training phases (AB/FSP
initialisation, FT's paraphraser) run them first. Everything a method needs
comes from its registry entry in kd_losses/: this script names no method.

    python train_kd.py --data_name cifar10 --t_name resnet110 --s_name resnet20 \\
        --t_model results/base-c10-r110/model_best.pth.tar \\
        --s_init results/base-c10-r20/initial_r20.pth.tar --kd_mode st --note st-c10-r110-r20
"""
import argparse

import torch
import torch.nn.functional as F

from checkpoints import load_network_weights
from dataset import make_loaders
from distributed import sync_batchnorm
from kd_losses import METHODS, ConfigError, Context, all_flags
from network import NETWORKS, build_network
from utils import (LOG, Phase, UserError, add_common_args, autocast, begin, cli, cross_entropy_stats,
                   describe_device, evaluate, finalize_common_args, lr_at, make_sgd, memory_layout,
                   non_negative, positive, show_progress, train_phases)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    g = parser.add_argument_group('teacher and student')
    g.add_argument('--s_init', required=True, help="student's initial weights (a baseline's initial_rNN.pth.tar)")
    g.add_argument('--t_model', required=True, help="teacher's trained weights (a baseline's model_best.pth.tar)")
    g.add_argument('--s_name', required=True, choices=sorted(NETWORKS))
    g.add_argument('--t_name', required=True, choices=sorted(NETWORKS))
    g = parser.add_argument_group('distillation (a flag left out takes the mode\'s default)')
    g.add_argument('--kd_mode', required=True, choices=sorted(METHODS))
    g.add_argument('--lambda_kd', type=non_negative(float), default=None,
                   help='weight of the KD loss; default per mode: ' +
                        ', '.join(f"{m} {METHODS[m].defaults['lambda_kd']:g}" for m in sorted(METHODS)))
    g.add_argument('--ce_weight', type=non_negative(float), default=None,
                   help='weight of the cross-entropy loss (default 1, or the mode\'s own)')
    for name, (flag, per_mode) in sorted(all_flags().items(), key=lambda kv: kv[0].lower()):
        default_text = ', '.join(f'{m} {v}' for m, v in sorted(per_mode.items()))
        if flag.type is bool:  # an on/off switch
            g.add_argument(f'--{name}', action=argparse.BooleanOptionalAction, default=None,
                           help=f'{flag.help} [{default_text}]')
            continue
        g.add_argument(f'--{name}', type=positive(flag.type) if flag.positive else flag.type,
                       choices=flag.choices, default=None,
                       help=f'{flag.help} [{default_text}]')
    return parser


def parse_args(argv=None):
    """Parsed flags, the mode's defaults filled in; also returns where each
    method setting came from, for the log."""
    parser = build_parser()
    args = finalize_common_args(parser, parser.parse_args(argv))
    method = METHODS[args.kd_mode]
    sources = {}
    for name, value in method.defaults_for(args.data_name).items():
        given = getattr(args, name) is not None
        if not given:
            setattr(args, name, value)
        sources[name] = 'command line' if given else f'default for {args.kd_mode} on {args.data_name}'
    ignored = [f'--{n}' for n in all_flags() if n not in method.flags and getattr(args, n) is not None]
    return args, sources, ignored


class KDStep:
    """One training step: ce_weight * CE + kd_scale * KD, backward, SGD.

    `kd_scale` (lambda_kd times the method's weight for the epoch) lives in a
    device tensor, so a new value is a write, not a new step; at 0 the step
    is CE alone (no teacher forward). Returns the batch's sums for EpochStats,
    named by `stat_names`: CE, KD, the method's own loss terms, accuracy."""

    def __init__(self, student, teacher, distiller, optimizer, args):
        self.student, self.teacher, self.distiller = student, teacher, distiller
        self.optimizer, self.args = optimizer, args
        self.terms = tuple(distiller.loss_terms)
        self.loss_names = ['ce', 'kd'] + [f'kd_{t}' for t in self.terms]
        self.stat_names = self.loss_names + ['correct1', 'correct5', 'n']
        device = next(student.parameters()).device
        self.kd_scale = torch.zeros((), device=device)
        self.kd_on = False

    def set_kd_scale(self, value):
        self.kd_scale.fill_(value)
        self.kd_on = value != 0.0
        return value

    def __call__(self, batch):
        img, target = batch.img, batch.target
        with autocast(self.args):
            if not self.kd_on:  # CE only (warm-up, or after an initialisation phase)
                s = self.student(img)
                ce = F.cross_entropy(s.out.float(), target)
                kd = torch.zeros_like(ce)
                terms = [kd] * len(self.terms)
                loss = self.args.ce_weight * ce
            else:
                if self.distiller.teacher_grad:  # the loss differentiates through the teacher
                    img = img.detach().requires_grad_(True)
                    batch = batch._replace(img=img)
                s = self.student(img)
                with torch.set_grad_enabled(self.distiller.teacher_grad):
                    t = self.teacher(img)
                ce = F.cross_entropy(s.out.float(), target)
                kd = self.distiller(s, t, batch)
                terms = []
                if self.terms:  # a dict of named terms whose sum is the KD loss
                    terms = [kd[name] for name in self.terms]
                    kd = sum(terms)
                loss = self.args.ce_weight * ce + self.kd_scale * kd
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return cross_entropy_stats(s.out, target, ce, kd, *terms)


class PretrainStep:
    """One step of a method's pre-training phase: the teacher (no grad), the
    student if the phase trains it, the phase's loss alone."""

    def __init__(self, phase, student, teacher, optimizer, args):
        self.phase, self.student, self.teacher = phase, student, teacher
        self.optimizer, self.args = optimizer, args
        self.stat_names = ['loss', 'correct1', 'correct5', 'n'] if phase.needs_student else ['loss', 'n']

    def __call__(self, batch):
        with autocast(self.args):
            with torch.no_grad():
                t = self.teacher(batch.img)
            s = self.student(batch.img) if self.phase.needs_student else None
            loss = self.phase.loss(s, t, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if s is None:
            n = batch.target.shape[0]
            return torch.stack([loss.detach().float() * n, loss.new_full((), n).float()])
        return cross_entropy_stats(s.out, batch.target, loss)


def build_distillation(args, device, n_data, train_labels, load_weights=True):
    """Student, teacher, the method's distiller and the training phases, as
    train_kd.py runs them (bench.py builds its KD configurations here too,
    with load_weights=False: random weights). Returns (model, teacher,
    distiller, pretrain phases, main phase, KDStep): `model` is what is
    trained, evaluated and saved as the student."""
    student = build_network(args.s_name, args.num_class)
    teacher = build_network(args.t_name, args.num_class)
    if load_weights:
        load_network_weights(student, args.s_init, 'student initialisation (--s_init)')
        load_network_weights(teacher, args.t_model, 'teacher (--t_model)')
    student = memory_layout(sync_batchnorm(student.to(device), args.sync_bn), args)  # torchrun: global-batch BN
    teacher = memory_layout(teacher.to(device), args).eval().requires_grad_(False)

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

    def pretrain_phase(pp):
        optimizer = make_sgd(pp.params, args)

        def begin_epoch(epoch):
            model.train(pp.needs_student)
            distiller.eval()
            for m in pp.train_modules:
                m.train()

        step = PretrainStep(pp, model, teacher, optimizer, args)
        return Phase(pp.name, pp.epochs, lambda epoch: pp.lr_scale(epoch) * args.lr, optimizer,
                     step, step.stat_names, ['loss'], begin_epoch=begin_epoch)

    # the main schedule: ce_weight * CE + lambda_kd * kd_weight(epoch) * KD
    optimizer = make_sgd(list(model.parameters()) + list(distiller.learnable_parameters()), args)
    step = KDStep(model, teacher, distiller, optimizer, args)

    def begin_epoch(epoch):
        model.train()
        distiller.train()
        distiller.begin_epoch(epoch, args.epochs)
        return {'kd_weight': step.set_kd_scale(args.lambda_kd * distiller.kd_weight(epoch, args.epochs))}

    main_phase = Phase('main', args.epochs, lambda epoch: lr_at(epoch, args.epochs, args.lr),
                       optimizer, step, step.stat_names, step.loss_names,
                       begin_epoch=begin_epoch, extra_columns=['kd_weight'])
    return model, teacher, distiller, [pretrain_phase(pp) for pp in pretrain], main_phase, step


@cli
def main(argv=None):
    args, sources, ignored = parse_args(argv)
    # Every check happens before anything is written: run directory, resume
    # file, both checkpoints, the method's settings, the data.
    run, resume, device = begin(args, 'train_kd.py', argv)
    train_loader, test_loader = make_loaders(args, device, log=LOG.info)
    model, teacher, distiller, pretrain, main_phase, _ = build_distillation(
        args, device, len(train_loader.labels), train_loader.labels)
    main_phase.evaluate = lambda: evaluate(model, test_loader, show_progress(args), amp=args.amp)

    method = METHODS[args.kd_mode]
    LOG.info(f'kd_mode {args.kd_mode} ({method.title}, {method.paper}): {method.transfers}')
    for name in method.defaults_for(args.data_name):
        LOG.info(f'  {name} = {getattr(args, name)} ({sources[name]})')
    if ignored:
        LOG.info(f"  ignored (not read by {args.kd_mode}): {', '.join(ignored)}")
    LOG.info(f'student {args.s_name} from {args.s_init}; teacher {args.t_name} from '
             f'{args.t_model}; on {describe_device(device)}')
    n_extra = sum(p.numel() for p in distiller.learnable_parameters())
    if n_extra:
        LOG.info(f'{args.kd_mode} adds {n_extra / 1e6:.3f}M learnable parameters')
    LOG.info(f'args: {vars(args)}')

    def on_fresh_start():
        teacher_test = evaluate(teacher, test_loader, amp=args.amp)
        LOG.info(f"teacher test top-1 {teacher_test['top1']:.2f} top-5 {teacher_test['top5']:.2f}")

    train_phases(run, resume, pretrain + [main_phase], {'net': model}, train_loader, args, device,
                 state={'distiller': distiller}, on_fresh_start=on_fresh_start)


if __name__ == '__main__':
    main()
