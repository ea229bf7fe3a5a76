"""SDD (sdd_kd, sdd_dkd): the multi-scale pooling by hand, the whole loss
against a float64 numpy computation of the official formula (regions pooled
by explicit slices, each through the classifier, KD or DKD per region,
complementary regions weighted), the one-scale case equal to plain KD / DKD,
the head map of MobileNetV2 and ShuffleV2 (their extra conv's output, as the
forward computed it, BN statistics untouched) and their region logits
against the map hooked in the forward, the pairs it refuses, and a train_kd
run that resumes bitwise."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train_kd
from conftest import (SHAPES, assert_same_run, bn_state, distill_argv, head_bn, hook_head_maps,
                      make_context, metrics_rows, stop_after_first_epoch_then_resume)
from dataset import Batch
from distributed import GlobalBatchNorm2d
from kd_losses import DKD, METHODS, SDD, ConfigError, SoftTarget, region_pool
from kd_losses.sdd import region_logits
from network import NETWORKS, ZooNetwork, build_network
from networks.base import untracked_batch_stats


# ----------------------------------------------------------------------------- the pooling by hand

def test_region_pool_by_hand():
    fm = torch.arange(16.0).view(1, 1, 4, 4)  # rows 0..3, 4..7, 8..11, 12..15
    pooled = region_pool(fm, (1, 2, 4))[0, 0]
    assert pooled.shape == (21,)
    assert pooled[0].item() == 7.5                                  # the whole map
    assert pooled[1:5].tolist() == [2.5, 4.5, 10.5, 12.5]           # quarters, row by row
    assert pooled[5:].tolist() == [float(v) for v in range(16)]     # the 4x4 grid is the map
    # an 8x8 map at scales 1, 2: quarters of 16 values each; two channels kept apart
    fm = torch.zeros(1, 2, 8, 8)
    fm[0, 0, :4, 4:] = 4.0   # top-right quarter of channel 0
    fm[0, 1, 4:, :4] = 8.0   # bottom-left quarter of channel 1
    pooled = region_pool(fm, (1, 2))[0]
    assert pooled.tolist() == [[1.0, 0.0, 4.0, 0.0, 0.0], [2.0, 0.0, 0.0, 8.0, 0.0]]


def test_region_pool_of_a_2x2_map_repeats_its_pixels_as_the_official_spp():
    # the official SPP pools any map to 4x4 first: MobileNetV2's 2x2 map has
    # each pixel repeated 2x2, so its 16 regions are each pixel 4 times
    fm = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    pooled = region_pool(fm, (1, 2, 4))[0, 0].tolist()
    assert pooled[0] == 2.5
    assert pooled[1:5] == [1.0, 2.0, 3.0, 4.0]
    assert pooled[5:] == [1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 3.0, 3.0, 4.0, 4.0]
    assert region_pool(fm, (1, 2))[0, 0].tolist() == [2.5, 1.0, 2.0, 3.0, 4.0]


def test_region_pool_of_a_map_that_4_does_not_divide_is_the_official_adaptive_one():
    # 6x6 -> 4x4 adaptive bins overlap: rows/columns [0,2), [1,3), [3,5), [4,6);
    # the coarser scales are means of that grid, not of the map
    fm = torch.arange(36.0).view(1, 1, 6, 6) ** 2
    bins = [(0, 2), (1, 3), (3, 5), (4, 6)]
    grid = np.array([[fm[0, 0, r0:r1, c0:c1].double().mean().item() for c0, c1 in bins]
                     for r0, r1 in bins])
    quarters = [grid[r:r + 2, c:c + 2].mean() for r in (0, 2) for c in (0, 2)]
    expected = [grid.mean(), *quarters, *grid.reshape(-1)]
    np.testing.assert_allclose(region_pool(fm, (1, 2, 4))[0, 0].double().numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(region_pool(fm, (1, 2))[0, 0].double().numpy(), expected[:5], rtol=1e-6)
    assert grid.mean() != pytest.approx(fm.double().mean().item())  # the case tells them apart


def test_region_weights_by_hand():
    # the teacher's predictions for 2 samples (target 0) over 3 regions, region 0 global
    out_t = torch.tensor([[[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]],    # global right: wrong region -> 2
                          [[0.0, 5.0], [5.0, 0.0], [0.0, 5.0]]])   # global wrong: right region -> 2
    w = SDD(T=4.0, complementary=2.0).region_weights(out_t, torch.tensor([0, 0]))
    assert w.tolist() == [[1.0, 2.0, 1.0], [1.0, 2.0, 1.0]]
    w = SDD(T=4.0, complementary=3.5).region_weights(out_t, torch.tensor([1, 1]))
    assert w.tolist() == [[1.0, 3.5, 1.0], [1.0, 3.5, 1.0]]


# ----------------------------------------------------------------------------- the formula in float64

def np_softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference(fm_s, w_s, b_s, fm_t, w_t, b_t, target, T, scales, complementary, dkd=None):
    """The official sdd_kd_loss / multi_dkd in float64, one (sample, region) at a time."""
    fm_s, fm_t = fm_s.double().numpy(), fm_t.double().numpy()
    w_s, b_s, w_t, b_t = (x.double().numpy() for x in (w_s, b_s, w_t, b_t))
    batch, _, h, w = fm_s.shape

    def logits(fm, weight, bias, i):
        out = []
        for s in scales:
            for r in range(s):
                for c in range(s):
                    hs, ws = fm.shape[2] // s, fm.shape[3] // s
                    v = fm[i, :, r * hs:(r + 1) * hs, c * ws:(c + 1) * ws].mean(axis=(1, 2))
                    out.append(weight @ v + bias)
        return out

    total, pairs = 0.0, 0
    for i in range(batch):
        zs, zt = logits(fm_s, w_s, b_s, i), logits(fm_t, w_t, b_t, i)
        y = int(target[i])
        global_right = np.argmax(zt[0]) == y
        for z_s, z_t in zip(zs, zt):
            p_s, p_t = np_softmax(z_s / T), np_softmax(z_t / T)
            if dkd is None:
                loss = T ** 2 * np.sum(p_t * (np.log(p_t) - np.log(p_s)))
            else:
                alpha, beta = dkd
                bs, bt = np.array([p_s[y], 1 - p_s[y]]), np.array([p_t[y], 1 - p_t[y]])
                rest = [k for k in range(len(z_s)) if k != y]
                q_s, q_t = np_softmax(z_s[rest] / T), np_softmax(z_t[rest] / T)
                tckd, nckd = np.sum(bt * np.log(bt / bs)), np.sum(q_t * np.log(q_t / q_s))
                loss = T ** 2 * (alpha * tckd + beta * nckd)
            weight = 1.0 if (np.argmax(z_t) == y) == global_right else complementary
            total += weight * loss
            pairs += 1
    return total / pairs


@pytest.mark.parametrize('scales, size, base', [((1, 2, 4), 8, 'kd'), ((1, 2), 4, 'kd'),
                                                 ((1, 2, 4), 4, 'dkd'), ((1, 2), 8, 'dkd')])
def test_loss_matches_reference(scales, size, base):
    g = torch.Generator().manual_seed(size + len(scales))
    k = 6
    fm_s, fm_t = torch.randn(5, 4, size, size, generator=g), torch.randn(5, 7, size, size, generator=g)
    w_s, w_t = torch.randn(k, 4, generator=g), torch.randn(k, 7, generator=g) * 3
    b_s, b_t = torch.randn(k, generator=g), torch.randn(k, generator=g)
    target = torch.randint(0, k, (5,), generator=g)
    target[:2] = region_logits(fm_t, w_t, b_t, (1,))[:2, 0].argmax(1)  # globally right for two
    dkd = DKD(alpha=1.0, beta=8.0, T=3.0) if base == 'dkd' else None
    loss = SDD(T=3.0, complementary=2.0, dkd=dkd)(region_logits(fm_s, w_s, b_s, scales),
                                                   region_logits(fm_t, w_t, b_t, scales), target)
    expected = reference(fm_s, w_s, b_s, fm_t, w_t, b_t, target, 3.0, scales, 2.0,
                         (1.0, 8.0) if dkd is not None else None)
    assert sum(loss.values()).item() == pytest.approx(expected, rel=1e-5)
    # the case must exercise the weighting: some region disagrees with its global prediction
    right = region_logits(fm_t, w_t, b_t, scales).argmax(2) == target[:, None]
    assert (right[:2] != right[:2, :1]).any() and (right[2:] != right[2:, :1]).any()


def test_one_scale_is_plain_kd_and_dkd():
    g = torch.Generator().manual_seed(3)
    out_s, out_t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    target = torch.randint(0, 10, (6,), generator=g)
    one = (out_s[:, None], out_t[:, None])  # one region per sample
    kd = SDD(T=4.0, complementary=2.0)(*one, target)['kd']
    assert kd.item() == pytest.approx(SoftTarget(4.0)(out_s, out_t).item(), rel=1e-6)
    dkd = DKD(1.0, 8.0, 4.0)
    terms = SDD(T=4.0, complementary=2.0, dkd=dkd)(*one, target)
    for name, value in dkd.terms(out_s, out_t, target).items():
        assert terms[name].item() == pytest.approx(value.item(), rel=1e-6)


# ----------------------------------------------------------------------------- the distiller

class Net(ZooNetwork):
    """What SDD reads of a network: its classifier, and its head map, here
    the base class's (the last stage's map, resnet20's shapes)."""

    def __init__(self, channels, num_class=10):
        super().__init__()
        self.head = nn.Linear(channels, num_class)

    @property
    def feature_shapes(self):
        return {**SHAPES, 'out': (self.head.out_features,)}


@pytest.mark.parametrize('mode', ['sdd_kd', 'sdd_dkd'])
def test_distiller_uses_each_networks_classifier_and_trains_the_students(mode):
    from conftest import make_features
    student, teacher = Net(64), Net(64)
    distiller = METHODS[mode].build(make_context(mode, student=student, teacher=teacher))
    s, _ = make_features(batch=4, seed=1, requires_grad=True)
    t, _ = make_features(batch=4, seed=2)
    target = torch.arange(4)
    out = distiller(s, t, type('B', (), {'target': target})())
    loss = out if torch.is_tensor(out) else sum(out.values())
    fm_s, fm_t = s.rb3[1].detach(), t.rb3[1]
    a = METHODS[mode].defaults
    dkd = (a['dkd_alpha'], a['dkd_beta']) if mode == 'sdd_dkd' else None
    expected = reference(fm_s, student.head.weight.detach(), student.head.bias.detach(), fm_t,
                         teacher.head.weight.detach(), teacher.head.bias.detach(), target,
                         a['T'], (1, 2, 4), 2.0, dkd)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert student.head.weight.grad is not None and student.head.weight.grad.abs().sum() > 0
    assert teacher.head.weight.grad is None  # the teacher's head stays frozen


@pytest.mark.parametrize('mode', ['sdd_kd', 'sdd_dkd'])
def test_pairs_it_cannot_apply_to_are_refused_with_the_shapes(mode):
    # a classifier that does not read the head map's channels
    with pytest.raises(ConfigError, match=r"student's classifier reads 32 features, not its head "
                                          r'map pooled \(student head map \(64, 8, 8\), teacher'):
        METHODS[mode].build(make_context(mode, student=Net(32), teacher=Net(64)))
    with pytest.raises(ConfigError, match='numbers of classes'):
        METHODS[mode].build(make_context(mode, student=Net(64), teacher=Net(64, 7)))


def test_every_networks_classifier_reads_its_head_map():
    for name in NETWORKS:
        with torch.device('meta'):  # shapes only
            net = build_network(name, 10)
        shape = net.head_map_shape
        assert net.head.in_features == shape[0], name
        last = [k for k in net.feature_shapes if k.startswith('rb')][-1]
        assert shape[1:] == tuple(net.feature_shapes[last][1:]), name
        assert (shape == tuple(net.feature_shapes[last])) == (name not in ('MobileNetV2', 'ShuffleV2'))


# ----------------------------------------------------------------------------- MobileNetV2, ShuffleV2

@pytest.mark.parametrize('name', ['MobileNetV2', 'ShuffleV2'])
@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
def test_head_map_is_the_forwards_map_and_counts_nothing(name, train):
    torch.manual_seed(0)
    net = build_network(name, 10).train(train)
    maps = hook_head_maps(net)
    with torch.no_grad():
        feats = net(torch.randn(3, 3, 32, 32))
        before = bn_state(net)
        assert before[2].item() == int(train)  # the forward counted its batch (train mode)
        head_map = net.head_map(feats.stages[-1][1])
    assert torch.equal(head_map, maps[0])  # same input, same statistics: bitwise
    assert tuple(head_map.shape[1:]) == net.head_map_shape
    assert torch.allclose(head_map.mean(dim=(2, 3)), feats.feat, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(before, bn_state(net)))  # nothing counted again
    assert head_bn(net).track_running_stats  # restored


@pytest.mark.parametrize('cls', [nn.BatchNorm2d, nn.SyncBatchNorm, GlobalBatchNorm2d])
def test_untracked_batch_stats_normalises_by_the_batch_and_updates_nothing(cls):
    bn = cls(3).train()
    nn.init.normal_(bn.running_mean)
    x = torch.randn(4, 3, 2, 2) * 3 + 1
    before = [b.clone() for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    y = untracked_batch_stats(bn, bn, x)
    assert all(torch.equal(a, b) for a, b in zip(before, (bn.running_mean, bn.running_var,
                                                            bn.num_batches_tracked)))
    xd = x.double()
    mean, var = xd.mean(dim=(0, 2, 3), keepdim=True), xd.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    assert torch.allclose(y.double(), (xd - mean) / torch.sqrt(var + bn.eps), atol=1e-5)
    assert bn.track_running_stats
    bn.eval()  # in eval mode the running statistics, as ever
    y = untracked_batch_stats(bn, bn, x)
    expected = (xd - bn.running_mean.double()[:, None, None]) / (1.0 + bn.eps) ** 0.5  # running_var is 1
    assert torch.allclose(y.double(), expected, atol=1e-5)


def np_region_logits(fm, head):
    """[B, N, K] in float64: the map made a 4x4 grid (a 2x2 map's pixels
    repeated), the means of its 1x1, 2x2 and 4x4 blocks row by row, each
    through the classifier."""
    fm = fm.detach().double().numpy()
    r = 4 // fm.shape[2]
    grid = fm.repeat(r, axis=2).repeat(r, axis=3)
    b, c = grid.shape[:2]
    regions = [grid.reshape(b, c, s, 4 // s, s, 4 // s).mean(axis=(3, 5)).reshape(b, c, s * s)
               for s in (1, 2, 4)]
    pooled = np.concatenate(regions, axis=2).transpose(0, 2, 1)
    return pooled @ head.weight.detach().double().numpy().T + head.bias.detach().double().numpy()


@pytest.mark.parametrize('student_name, teacher_name', [('MobileNetV2', 'ShuffleV2'),
                                                          ('ShuffleV2', 'MobileNetV2')])
@pytest.mark.parametrize('mode', ['sdd_kd', 'sdd_dkd'])
def test_region_logits_of_mobilenetv2_and_shufflev2_are_their_extra_convs_map(mode, student_name,
                                                                             teacher_name):
    torch.manual_seed(1)
    student = build_network(student_name, 10).train()
    teacher = build_network(teacher_name, 10).eval().requires_grad_(False)
    s_maps, t_maps = hook_head_maps(student), hook_head_maps(teacher)
    ctx = make_context(mode, student=student, teacher=teacher)
    ctx.student_shapes, ctx.teacher_shapes = student.feature_shapes, teacher.feature_shapes
    distiller = METHODS[mode].build(ctx)
    region_logits_seen = []
    distiller.sdd.register_forward_hook(lambda m, inputs, out: region_logits_seen.append(inputs[:2]))
    img = torch.randn(2, 3, 32, 32)
    s = student(img)
    with torch.no_grad():
        t = teacher(img)
    before = bn_state(student)
    out = distiller(s, t, Batch(img, torch.tensor([1, 2]), torch.tensor([0, 1])))
    assert all(torch.equal(a, b) for a, b in zip(before, bn_state(student)))
    out_s, out_t = region_logits_seen[0]
    assert out_s.shape == out_t.shape == (2, 21, 10)
    np.testing.assert_allclose(out_s.detach().double().numpy(),
                               np_region_logits(s_maps[0], student.head), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out_t.double().numpy(), np_region_logits(t_maps[0], teacher.head),
                               rtol=1e-4, atol=1e-5)
    # region 0 is the global one: the network's own logits
    assert torch.allclose(out_s[:, 0], s.out, rtol=1e-4, atol=1e-5)
    assert torch.allclose(out_t[:, 0], t.out, rtol=1e-4, atol=1e-5)
    # the loss alone trains the student's extra conv, and through it the last stage
    loss = out if torch.is_tensor(out) else sum(out.values())
    loss.backward()
    conv = student.conv2[0] if student_name == 'MobileNetV2' else student.conv2
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert student.head.weight.grad.abs().sum() > 0
    last_stage = student.blocks[-1] if student_name == 'MobileNetV2' else student.layer3
    assert sum(p.grad.abs().sum() for p in last_stage.parameters() if p.grad is not None) > 0


def test_official_defaults():
    kd = METHODS['sdd_kd'].defaults_for('cifar100', 'crd')
    dkd = METHODS['sdd_dkd'].defaults_for('cifar100', 'crd')
    assert (kd['ce_weight'], kd['lambda_kd'], kd['T'], kd['sdd_scales'], kd['sdd_complementary']) == \
        (0.1, 0.9, 4.0, '1,2,4', 2.0)
    assert (dkd['ce_weight'], dkd['lambda_kd'], dkd['dkd_alpha'], dkd['dkd_beta'], dkd['T'],
            dkd['dkd_warmup'], dkd['sdd_scales']) == (1.0, 1.0, 1.0, 8.0, 4.0, 20, '1,2,4')


# ----------------------------------------------------------------------------- train_kd

def kd_argv(base_run, root, note):
    return distill_argv(base_run, root, note, 'sdd_dkd', 2, 50, ['--seed', '3', '--dkd_warmup', '2',
                                                                 '--sdd_scales', '1,2'])


def test_train_kd_runs_and_resumes(base_run, tmp_path, monkeypatch):
    train_kd.main(kd_argv(base_run, tmp_path, 'straight'))
    log = (tmp_path / 'straight' / 'log.txt').read_text()
    assert 'sdd_scales = 1,2 (command line)' in log and 'sdd_complementary = 2.0 (default' in log
    rows = metrics_rows(tmp_path / 'straight')
    assert all(float(r['train_kd_nckd']) > 0 for r in rows)
    assert [float(r['kd_weight']) for r in rows] == [0.5, 1.0]  # the warm-up
    stop_after_first_epoch_then_resume(monkeypatch, kd_argv(base_run, tmp_path, 'resumed'))
    assert_same_run(tmp_path / 'straight', tmp_path / 'resumed')


@pytest.mark.parametrize('mode, pair, expected', [
    # SDD-CVPR2024: teacher_resnet32x4.sh / teacher_vgg.sh run --M [1,2] for these pairs
    ('sdd_kd', ('resnet32x4', 'resnet8x4'), {'sdd_scales': '1,2'}),
    ('sdd_kd', ('vgg13', 'vgg8'), {'sdd_scales': '1,2'}),
    # SDD-CVPR2024 configs/cifar100/sdd_dkd: DKD.BETA of the pair's config
    ('sdd_dkd', ('vgg13', 'vgg8'), {'sdd_scales': '1,2', 'dkd_beta': 6.0}),
    ('sdd_dkd', ('resnet56', 'resnet20'), {'sdd_scales': '1,2,4', 'dkd_beta': 2.0}),
    ('sdd_dkd', ('wrn_40_2', 'wrn_16_2'), {'sdd_scales': '1,2,4', 'dkd_beta': 6.0}),
    ('sdd_dkd', ('resnet32x4', 'resnet8x4'), {'sdd_scales': '1,2,4', 'dkd_beta': 8.0}),
    # MobileNetV2 / ShuffleV2 students: --M [1,2,4]; vgg13_mv2.yaml and wrn40_2_mv2.yaml
    # set beta 6, res32x4_mv2.yaml (the one teacher_unpair.sh runs) none
    ('sdd_kd', ('resnet32x4', 'ShuffleV2'), {'sdd_scales': '1,2,4'}),
    ('sdd_dkd', ('vgg13', 'MobileNetV2'), {'sdd_scales': '1,2,4', 'dkd_beta': 6.0}),
    ('sdd_dkd', ('wrn_40_2', 'MobileNetV2'), {'sdd_scales': '1,2,4', 'dkd_beta': 6.0}),
    ('sdd_dkd', ('resnet32x4', 'MobileNetV2'), {'sdd_scales': '1,2,4', 'dkd_beta': 8.0}),
    ('sdd_dkd', ('resnet32x4', 'ShuffleV2'), {'sdd_scales': '1,2,4', 'dkd_beta': 8.0}),
])
def test_the_official_per_pair_settings_hold_under_protocol_crd_only(mode, pair, expected):
    crd = METHODS[mode].resolve('cifar100', 'crd', *pair)
    seed = METHODS[mode].resolve('cifar100', 'seed', *pair)
    for name, value in expected.items():
        assert crd[name].value == value
        assert seed[name].value == {'sdd_scales': '1,2,4', 'dkd_beta': 8.0}[name]
        if value != seed[name].value:  # a per-pair value: the log cites its source
            assert 'SDD-CVPR2024' in crd[name].where
