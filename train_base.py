"""Train one CIFAR ResNet with cross-entropy: the baselines of the comparison
table. Their trained weights are the teachers, and the initial weights saved
here (initial_r20.pth.tar, initial_r110.pth.tar) are what every student starts
from, so that KD runs and baselines share their initialisation.

    python train_base.py --data_name cifar10 --net_name resnet20 --note base-c10-r20
"""
import argparse
import os

import torch
import torch.nn.functional as F

from checkpoints import initial_weights_name, load_network_weights, save_checkpoint, zoo_record
from dataset import make_loaders
from distributed import sync_batchnorm
from network import NETWORKS, build_network
from utils import (LOG, Phase, add_common_args, autocast, begin, cli, cross_entropy_stats,
                   describe_device, evaluate, finalize_common_args, lr_at, make_sgd, memory_layout,
                   show_progress, train_phases)

STAT_NAMES = ['ce', 'correct1', 'correct5', 'n']


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument('--net_name', required=True, choices=sorted(NETWORKS))
    parser.add_argument('--evaluate', metavar='CHECKPOINT', default=None,
                        help='only evaluate CHECKPOINT (this project\'s or the original zoo\'s) on '
                             'the test split and print its top-1/top-5; nothing is written')
    return finalize_common_args(parser, parser.parse_args(argv))


def evaluate_checkpoint(args):
    device = torch.device(args.device)
    net = load_network_weights(build_network(args.net_name, args.num_class), args.evaluate,
                               'checkpoint (--evaluate)').to(device)
    _, test_loader = make_loaders(args, device, training=False)
    result = evaluate(memory_layout(net, args), test_loader, show_progress(args), amp=args.amp)
    print(f"{args.evaluate}: {args.net_name} on the {args.data_name} test split: "
          f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  loss {result['loss']:.4f}")
    return result


def make_step(net, optimizer, args):
    """One training step: cross-entropy, backward, SGD; returns the batch's sums for EpochStats."""
    def step(batch):
        with autocast(args):
            out = net(batch.img).out
            loss = F.cross_entropy(out.float(), batch.target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return cross_entropy_stats(out, batch.target, loss)
    return step


def build_baseline(args, device):
    """The network (random initial weights from --seed) and its training phase,
    as train_base.py runs them (bench.py times this very step)."""
    net = build_network(args.net_name, args.num_class).to(device)
    net = memory_layout(sync_batchnorm(net, args.sync_bn), args)  # torchrun: global-batch BN
    optimizer = make_sgd(net.parameters(), args)
    return net, Phase('main', args.epochs, lambda epoch: lr_at(epoch, args.epochs, args.lr),
                      optimizer, make_step(net, optimizer, args), STAT_NAMES, ['ce'])


@cli
def main(argv=None):
    args = parse_args(argv)
    if args.evaluate:
        return evaluate_checkpoint(args)
    # Every check happens before anything is written: run directory, resume file, data.
    run, resume, device = begin(args, 'train_base.py', argv)
    train_loader, test_loader = make_loaders(args, device, log=LOG.info)

    net, phase = build_baseline(args, device)
    phase.evaluate = lambda: evaluate(net, test_loader, show_progress(args), amp=args.amp)
    LOG.info(f'{args.net_name}: {sum(p.numel() for p in net.parameters()) / 1e6:.3f}M parameters, '
             f'{args.num_class} classes, on {describe_device(device)}')
    LOG.info(f'args: {vars(args)}')

    def on_fresh_start():  # the initial weights every student of this network starts from
        initial = os.path.join(run.dir, initial_weights_name(args.net_name))
        save_checkpoint(zoo_record(net, 0), initial)
        LOG.info(f'initial weights saved to {initial}')

    train_phases(run, resume, [phase], {'net': net}, train_loader, args, device,
                 on_fresh_start=on_fresh_start)


if __name__ == '__main__':
    main()
