"""The networks of the CRD CIFAR-100 benchmark (RepDistiller / mdistiller):
the features contract, parameter counts, the benchmark's checkpoints, and
telling networks apart by their state dicts."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from network import NETWORKS, Features, Features4, build_network
from networks.checkpoint_layouts import adapt_state_dict, identify_network
from networks.resnetv2 import BottleneckResNet
from networks.shufflenetv1 import ShuffleNetV1
from networks.shufflenetv2 import ShuffleNetV2

FOUR_STAGE = {'vgg8', 'vgg11', 'vgg13', 'vgg16', 'vgg19', 'MobileNetV2', 'ResNet50'}
BENCHMARK = ['resnet8', 'resnet14', 'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110',
             'resnet8x4', 'resnet32x4', 'wrn_16_1', 'wrn_16_2', 'wrn_40_1', 'wrn_40_2',
             'vgg8', 'vgg11', 'vgg13', 'vgg16', 'vgg19', 'MobileNetV2', 'ShuffleV1', 'ShuffleV2',
             'ResNet50']
# Features that end without a ReLU: pre and post are one tensor.
LINEAR = {'wrn_16_1': {'stem'}, 'wrn_16_2': {'stem'}, 'wrn_40_1': {'stem'}, 'wrn_40_2': {'stem'},
          'MobileNetV2': {'rb1', 'rb2', 'rb3', 'rb4'}}
# Millions of parameters at 100 classes, as the benchmark's papers report them.
PARAMS_M = {'resnet8x4': 1.23, 'resnet32x4': 7.43, 'wrn_40_2': 2.26, 'wrn_16_2': 0.70,
            'vgg13': 9.46, 'vgg8': 3.97, 'MobileNetV2': 0.81, 'ShuffleV1': 0.95,
            'ShuffleV2': 1.36, 'ResNet50': 23.71, 'resnet56': 0.86}


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """Many small convs: one thread is several times faster than two on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise_bn(net):
    """Non-trivial BN statistics and affine terms, so eval outputs depend on every buffer."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return net


def test_every_benchmark_network_is_registered():
    assert set(BENCHMARK) == set(NETWORKS)
    with pytest.raises(ValueError, match='resnet20, resnet110, .*ShuffleV2.*ResNet50'):
        build_network('mobile_half', 100)


@pytest.mark.parametrize('name', BENCHMARK)
def test_features_contract(name):
    torch.manual_seed(0)
    net = build_network(name, 100)
    assert net.name == name and net.num_class == 100
    assert isinstance(net.head, nn.Linear) and net.head.out_features == 100
    kind = Features4 if name in FOUR_STAGE else Features
    stages = [f'rb{k}' for k in range(1, 5 if kind is Features4 else 4)]
    shapes = net.feature_shapes
    assert list(shapes) == ['stem', *stages, 'feat', 'out']
    assert net.get_channel_num() == [s[0] for s in shapes.values()]
    x = torch.randn(2, 3, 32, 32)
    for mode in (True, False):
        net.train(mode)
        with torch.no_grad():
            feats = net(x)
        assert type(feats) is kind and feats._fields == ('stem', *stages, 'feat', 'out')
        assert feats.stages == tuple(getattr(feats, k) for k in stages)
        for key in ['stem', *stages]:
            pre, post = getattr(feats, key)
            assert tuple(pre.shape) == (2, *shapes[key]) == tuple(post.shape), key
            if key in LINEAR.get(name, ()):
                assert post is pre
            else:
                assert torch.equal(post, F.relu(pre)), key
                assert (pre < 0).any(), key  # a real pre-activation
        assert tuple(feats.feat.shape) == (2, *shapes['feat'])
        assert tuple(feats.out.shape) == (2, *shapes['out'])
        assert torch.allclose(feats.out, net.head(feats.feat), atol=1e-6)
    with torch.no_grad():
        one = net.eval()(x[:1])
    scale = feats.out.abs().max().item()  # an untrained deep net's eval logits can be huge
    assert torch.allclose(one.out, feats.out[:1], rtol=1e-4, atol=1e-5 * scale)


def test_features_tuples():
    t = lambda: (torch.zeros(1), torch.ones(1))  # noqa: E731
    f = Features(t(), t(), t(), t(), torch.zeros(1), torch.ones(1))
    stem, rb1, rb2, rb3, feat, out = f  # the seed's unpacking
    assert f.stages == (rb1, rb2, rb3) and len(f) == 6
    f4 = Features4(t(), t(), t(), t(), t(), torch.zeros(1), torch.ones(1))
    assert f4.stages == (f4.rb1, f4.rb2, f4.rb3, f4.rb4) and len(f4) == 7


@pytest.mark.parametrize('name', sorted(PARAMS_M))
def test_parameter_counts(name):
    with torch.device('meta'):
        net = build_network(name, 100)
    count = sum(p.numel() for p in net.parameters())
    assert round(count / 1e6, 2) == PARAMS_M[name], count


def test_cifar_resnet_stages():
    """resnet8x4/32x4 change channels at stride 1 in their first block; the
    seed's resnets keep that block shortcut-free."""
    keys = set(build_network('resnet8x4', 100).state_dict())
    assert {'res1.0.ds.0.weight', 'res2.0.ds.0.weight', 'res3.0.ds.1.running_var'} <= keys
    net = build_network('resnet8x4', 100)
    assert net.res1[0].conv1.stride == (1, 1) and net.res1[0].ds[0].stride == (1, 1)
    assert net.res2[0].conv1.stride == (2, 2)
    assert not any(k.startswith('res1.0.ds') for k in build_network('resnet56', 10).state_dict())
    assert len(build_network('resnet8', 10).res3) == 1 and len(build_network('resnet32x4', 10).res3) == 5


def to_benchmark(key):
    """Our CIFAR ResNet names -> RepDistiller's (models/resnet.py)."""
    return re.sub(r'^res(\d)\.', r'layer\1.', key).replace('.ds.', '.downsample.')


# A few names exactly as the benchmark's checkpoints hold them.
BENCHMARK_KEYS = {
    'resnet32x4': ['conv1.weight', 'bn1.running_mean', 'layer1.0.conv1.weight',
                   'layer1.0.downsample.0.weight', 'layer1.0.downsample.1.running_var',
                   'layer3.4.bn2.weight', 'fc.weight', 'fc.bias'],
    'resnet8x4': ['layer1.0.downsample.0.weight', 'layer3.0.conv2.weight', 'fc.weight'],
    'resnet56': ['layer2.0.downsample.0.weight', 'layer3.8.conv2.weight', 'fc.bias'],
    'wrn_40_2': ['block1.layer.0.bn1.weight', 'block1.layer.0.convShortcut.weight',
                 'block3.layer.5.conv2.weight', 'bn1.running_var', 'fc.weight'],
    'vgg13': ['block0.0.weight', 'block0.0.bias', 'block0.1.running_mean', 'block0.3.weight',
              'block4.4.weight', 'classifier.weight'],
    'ResNet50': ['layer1.0.shortcut.0.weight', 'layer4.2.conv3.weight', 'linear.weight'],
    'MobileNetV2': ['conv1.0.weight', 'blocks.6.0.conv.7.running_var', 'conv2.1.weight',
                    'classifier.0.weight'],
    'ShuffleV1': ['layer1.0.conv3.weight', 'layer3.3.bn3.bias', 'linear.weight'],
    'ShuffleV2': ['layer1.0.conv5.weight', 'layer1.3.bn3.weight', 'conv2.weight', 'linear.bias'],
}


@pytest.mark.parametrize('name', ['resnet32x4', 'resnet8x4', 'resnet56', 'wrn_40_2', 'vgg13'])
def test_benchmark_checkpoint_loads(name):
    torch.manual_seed(2)
    src = randomise_bn(build_network(name, 100)).eval()
    renamer = to_benchmark if name.startswith('resnet') else (lambda k: k)
    bench = {renamer(k): v.clone() for k, v in src.state_dict().items()}
    assert set(BENCHMARK_KEYS[name]) <= set(bench)
    if name == 'resnet32x4':
        assert not any(k.startswith(('res', 'layer1.1.downsample')) or '.ds.' in k for k in bench)
    ckpt = {'model': {'module.' + k: v for k, v in bench.items()}}  # as RepDistiller saves it
    dst = build_network(name, 100)
    dst.load_state_dict(adapt_state_dict(dst, ckpt['model']), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(dst.eval()(x).out, src(x).out)
    # Our own layout passes through unchanged.
    ours = src.state_dict()
    same = adapt_state_dict(dst, {'module.' + k: v for k, v in ours.items()})
    assert list(same) == list(ours) and all(same[k] is ours[k] for k in ours)


@pytest.mark.parametrize('name', sorted(BENCHMARK_KEYS))
def test_parameter_names_are_the_benchmarks(name):
    with torch.device('meta'):
        net = build_network(name, 100)
    keys = set(net.state_dict())
    if name.startswith('resnet'):
        keys = {to_benchmark(k) for k in keys}
    assert set(BENCHMARK_KEYS[name]) <= keys


IDENTIFY = [('resnet20', 10), ('resnet110', 100), ('resnet8', 100), ('resnet8x4', 100),
            ('resnet32x4', 10), ('resnet56', 100), ('wrn_16_1', 100), ('wrn_16_2', 7),
            ('wrn_40_2', 100), ('vgg8', 10), ('vgg13', 100), ('vgg19', 100),
            ('MobileNetV2', 100), ('ShuffleV1', 100), ('ShuffleV2', 10), ('ResNet50', 100)]


@pytest.mark.parametrize('name, num_class', IDENTIFY)
def test_identify_network(name, num_class):
    with torch.device('meta'):  # shapes are all it reads
        state = build_network(name, num_class).state_dict()
    assert identify_network(state) == (name, num_class)
    assert identify_network({'module.' + k: v for k, v in state.items()}) == (name, num_class)
    if name.startswith('resnet'):
        bench = {'module.' + to_benchmark(k): v for k, v in state.items()}
        assert any(k.startswith('module.layer1.') for k in bench)
        assert identify_network(bench) == (name, num_class)
    # Without the BN counters (older PyTorch) it is still recognised.
    assert identify_network({k: v for k, v in state.items()
                             if not k.endswith('num_batches_tracked')}) == (name, num_class)


def test_identify_network_rejects_junk():
    with torch.device('meta'):
        state = build_network('resnet20', 10).state_dict()
    assert identify_network({}) is None
    assert identify_network(None) is None
    assert identify_network([('fc.weight', torch.zeros(10, 64))]) is None
    assert identify_network({'weight': torch.zeros(3)}) is None
    assert identify_network({**state, 'extra.weight': torch.zeros(1)}) is None
    assert identify_network({k: v for k, v in state.items() if k != 'res3.2.conv2.weight'}) is None
    assert identify_network({**state, 'conv1.weight': torch.zeros(16, 3, 5, 5)}) is None
    assert identify_network({**state, 'fc.weight': torch.zeros(640)}) is None
    assert identify_network({**state, 'fc.bias': torch.zeros(7)}) is None  # 10 rows, 7 biases
    assert identify_network({k: 1.0 for k in state}) is None


SMALL = {  # one small configuration per family
    'resnet': lambda: build_network('resnet8x4', 10),
    'wrn': lambda: build_network('wrn_16_2', 10),
    'vgg': lambda: build_network('vgg8', 10),
    'MobileNetV2': lambda: build_network('MobileNetV2', 10),
    'ShuffleV1': lambda: ShuffleNetV1(10, blocks=(1, 2, 1)),
    'ShuffleV2': lambda: ShuffleNetV2(10, blocks=(1, 2, 1)),
    'ResNet50': lambda: BottleneckResNet((1, 1, 1, 1), 10),
}


@pytest.mark.parametrize('family', sorted(SMALL))
def test_bf16_autocast_and_channels_last(family):
    torch.manual_seed(0)
    net = randomise_bn(SMALL[family]()).eval()  # eval: batch statistics of 2 samples amplify bf16 rounding
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = net(x).out
    net = net.to(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = net(x.to(memory_format=torch.channels_last))
    assert got.out.dtype == torch.bfloat16 and tuple(got.out.shape) == (2, 10)
    assert torch.allclose(got.out.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())
    got.out.float().sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_one_graph():
    """torch.compile(fullgraph=True) traces without graph breaks (no data-
    dependent branching): the families with the least ordinary forwards (every
    family passes; tracing them all takes a minute on a CPU)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for family in ('ShuffleV2', 'wrn'):
        net = SMALL[family]()
        torch._dynamo.reset()
        got = torch.compile(net, backend='eager', fullgraph=True)(x)
        assert torch.allclose(got.out, net(x).out, atol=1e-5)


def test_either_import_order():
    code = ('import networks.wrn, networks.checkpoint_layouts, network; '
            'assert network.NETWORKS["wrn_40_2"] is networks.wrn.wrn_40_2')
    subprocess.run([sys.executable, '-c', code], check=True, cwd=Path(__file__).parents[1])
