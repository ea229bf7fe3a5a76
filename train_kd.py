"""Distil a frozen teacher into a student with one method of kd_losses/.

The student starts from --s_init (a baseline's initial weights), the teacher
is --t_model (a trained baseline); both accept the original zoo's checkpoint
files. The loss is CE + lambda_kd * KD, with the mode's seed defaults where a
flag is not given. Methods with pre-training stages (AB/FSP initialisation,
FT's paraphraser) run them first. Everything a method needs comes from its
registry entry in kd_losses/: this script names no method.

    python train_kd.py --data_name cifar10 --t_name resnet110 --s_name resnet20 \\
        --t_model results/base-c10-r110/model_best.pth.tar \\
        --s_init results/base-c10-r20/initial_r20.pth.tar --kd_mode st --note st-c10-r110-r20
"""
import argparse

import torch
import torch.nn.functional as F

from dataset import make_loaders
from kd_losses import METHODS, ConfigError, Context, all_flags
from network import NETWORKS, build_network
from utils import (LOG, Checkpointer, Stage, UserError, add_common_args, autocast, begin, cli,
                   cross_entropy_stats, describe_device, evaluate, finalize_common_args, fit,
                   load_network_weights, lr_at, make_sgd, non_negative, positive, rng_state,
                   memory_layout, show_progress, sync_batchnorm)

COLUMNS = ['stage', 'stage_index', 'epoch', 'lr', 'kd_weight', 'train_loss', 'train_ce',
           'train_kd', 'train_top1', 'train_top5', 'test_loss', 'test_top1', 'test_top5',
           'seconds', 'img_per_s']


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    g = parser.add_argument_group('teacher and student')
    g.add_argument('--s_init', required=True, help="student's initial weights (a baseline's initial_rNN.pth.tar)")
    g.add_argument('--t_model', required=True, help="teacher's trained weights (a baseline's model_best.pth.tar)")
    g.add_argument('--s_name', required=True, choices=sorted(NETWORKS))
    g.add_argument('--t_name', required=True, choices=sorted(NETWORKS))
    g = parser.add_argument_group('distillation (a flag left out takes the mode\'s seed default)')
    g.add_argument('--kd_mode', required=True, choices=sorted(METHODS))
    g.add_argument('--lambda_kd', type=non_negative(float), default=None,
                   help='weight of the KD loss; default per mode: ' +
                        ', '.join(f"{m} {METHODS[m].defaults['lambda_kd']:g}" for m in sorted(METHODS)))
    for name, (flag, per_mode) in sorted(all_flags().items(), key=lambda kv: kv[0].lower()):
        default_text = ', '.join(f'{m} {v}' for m, v in sorted(per_mode.items()))
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
        sources[name] = 'command line' if given else f'seed default for {args.kd_mode} on {args.data_name}'
    ignored = [f'--{n}' for n in all_flags() if n not in method.flags and getattr(args, n) is not None]
    return args, sources, ignored


class KDStep:
    """One training step: CE + kd_scale * KD, backward, SGD. `kd_scale` is
    lambda_kd times the method's weight for the epoch; at 0 the step is CE
    alone (no teacher forward). Returns the batch's sums for EpochStats."""

    def __init__(self, student, teacher, distiller, optimizer, args):
        self.student, self.teacher, self.distiller = student, teacher, distiller
        self.optimizer, self.args = optimizer, args
        self.kd_scale = 0.0

    def __call__(self, batch):
        img = batch.img
        with autocast(self.args):
            if self.kd_scale == 0.0:  # CE only (warm-up, or after an initialisation stage)
                s = self.student(img)
                ce = F.cross_entropy(s.out.float(), batch.target)
                kd, loss = torch.zeros_like(ce), ce
            else:
                if self.distiller.teacher_grad:  # the loss differentiates through the teacher
                    img = img.detach().requires_grad_(True)
                    batch = batch._replace(img=img)
                s = self.student(img)
                with torch.set_grad_enabled(self.distiller.teacher_grad):
                    t = self.teacher(img)
                ce = F.cross_entropy(s.out.float(), batch.target)
                kd = self.distiller(s, t, batch)
                loss = ce + self.kd_scale * kd
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return cross_entropy_stats(s.out, batch.target, ce, kd)


class PreStageStep:
    """One step of a method's pre-training stage: the teacher (no grad), the
    student if the stage trains it, the stage's loss alone."""

    def __init__(self, stage, student, teacher, optimizer, args):
        self.stage, self.student, self.teacher = stage, student, teacher
        self.optimizer, self.args = optimizer, args

    def __call__(self, batch):
        with autocast(self.args):
            with torch.no_grad():
                t = self.teacher(batch.img)
            s = self.student(batch.img) if self.stage.needs_student else None
            loss = self.stage.loss(s, t, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if s is None:
            n = batch.target.shape[0]
            return torch.stack([loss.detach().float() * n, loss.new_full((), n).float()])
        return cross_entropy_stats(s.out, batch.target, loss)


@cli
def main(argv=None):
    args, sources, ignored = parse_args(argv)
    # Every check happens before anything is written: run directory, resume
    # file, both checkpoints, the method's settings, the data.
    run, resume, device = begin(args, COLUMNS, 'train_kd.py', argv)

    student = load_network_weights(build_network(args.s_name, args.num_class), args.s_init,
                                   'student initialisation (--s_init)').to(device)
    student = memory_layout(sync_batchnorm(student, args), args)  # torchrun: global-batch BN
    teacher = load_network_weights(build_network(args.t_name, args.num_class), args.t_model,
                                   'teacher (--t_model)').to(device)
    teacher = memory_layout(teacher, args).eval().requires_grad_(False)
    train_loader, test_loader = make_loaders(args, device, log=LOG.info)

    method = METHODS[args.kd_mode]
    ctx = Context(args=args, student_shapes=student.feature_shapes,
                  teacher_shapes=teacher.feature_shapes, num_class=args.num_class,
                  n_data=len(train_loader.labels), train_labels=train_loader.labels,
                  device=device, student=student, teacher=teacher)
    try:
        distiller = memory_layout(sync_batchnorm(method.build(ctx).to(device), args), args)
        pre_stages = distiller.stages(ctx)
    except ConfigError as e:
        raise UserError(f'--kd_mode {args.kd_mode}: {e}') from None

    # ---- pre-training stages (AB/FSP initialisation, FT paraphraser)
    def pre_stage(ps):
        optimizer = make_sgd(ps.params, args)

        def begin_epoch(epoch):
            student.train(ps.needs_student)
            distiller.eval()
            for m in ps.train_modules:
                m.train()

        names = ['loss', 'correct1', 'correct5', 'n'] if ps.needs_student else ['loss', 'n']
        return Stage(ps.name, ps.epochs, lambda epoch: ps.lr_scale(epoch) * args.lr, optimizer,
                     PreStageStep(ps, student, teacher, optimizer, args), names, ['loss'],
                     begin_epoch=begin_epoch)

    # ---- the main schedule: CE + lambda_kd * kd_weight(epoch) * KD
    optimizer = make_sgd(list(student.parameters()) + list(distiller.learnable_parameters()), args)
    step = KDStep(student, teacher, distiller, optimizer, args)

    def begin_epoch(epoch):
        student.train()
        distiller.train()
        step.kd_scale = args.lambda_kd * distiller.kd_weight(epoch, args.epochs)
        return {'kd_weight': step.kd_scale}

    main_stage = Stage('main', args.epochs, lambda epoch: lr_at(epoch, args.epochs, args.lr),
                       optimizer, step, ['ce', 'kd', 'correct1', 'correct5', 'n'], ['ce', 'kd'],
                       evaluate=lambda: evaluate(student, test_loader, show_progress(args), amp=args.amp),
                       begin_epoch=begin_epoch)
    stages = [pre_stage(ps) for ps in pre_stages] + [main_stage]

    def resume_state(stage_index):
        return {'optimizer': stages[stage_index].optimizer.state_dict(),
                'distiller': distiller.state_dict(), 'loader': train_loader.state_dict(),
                'rng': rng_state()}

    checkpointer = Checkpointer(run, {'net': student}, resume_state)
    LOG.info(f'kd_mode {args.kd_mode} ({method.title}, {method.paper}): {method.transfers}')
    for name in method.defaults:
        LOG.info(f'  {name} = {getattr(args, name)} ({sources[name]})')
    if ignored:
        LOG.info(f"  ignored (not read by {args.kd_mode}): {', '.join(ignored)}")
    LOG.info(f'student {args.s_name} from {args.s_init}; teacher {args.t_name} from '
             f'{args.t_model}; on {describe_device(device)}')
    n_extra = sum(p.numel() for p in distiller.learnable_parameters())
    if n_extra:
        LOG.info(f'{args.kd_mode} adds {n_extra / 1e6:.3f}M learnable parameters')
    LOG.info(f'args: {vars(args)}')
    if resume is not None:
        distiller.load_state_dict(resume['distiller'])
    start = run.start(checkpointer, resume, train_loader, lambda si: stages[si].optimizer, device)
    if resume is None:
        teacher_test = evaluate(teacher, test_loader, amp=args.amp)
        LOG.info(f"teacher test top-1 {teacher_test['top1']:.2f} top-5 {teacher_test['top5']:.2f}")

    fit(stages, train_loader, args, checkpointer, start)
    LOG.info(f"done: best test top-1 {checkpointer.best['net']['top1']:.2f} "
             f"(epoch {checkpointer.best['net']['epoch']}); weights in {run.dir}")


if __name__ == '__main__':
    main()
