"""Deep mutual learning: the synchronous step against an independent
computation, and a run where both networks train."""
import argparse
import re
import copy
import csv

import torch
import torch.nn.functional as F

import train_dml
from dataset import Batch
from network import resnet20
from checkpoints import load_network_weights
from utils import make_sgd

ARGS = argparse.Namespace(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, lambda_kd=0.7,
                          amp=False, device='cpu')


def reference_grads(net, other_out, x, y, lam):
    """Gradient of CE + lam * KL(softmax(other) || softmax(own)), the other's
    prediction a constant, written out from the formula."""
    out = net(x).out
    p_other = torch.softmax(other_out, dim=1)
    kl = (p_other * (torch.log(p_other) - torch.log_softmax(out, dim=1))).sum(dim=1).mean()
    loss = F.cross_entropy(out, y) + lam * kl
    return torch.autograd.grad(loss, list(net.parameters()))


def test_one_step_updates_each_net_from_its_own_loss_with_the_other_detached():
    torch.manual_seed(0)
    net1, net2 = resnet20(10).train(), resnet20(10).train()
    ref1, ref2 = copy.deepcopy(net1), copy.deepcopy(net2)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    optimizer = make_sgd([{'params': net1.parameters()}, {'params': net2.parameters()}], ARGS)
    step = train_dml.make_step(net1, net2, optimizer, ARGS)
    sums = step(Batch(x, y, torch.arange(8)))
    with torch.no_grad():
        out1, out2 = copy.deepcopy(ref1)(x).out, copy.deepcopy(ref2)(x).out
    g1 = reference_grads(ref1, out2, x, y, ARGS.lambda_kd)
    g2 = reference_grads(ref2, out1, x, y, ARGS.lambda_kd)
    m, lr, wd = ARGS.momentum, ARGS.lr, ARGS.weight_decay
    for net, ref, grads in ((net1, ref1, g1), (net2, ref2, g2)):
        for p, p0, g in zip(net.parameters(), ref.parameters(), grads):
            # first Nesterov SGD step: p - lr * (1 + m) * (g + wd * p)
            expected = p0 - lr * (1 + m) * (g + wd * p0)
            assert torch.allclose(p, expected, atol=1e-6), 'a net moved by more than its own loss'
    # the logged sums: CE and KL of each net, times the batch size
    p1, p2 = torch.softmax(out1, 1), torch.softmax(out2, 1)
    kl1 = (p2 * (p2.log() - p1.log())).sum(1).mean()
    kl2 = (p1 * (p1.log() - p2.log())).sum(1).mean()
    expected = torch.stack([F.cross_entropy(out1, y), kl1, F.cross_entropy(out2, y), kl2]) * 8
    assert torch.allclose(sums[:4], expected, atol=1e-4)
    assert sums[-1] == 8


def test_make_sgd_keeps_generator_parameter_groups():
    net = resnet20(10)
    optimizer = make_sgd([{'params': net.parameters()}, {'params': iter([torch.zeros(1, requires_grad=True)])}], ARGS)
    assert [len(g['params']) for g in optimizer.param_groups] == [len(list(net.parameters())), 1]


def test_both_nets_train_and_are_logged_and_saved(base_run, tmp_path):
    train_dml.main(['--data_name', 'cifar10', '--img_root', base_run['img_root'], '--save_root',
                    str(tmp_path), '--note', 'dml', '--net1_name', 'resnet20', '--net2_name', 'resnet20',
                    '--net1_init', base_run['initial'], '--net2_init', 'random', '--epochs', '2',
                    '--batch_size', '25', '--device', 'cpu', '--no_download'])
    run = tmp_path / 'dml'
    ckpt = torch.load(run / 'checkpoint.pth.tar', weights_only=True)
    init = torch.load(base_run['initial'], weights_only=True)['net']
    moved1 = (ckpt['net1']['module.conv1.weight'] - init['module.conv1.weight']).abs().max()
    assert moved1 > 1e-3
    assert not torch.equal(ckpt['net1']['module.conv1.weight'], ckpt['net2']['module.conv1.weight'])
    with open(run / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for net in ('net1', 'net2'):
        assert float(rows[0][f'train_{net}_kd']) > 0  # the nets disagree, so the KL terms act
        assert rows[-1][f'test_{net}_top1'] != ''
        best = run / f'model_best_{net}.pth.tar'
        load_network_weights(resnet20(10), str(best))  # a plain zoo-format checkpoint
    log = (run / 'log.txt').read_text()
    for net in ('net1', 'net2'):
        assert re.search(rf'train .*{net} ce \d+\.\d+ kd \d+\.\d+', log), f'{net} terms not logged'


def test_identical_starts_are_warned_about(base_run, tmp_path, capsys):
    train_dml.main(['--data_name', 'cifar10', '--img_root', base_run['img_root'], '--save_root',
                    str(tmp_path), '--note', 'same', '--net1_name', 'resnet20', '--net2_name', 'resnet20',
                    '--net1_init', base_run['initial'], '--net2_init', base_run['initial'], '--epochs', '1',
                    '--batch_size', '50', '--device', 'cpu', '--no_download'])
    assert 'start from identical weights' in capsys.readouterr().out
