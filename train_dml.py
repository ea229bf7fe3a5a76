"""Deep mutual learning of two networks, trained together from scratch.

Zhang, Xiang, Hospedales, Lu: "Deep Mutual Learning", CVPR 2018,
https://arxiv.org/abs/1706.00384. As in the seed, the update is synchronous:
one forward of each network per batch, each network's loss
CE + lambda_kd * KL(other || self) with the other's output detached, and
both networks stepped together. One SGD optimiser holds the two networks as
separate parameter groups: SGD updates each parameter on its own, so this is
exactly two optimisers stepped together, in one fused update.

    python train_dml.py --data_name cifar10 --net1_name resnet110 --net2_name resnet20 \\
        --net1_init ./results/base/base-c10-r110/initial_r110.pth.tar \\
        --net2_init ./results/base/base-c10-r20/initial_r20.pth.tar --save_root ./results/dml --note dml-c10-r110-r20
"""

import torch
import torch.nn.functional as F

from capture import grads_of
from checkpoints import load_network_weights
from dataset import make_loaders
from distributed import sync_batchnorm
from errors import ArgumentParser, cli
from flags import (HelpFormatter, add_common_args, finalize_common_args, flags_given, non_negative,
                   schedule_lines, schedule_sources)
from kd_losses import DML
from network import NETWORKS, build_network
from utils import (EpochStats, Evaluator, LOG, Phase, autocast, begin, describe_device,
                   main_schedule, make_sgd, memory_layout, show_progress, topk_correct,
                   train_phases)

NETS = ('net1', 'net2')


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_common_args(parser)
    g = parser.add_argument_group('the two networks')
    g.add_argument('--net1_name', required=True, choices=sorted(NETWORKS))
    g.add_argument('--net2_name', required=True, choices=sorted(NETWORKS))
    g.add_argument('--net1_init', required=True,
                   help="net1's initial weights (a baseline's initial_rNN.pth.tar), or 'random'")
    g.add_argument('--net2_init', required=True,
                   help="net2's initial weights, or 'random': a fresh initialisation from --seed "
                        "(two nets of one architecture need different starts, or they stay equal)")
    g.add_argument('--lambda_kd', type=non_negative(float), default=1.0,
                   help='weight of each network\'s KL term (the seed\'s)')
    return parser


def parse_args(argv=None):
    parser = build_parser()
    return finalize_common_args(parser, parser.parse_args(argv))


STAT_NAMES = ['net1_ce', 'net1_kd', 'net2_ce', 'net2_kd', 'net1_correct1', 'net1_correct5',
              'net2_correct1', 'net2_correct5', 'n']


def make_step(net1, net2, optimizer, args, stats=None):
    """One synchronous DML step; adds the batch's sums (named by STAT_NAMES)
    to `stats` and returns them."""
    mutual = DML()
    params = optimizer.params

    def step(batch):
        with autocast(args):
            out1, out2 = net1(batch.img).out.float(), net2(batch.img).out.float()
            ce1 = F.cross_entropy(out1, batch.target)
            ce2 = F.cross_entropy(out2, batch.target)
            kd1 = mutual(out1, out2.detach())  # net1 learns from net2's current prediction
            kd2 = mutual(out2, out1.detach())  # and net2 from net1's: the graphs stay separate
            loss = ce1 + ce2 + args.lambda_kd * (kd1 + kd2)
        optimizer.update(grads_of(loss, params))
        b = batch.target.shape[0]
        losses = torch.stack([ce1, kd1, ce2, kd2]).detach() * b
        sums = torch.cat([losses, topk_correct(out1.detach(), batch.target),
                          topk_correct(out2.detach(), batch.target), out1.new_full((1,), b)])
        if stats is not None:
            stats.add(sums)
        return sums
    step.optimizer = optimizer  # whoever runs the step can reach its learning rate
    return step


def build_mutual(args, device):
    """The two networks (from their --netN_init files, or random) and their
    training phase, as train_dml.py runs them (bench.py times this step)."""
    nets = {}
    for k in NETS:
        net, init = build_network(getattr(args, f'{k}_name'), args.num_class), getattr(args, f'{k}_init')
        if init != 'random':
            load_network_weights(net, init, f'{k} initialisation (--{k}_init)')
        nets[k] = memory_layout(sync_batchnorm(net.to(device), args.sync_bn), args)
    net1, net2 = nets['net1'], nets['net2']
    optimizer = make_sgd([{'params': net1.parameters()}, {'params': net2.parameters()}], args)

    def begin_epoch(epoch):
        net1.train()
        net2.train()

    stats = EpochStats(STAT_NAMES, STAT_NAMES[:4], device)
    return nets, Phase('main', args.epochs, main_schedule(args), optimizer,
                       make_step(net1, net2, optimizer, args, stats), stats, begin_epoch=begin_epoch)


@cli
def main(argv=None):
    args = parse_args(argv)
    run, resume, device = begin(args, 'train_dml.py', argv)
    given = flags_given(build_parser(), argv)
    for line in schedule_lines(args, schedule_sources(args, given)):
        LOG.info(line)  # log.txt opens with the schedule, and where each value came from
    LOG.info(f"  lambda_kd = {args.lambda_kd} ({'command line' if 'lambda_kd' in given else 'seed default'})")
    nets, phase = build_mutual(args, device)
    net1, net2 = nets['net1'], nets['net2']
    if all(torch.equal(a, b) for a, b in zip(net1.state_dict().values(), net2.state_dict().values())) \
            and len(net1.state_dict()) == len(net2.state_dict()):
        LOG.info('warning: net1 and net2 start from identical weights; on the same batches they stay '
                 'identical and the KL terms stay 0 (use --net2_init random)')
    train_loader, test_loader = make_loaders(args, device, log=LOG.info)
    evaluators = {k: Evaluator(net, test_loader, args.amp, args.compile, show_progress(args), f'test {k}')
                  for k, net in nets.items()}
    def evaluate_both():
        return {f'{k}_{m}': v for k, evaluator in evaluators.items() for m, v in evaluator().items()}
    evaluate_both.runners = {name: r for e in evaluators.values() for name, r in e.runners.items()}
    phase.evaluate = evaluate_both  # its runners: how the test steps ran, for the metrics rows
    LOG.info(f'DML: net1 {args.net1_name} from {args.net1_init}, net2 {args.net2_name} from '
             f'{args.net2_init}, lambda_kd {args.lambda_kd}, on {describe_device(device)}')
    train_phases(run, resume, [phase], nets, train_loader, args, device)


if __name__ == '__main__':
    main()
