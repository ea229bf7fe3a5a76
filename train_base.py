"""Train one of the CIFAR networks (--net_name: CIFAR ResNets, WRNs, VGGs,
MobileNetV2, ShuffleNetV1/V2, ResNet50) with cross-entropy: the baselines of
the comparison table. Their trained weights are the teachers, and the initial
weights saved here (initial_r20.pth.tar for resnet20, initial_<name>.pth.tar
for networks other than the CIFAR ResNets) are what every student starts
from, so that KD runs and baselines share their initialisation.

    python train_base.py --data_name cifar10 --net_name resnet110 --save_root ./results/base --note base-c10-r110
    python train_base.py --data_name cifar10 --net_name resnet20 --save_root ./results/base --note base-c10-r20
"""
import os

import torch
import torch.nn.functional as F

from capture import grads_of
from checkpoints import initial_weights_name, load_network_weights, save_checkpoint, zoo_record
from dataset import make_loaders
from distributed import sync_batchnorm
from errors import ArgumentParser, cli
from flags import (HelpFormatter, add_common_args, finalize_common_args, flags_given,
                   schedule_lines, schedule_sources)
from network import NETWORKS, build_network
from utils import (EpochStats, Evaluator, LOG, Phase, autocast, begin, cross_entropy_stats,
                   describe_device, evaluate, main_schedule, make_sgd, memory_layout,
                   show_progress, train_phases)

STAT_NAMES = ['ce', 'correct1', 'correct5', 'n']


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_args(parser)
    g = parser.add_argument_group('the network')
    g.add_argument('--net_name', required=True, choices=sorted(NETWORKS))
    g.add_argument('--evaluate', metavar='CHECKPOINT', default=None,
                   help='only evaluate CHECKPOINT (this project\'s or the original zoo\'s) on '
                        'the test split and print its top-1/top-5; nothing is written '
                        '[none: train]')
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    return finalize_common_args(parser, args, args.net_name)


def evaluate_checkpoint(args):
    device = torch.device(args.device)
    net = load_network_weights(build_network(args.net_name, args.num_class), args.evaluate,
                               'checkpoint (--evaluate)').to(device)
    _, test_loader = make_loaders(args, device, training=False)
    result = evaluate(memory_layout(net, args), test_loader, show_progress(args), amp=args.amp)
    print(f"{args.evaluate}: {args.net_name} on the {args.data_name} test split: "
          f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  loss {result['loss']:.4f}")
    return result


def make_step(net, optimizer, args, stats=None):
    """One training step: cross-entropy, its gradient, SGD; adds the batch's
    sums to `stats` (an EpochStats named by STAT_NAMES) and returns them."""
    params = optimizer.params

    def step(batch):
        with autocast(args):
            out = net(batch.img).out
            loss = F.cross_entropy(out.float(), batch.target)
        optimizer.update(grads_of(loss, params))
        sums = cross_entropy_stats(out, batch.target, loss)
        if stats is not None:
            stats.add(sums)
        return sums
    step.optimizer = optimizer  # whoever runs the step can reach its learning rate
    return step


def build_baseline(args, device):
    """The network (random initial weights from --seed) and its training phase,
    as train_base.py runs them (bench.py times this very step)."""
    net = build_network(args.net_name, args.num_class).to(device)
    net = memory_layout(sync_batchnorm(net, args.sync_bn), args)  # torchrun: global-batch BN
    optimizer = make_sgd(net.parameters(), args)
    stats = EpochStats(STAT_NAMES, ['ce'], device)
    return net, Phase('main', args.epochs, main_schedule(args), optimizer,
                      make_step(net, optimizer, args, stats), stats)


@cli
def main(argv=None):
    args = parse_args(argv)
    if args.evaluate:
        return evaluate_checkpoint(args)
    # Every check happens before anything is written: run directory, resume file, data.
    run, resume, device = begin(args, 'train_base.py', argv)
    for line in schedule_lines(args, schedule_sources(args, flags_given(build_parser(), argv),
                                                      args.net_name)):
        LOG.info(line)  # log.txt opens with the schedule, and where each value came from
    train_loader, test_loader = make_loaders(args, device, log=LOG.info)

    net, phase = build_baseline(args, device)
    phase.evaluate = Evaluator(net, test_loader, args.amp, args.compile, show_progress(args))
    LOG.info(f'{args.net_name}: {sum(p.numel() for p in net.parameters()) / 1e6:.3f}M parameters, '
             f'{args.num_class} classes, on {describe_device(device)}')

    def on_fresh_start():  # the initial weights every student of this network starts from
        initial = os.path.join(run.dir, initial_weights_name(args.net_name))
        save_checkpoint(zoo_record(net, 0), initial)
        LOG.info(f'initial weights saved to {initial}')

    train_phases(run, resume, [phase], {'net': net}, train_loader, args, device,
                 on_fresh_start=on_fresh_start)


if __name__ == '__main__':
    main()
