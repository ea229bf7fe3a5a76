"""Which global-batch BatchNorm a layer gets under torchrun: nn.SyncBatchNorm on
CUDA (one collective each way per layer, fused kernels), GlobalBatchNorm2d
elsewhere (gloo on CPU); the swap keeps every parameter, buffer and key. The
numbers of two processes against one are checked in test_distributed.py."""
import pytest
import torch
import torch.nn as nn

import distributed
from distributed import GlobalBatchNorm2d, global_batchnorm_class, sync_batchnorm
from network import build_network


@pytest.mark.parametrize('device, expected', [('cuda', nn.SyncBatchNorm), ('cuda:1', nn.SyncBatchNorm),
                                              (torch.device('cuda', 0), nn.SyncBatchNorm),
                                              ('cpu', GlobalBatchNorm2d)])
def test_the_batchnorm_is_chosen_by_the_device(device, expected):
    assert global_batchnorm_class(device) is expected


def trained_like(seed=0):
    """A network whose BatchNorm buffers and affine parameters are not their defaults."""
    torch.manual_seed(seed)
    net = build_network('resnet8', 10)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean):
                t.data.normal_()
            m.running_var.data.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    return net.eval()


def swapped(monkeypatch, device_type):
    """sync_batchnorm of a two-process job on a network whose layers report `device_type`."""
    real = distributed.global_batchnorm_class
    monkeypatch.setattr(distributed.WORLD, 'size', 2)
    monkeypatch.setattr(distributed, 'global_batchnorm_class', lambda device: real(device_type))
    net = trained_like()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = net(x).out
    net = sync_batchnorm(net)
    monkeypatch.setattr(distributed.WORLD, 'size', 1)  # evaluation: no collective is issued
    with torch.no_grad():
        out = net.eval()(x).out
    return net, before, expected, out


@pytest.mark.parametrize('device_type, cls', [('cuda', nn.SyncBatchNorm), ('cpu', GlobalBatchNorm2d)])
def test_every_batchnorm_is_swapped_keeping_its_state(monkeypatch, device_type, cls):
    net, before, expected, out = swapped(monkeypatch, device_type)
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is cls for m in norms)
    after = net.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert torch.equal(out, expected)

