"""PKT (cosine-similarity probabilities, KL), SP (row-normalised batch Gram
matrix, MSE) and CC (Taylor-expanded RBF correlation, MSE), each against a
direct computation with loops over sample pairs."""
import math

import numpy as np
import pytest
import torch

from conftest import make_context, make_features
from kd_losses import CC, METHODS, SP, ConfigError, Distiller, PKTCosSim


def as_np(x):
    return x.detach().double().numpy().reshape(len(x), -1)


def pkt_reference(feat_s, feat_t, eps=1e-6):
    def probabilities(f):
        n = len(f)
        unit = [row / (np.linalg.norm(row) + eps) for row in f]
        sim = np.array([[(np.dot(unit[i], unit[j]) + 1) / 2 for j in range(n)] for i in range(n)])
        return sim / sim.sum(axis=1, keepdims=True)

    p_s, p_t = probabilities(as_np(feat_s)), probabilities(as_np(feat_t))
    n = len(p_s)
    return sum(p_t[i, j] * math.log((p_t[i, j] + eps) / (p_s[i, j] + eps))
               for i in range(n) for j in range(n)) / n ** 2


def sp_reference(fm_s, fm_t):
    def gram(f):
        n = len(f)
        g = np.array([[np.dot(f[i], f[j]) for j in range(n)] for i in range(n)])
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    g_s, g_t = gram(as_np(fm_s)), gram(as_np(fm_t))
    return ((g_s - g_t) ** 2).mean()


def cc_reference(feat_s, feat_t, gamma, order):
    def correlation(f):
        n = len(f)
        unit = [row / np.linalg.norm(row) for row in f]
        corr = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                sim = np.dot(unit[i], unit[j])
                corr[i, j] = sum(math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p)
                                 * sim ** p for p in range(order + 1))
        return corr

    return ((correlation(as_np(feat_s)) - correlation(as_np(feat_t))) ** 2).mean()


def random_pair(shape_s, shape_t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape_s, generator=g), torch.randn(shape_t, generator=g)


# ----- PKT -----

def test_pkt_matches_reference():
    s, t = random_pair((7, 16), (7, 12), seed=0)
    assert PKTCosSim()(s, t).item() == pytest.approx(pkt_reference(s, t), rel=1e-4)


def test_pkt_hand_case():
    # student orthogonal: cos = I -> (I+1)/2 rows [1, .5] -> [2/3, 1/3];
    # teacher parallel: cos = 1 -> rows [.5, .5]; KL terms .5 log(.75) + .5 log(1.5) per row
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    expected = (math.log(0.75) + math.log(1.5)) / 4
    assert PKTCosSim()(s, t).item() == pytest.approx(expected, rel=1e-4)
    assert PKTCosSim()(t, t).item() == pytest.approx(0.0, abs=1e-7)
    # cosine similarities ignore each sample's scale
    scaled = s * torch.tensor([[3.0], [0.2]])
    assert PKTCosSim()(scaled, t).item() == pytest.approx(expected, rel=1e-4)


# ----- SP -----

def test_sp_matches_reference_with_different_widths():
    s, t = random_pair((5, 16, 4, 4), (5, 32, 2, 2), seed=1)
    assert SP()(s, t).item() == pytest.approx(sp_reference(s, t), rel=1e-5)


def test_sp_hand_case():
    # student G = I (rows already unit); teacher G = all ones -> rows 1/sqrt(2)
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    r = 1 / math.sqrt(2)
    assert SP()(s, t).item() == pytest.approx(((1 - r) ** 2 + r ** 2) / 2, rel=1e-6)
    assert SP()(t * 5, t).item() == pytest.approx(0.0, abs=1e-7)  # row normalisation removes scale


# ----- CC -----

@pytest.mark.parametrize('gamma, order', [(0.4, 2), (1.0, 3)])
def test_cc_matches_reference(gamma, order):
    s, t = random_pair((6, 10), (6, 10), seed=2)
    expected = cc_reference(s, t, gamma, order)
    assert CC(gamma, order)(s, t).item() == pytest.approx(expected, rel=1e-5)


def test_cc_hand_cases():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])   # S = I
    t = torch.tensor([[1.0, 0.0], [2.0, 0.0]])   # S = ones
    gamma = 0.4
    # order 0: constant correlation; order 1: off-diagonal differs by exp(-2g) 2g, on 2 of 4 entries
    assert CC(gamma, 0)(s, t).item() == 0.0
    off_diagonal = math.exp(-2 * gamma) * 2 * gamma
    assert CC(gamma, 1)(s, t).item() == pytest.approx(off_diagonal ** 2 / 2, rel=1e-6)
    assert CC(gamma, 2)(t, t).item() == 0.0


def test_cc_high_order_approaches_the_gaussian_rbf():
    # for unit vectors exp(-gamma |a-b|^2) = exp(-2 gamma) exp(2 gamma S): the series' limit
    g = torch.Generator().manual_seed(3)
    f = torch.nn.functional.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    rbf = torch.exp(-0.4 * torch.cdist(f, f) ** 2)
    assert torch.allclose(CC(0.4, 20).correlation(f), rbf, atol=1e-9)


# ----- shared checks -----

LOSSES = {'pkt': PKTCosSim(), 'sp': SP(), 'cc': CC(0.4, 2)}


@pytest.mark.parametrize('mode', ['pkt', 'sp', 'cc'])
def test_float32_result_for_low_precision_inputs(mode):
    s, t = random_pair((6, 16), (6, 16), seed=4)
    out = LOSSES[mode](s.bfloat16(), t.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_registry_defaults():
    # lambda_kd's defaults: their effect on a run is checked in tests/test_train_kd.py
    # (SEED_DEFAULTS); cc's gamma and P_order defaults (0.4, 2) are those of
    # test_distiller_matches_reference_and_detaches_the_teacher
    flags = METHODS['cc'].flags
    assert flags['gamma'].type is float and flags['P_order'].type is int


def test_cc_rejects_a_negative_order():
    with pytest.raises(ConfigError, match='P_order'):
        METHODS['cc'].build(make_context('cc', {'P_order': -1}))


def expected_kd(mode, s, t):
    if mode == 'pkt':
        return pkt_reference(s.feat, t.feat)
    if mode == 'cc':
        return cc_reference(s.feat, t.feat, 0.4, 2)
    return np.mean([sp_reference(getattr(s, k)[1], getattr(t, k)[1])
                    for k in ('rb1', 'rb2', 'rb3')])


@pytest.mark.parametrize('mode', ['pkt', 'sp', 'cc'])
def test_distiller_matches_reference_and_detaches_the_teacher(mode):
    distiller = METHODS[mode].build(make_context(mode))
    assert isinstance(distiller, Distiller)
    assert distiller.pretrain_phases(make_context(mode)) == [] and distiller.kd_weight(1, 200) == 1.0
    assert list(distiller.learnable_parameters()) == []
    s, s_leaves = make_features(batch=6, seed=0, requires_grad=True)
    t, t_leaves = make_features(batch=6, seed=1, requires_grad=True)
    loss = distiller(s, t, None)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(expected_kd(mode, s, t), rel=1e-4)
    loss.backward()
    used = ['feat'] if mode in ('pkt', 'cc') else ['rb1', 'rb2', 'rb3']
    for name in used:
        assert s_leaves[name].grad is not None and s_leaves[name].grad.abs().sum() > 0
    assert all(leaf.grad is None for leaf in t_leaves.values())


def test_sp_averages_every_stage_of_four_networks_of_any_widths():
    from network import Features4
    keys = ('stem', 'rb1', 'rb2', 'rb3', 'rb4')
    s_shapes = {'stem': (4, 8, 8), 'rb1': (4, 8, 8), 'rb2': (6, 4, 4), 'rb3': (8, 2, 2),
                'rb4': (8, 2, 2), 'feat': (8,), 'out': (10,)}
    t_shapes = {'stem': (4, 16, 16), 'rb1': (16, 16, 16), 'rb2': (32, 8, 8), 'rb3': (64, 4, 4),
                'rb4': (128, 2, 2), 'feat': (128,), 'out': (10,)}
    ctx = make_context('sp')
    ctx.student_shapes, ctx.teacher_shapes = s_shapes, t_shapes
    distiller = METHODS['sp'].build(ctx)
    assert distiller.keys == keys[1:]
    g = torch.Generator().manual_seed(11)

    def features(shapes):
        maps = [torch.relu(torch.randn(5, *shapes[k], generator=g)) for k in keys]
        return Features4(*[(m, m) for m in maps], torch.randn(5, shapes['feat'][0]), torch.randn(5, 10))

    s, t = features(s_shapes), features(t_shapes)
    expected = np.mean([sp_reference(getattr(s, k)[1], getattr(t, k)[1]) for k in keys[1:]])
    assert distiller(s, t, None).item() == pytest.approx(expected, rel=1e-4)
