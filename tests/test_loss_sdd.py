"""SDD (sdd_kd, sdd_dkd): the multi-scale pooling by hand, the whole loss
against a float64 numpy computation of the official formula (regions pooled
by explicit slices, each through the classifier, KD or DKD per region,
complementary regions weighted), the one-scale case equal to plain KD / DKD,
the pairs it refuses, and a train_kd run that resumes bitwise."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import train_kd
from conftest import (assert_same_run, distill_argv, make_context, metrics_rows,
                      stop_after_first_epoch_then_resume)
from kd_losses import DKD, METHODS, SDD, ConfigError, SoftTarget, region_pool
from kd_losses.sdd import region_logits


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

class Net(nn.Module):
    """What SDD reads of a network: its classifier."""

    def __init__(self, channels, num_class=10):
        super().__init__()
        self.head = nn.Linear(channels, num_class)


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
    from test_methods_across_pairs import context
    for student in ('MobileNetV2', 'ShuffleV2'):  # their head reads an extra conv
        with pytest.raises(ConfigError, match=r"student's classifier reads \d+ features.*student rb"):
            METHODS[mode].build(context(mode, 'resnet32x4', student))
    ctx = make_context(mode, student=Net(64), teacher=Net(64))
    ctx.student_shapes = {**ctx.student_shapes, 'rb3': (64, 6, 6)}  # 6 does not split in 4
    with pytest.raises(ConfigError, match=r'cannot be split into 4x4 regions .*\(64, 6, 6\)'):
        METHODS[mode].build(ctx)
    ctx.args.sdd_scales = '1,2'  # but in 2x2 it does
    METHODS[mode].build(ctx)
    with pytest.raises(ConfigError, match='numbers of classes'):
        METHODS[mode].build(make_context(mode, student=Net(64), teacher=Net(64, 7)))


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
])
def test_the_official_per_pair_settings_hold_under_protocol_crd_only(mode, pair, expected):
    crd = METHODS[mode].resolve('cifar100', 'crd', *pair)
    seed = METHODS[mode].resolve('cifar100', 'seed', *pair)
    for name, value in expected.items():
        assert crd[name].value == value
        assert seed[name].value == {'sdd_scales': '1,2,4', 'dkd_beta': 8.0}[name]
        if value != seed[name].value:  # a per-pair value: the log cites its source
            assert 'SDD-CVPR2024' in crd[name].where
