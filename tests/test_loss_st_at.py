"""Soft targets (ST) and attention transfer (AT) against independent
computations of their formulas: hand-worked numbers and float64 numpy loops.

ST:  T^2 * mean over the batch of sum_c p_t,c * (log p_t,c - log p_s,c),
     p = softmax(logits / T)           (KL(teacher || student))
AT:  mean over batch and positions of (a_s - a_t)^2,
     a = map / (||map||_2 per sample + 1e-6), map = sum over channels of |f|^p
"""
import math

import numpy as np
import pytest
import torch

from conftest import make_context, make_features
from kd_losses import AT, METHODS, SoftTarget


def as_np(x):
    return x.detach().double().numpy()


# ----------------------------------------------------------------------------- references

def st_reference(out_s, out_t, T):
    """Explicit loops in float64."""
    s, t = as_np(out_s), as_np(out_t)
    total = 0.0
    for b in range(s.shape[0]):
        zs = [v / T for v in s[b]]
        zt = [v / T for v in t[b]]
        ls = math.log(sum(math.exp(v) for v in zs))
        lt = math.log(sum(math.exp(v) for v in zt))
        for c in range(s.shape[1]):
            log_ps, log_pt = zs[c] - ls, zt[c] - lt
            total += math.exp(log_pt) * (log_pt - log_ps)
    return T * T * total / s.shape[0]


def at_map_reference(fm, p):
    """[B, H*W] attention maps, each normalised by its own L2 norm (+1e-6)."""
    f = as_np(fm)
    maps = []
    for b in range(f.shape[0]):
        m = np.zeros(f.shape[2] * f.shape[3])
        for c in range(f.shape[1]):
            m += (np.abs(f[b, c]) ** p).ravel()
        maps.append(m / (np.sqrt((m ** 2).sum()) + 1e-6))
    return np.stack(maps)


def at_reference(fm_s, fm_t, p):
    a_s, a_t = at_map_reference(fm_s, p), at_map_reference(fm_t, p)
    return ((a_s - a_t) ** 2).sum() / a_s.size


# ----------------------------------------------------------------------------- ST

LN3 = math.log(3.0)


def test_st_hand_case_two_classes():
    # T = 2; teacher logits (2 ln 3, 0) -> p_t = (3/4, 1/4); student (0, 0) -> p_s = (1/2, 1/2)
    T = 2.0
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[2 * LN3, 0.0]], dtype=torch.float64)
    kl_t_s = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(p_t || p_s)
    kl_s_t = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)    # the other direction
    got = SoftTarget(T)(s, t).item()
    assert got == pytest.approx(4 * kl_t_s, rel=1e-6)      # 0.52325...
    # and not one of the likely mistakes
    assert got != pytest.approx(4 * kl_s_t, rel=1e-3)      # swapped direction: 0.57536...
    assert got != pytest.approx(2 * kl_t_s, rel=1e-3)      # times T instead of T^2
    assert got != pytest.approx(kl_t_s, rel=1e-3)          # no temperature factor


def test_st_direction_hand_case():
    # swapping student and teacher gives the other KL: the loss is not symmetric
    T = 2.0
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[2 * LN3, 0.0]], dtype=torch.float64)
    kl_s_t = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert SoftTarget(T)(t, s).item() == pytest.approx(4 * kl_s_t, rel=1e-6)


def test_st_batch_mean_not_sum_hand_case():
    # row 1 as above (KL = k1), row 2 identical predictions (KL = 0): the loss is T^2 * k1 / 2
    T = 2.0
    s = torch.tensor([[0.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([[2 * LN3, 0.0], [1.0, -1.0]], dtype=torch.float64)
    k1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert SoftTarget(T)(s, t).item() == pytest.approx(4 * k1 / 2, rel=1e-6)


def test_st_identical_logits_give_zero_and_shift_invariance():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 10, generator=g, dtype=torch.float64)
    assert SoftTarget(4.0)(t, t).item() == pytest.approx(0.0, abs=1e-10)
    # adding a constant to every logit of a row changes no softmax
    s = torch.randn(5, 10, generator=g, dtype=torch.float64)
    shifted = s + torch.arange(5, dtype=torch.float64)[:, None] * 3.0
    assert SoftTarget(4.0)(shifted, t).item() == pytest.approx(SoftTarget(4.0)(s, t).item(), rel=1e-9)


@pytest.mark.parametrize('T', [0.5, 1.0, 3.0, 4.0])
@pytest.mark.parametrize('batch, classes', [(1, 2), (7, 10), (3, 100)])
def test_st_matches_reference(T, batch, classes):
    g = torch.Generator().manual_seed(batch * 1000 + classes)
    s = torch.randn(batch, classes, generator=g) * 3
    t = torch.randn(batch, classes, generator=g) * 3
    got = SoftTarget(T)(s, t)
    assert got.dim() == 0 and got.item() >= 0
    assert got.item() == pytest.approx(st_reference(s, t, T), rel=1e-5, abs=1e-7)


def test_st_scales_with_t_squared_not_t():
    # With logits that are themselves proportional to T, the softmaxes are the same at
    # every T, so the loss is T^2 times a fixed KL: doubling T multiplies it by exactly 4.
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 10, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)
    base = SoftTarget(1.0)(s, t).item()
    for T in (2.0, 4.0, 8.0):
        assert SoftTarget(T)(s * T, t * T).item() == pytest.approx(T * T * base, rel=1e-8)


def test_st_gradient_wrt_student_logits():
    # d/ds [T^2 * KL(p_t || p_s)] averaged over B rows = T * (p_s - p_t) / B
    T, B = 3.0, 4
    g = torch.Generator().manual_seed(2)
    s = torch.randn(B, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    t = torch.randn(B, 6, generator=g, dtype=torch.float64)
    SoftTarget(T)(s, t).backward()
    sn, tn = as_np(s), as_np(t)
    expected = np.zeros_like(sn)
    for b in range(B):
        ps = np.exp(sn[b] / T) / np.exp(sn[b] / T).sum()
        pt = np.exp(tn[b] / T) / np.exp(tn[b] / T).sum()
        expected[b] = T * (ps - pt) / B
    assert np.allclose(s.grad.numpy(), expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize('T', [2.0, 4.0])
def test_st_through_the_registry_reads_logits_and_the_T_flag(T):
    distiller = METHODS['st'].build(make_context('st', {'T': T}))
    s, s_leaves = make_features(batch=6, seed=3, requires_grad=True, scale=2.0)
    t, t_leaves = make_features(batch=6, seed=4, requires_grad=True, scale=2.0)
    loss = distiller(s, t, None)
    assert loss.item() == pytest.approx(st_reference(s.out, t.out, T), rel=1e-5)
    loss.backward()
    assert s_leaves['out'].grad is not None and s_leaves['out'].grad.abs().sum() > 0
    assert all(leaf.grad is None for name, leaf in s_leaves.items() if name != 'out')
    assert all(leaf.grad is None for leaf in t_leaves.values())  # the teacher is a constant


# ----------------------------------------------------------------------------- AT

def test_at_hand_case_p2_and_p1():
    # one sample, one channel, two positions: student (3, 4), teacher (4, 3)
    s = torch.tensor([[[[3.0, 4.0]]]], dtype=torch.float64)
    t = torch.tensor([[[[4.0, 3.0]]]], dtype=torch.float64)
    # p = 2: maps (9, 16) and (16, 9), both of norm sqrt(337): ((7^2 + 7^2) / 337) / 2
    assert AT(2.0)(s, t).item() == pytest.approx(49 / 337, rel=1e-5)
    # p = 1: maps (3, 4)/5 and (4, 3)/5: ((1/5)^2 * 2) / 2
    assert AT(1.0)(s, t).item() == pytest.approx(1 / 25, rel=1e-5)


def test_at_uses_absolute_values_and_sums_channels_hand_case():
    # two channels (-1, 2) and (1, -2) at two positions, p = 2:
    # map = (1 + 1, 4 + 4) = (2, 8), normalised (2, 8)/sqrt(68)
    s = torch.tensor([[[[-1.0, 2.0]], [[1.0, -2.0]]]], dtype=torch.float64)
    # teacher: one channel (1, 0): map (1, 0)
    t = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    a = np.array([2.0, 8.0]) / math.sqrt(68.0)
    expected = ((a[0] - 1.0) ** 2 + (a[1] - 0.0) ** 2) / 2
    assert AT(2.0)(s, t).item() == pytest.approx(expected, rel=1e-5)
    # p = 1: map = (2, 4)/sqrt(20)
    a = np.array([2.0, 4.0]) / math.sqrt(20.0)
    assert AT(1.0)(s, t).item() == pytest.approx(((a[0] - 1) ** 2 + a[1] ** 2) / 2, rel=1e-5)


def test_at_normalises_each_sample_on_its_own():
    # Student = teacher with every sample scaled by its own factor: per-sample maps are
    # unchanged, so the loss is 0; normalising over the whole batch would not give 0.
    g = torch.Generator().manual_seed(5)
    t = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    s = t * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64).view(3, 1, 1, 1)
    assert AT(2.0)(s, t).item() == pytest.approx(0.0, abs=1e-10)
    # hand case, two samples of one position-pair each: student sample 2 is 10x the teacher's
    s = torch.tensor([[[[3.0, 4.0]]], [[[30.0, 40.0]]]], dtype=torch.float64)
    t = torch.tensor([[[[3.0, 4.0]]], [[[3.0, 4.0]]]], dtype=torch.float64)
    assert AT(1.0)(s, t).item() == pytest.approx(0.0, abs=1e-7)
    # each map has unit norm (up to the 1e-6): per sample, not over the batch
    maps = AT(2.0).attention_map(torch.randn(4, 3, 6, 6, generator=g))
    assert torch.allclose(maps.norm(dim=1), torch.ones(4), atol=1e-5)


def test_at_mean_over_batch_and_positions_hand_case():
    # two samples: sample 1 as in the p=1 hand case (squared error sum 2/25), sample 2
    # identical maps (0): mean over 2 samples x 2 positions = (2/25) / 4
    s = torch.tensor([[[[3.0, 4.0]]], [[[1.0, 1.0]]]], dtype=torch.float64)
    t = torch.tensor([[[[4.0, 3.0]]], [[[2.0, 2.0]]]], dtype=torch.float64)
    assert AT(1.0)(s, t).item() == pytest.approx((2 / 25) / 4, rel=1e-5)


@pytest.mark.parametrize('p', [1.0, 2.0, 3.0])
def test_at_matches_reference(p):
    g = torch.Generator().manual_seed(int(p * 10))
    s = torch.randn(4, 6, 5, 5, generator=g)
    t = torch.randn(4, 3, 5, 5, generator=g)  # channel counts may differ: maps sum them away
    got = AT(p)(s, t)
    assert got.dim() == 0
    assert got.item() == pytest.approx(at_reference(s, t, p), rel=1e-5, abs=1e-10)


def test_at_p_changes_the_result():
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    values = [AT(p)(s, t).item() for p in (1.0, 2.0, 4.0)]
    refs = [at_reference(s, t, p) for p in (1.0, 2.0, 4.0)]
    assert values == pytest.approx(refs, rel=1e-5)
    assert len({round(v, 8) for v in values}) == 3


def test_at_through_the_registry_averages_rb1_to_rb3_post_activations():
    p = 3.0
    distiller = METHODS['at'].build(make_context('at', {'p': p}))
    s, s_leaves = make_features(batch=4, seed=7, requires_grad=True)
    t, t_leaves = make_features(batch=4, seed=8, requires_grad=True)
    loss = distiller(s, t, None)
    expected = np.mean([at_reference(getattr(s, k)[1], getattr(t, k)[1], p)
                        for k in ('rb1', 'rb2', 'rb3')])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # with the default p the value differs (the flag is read)
    default = METHODS['at'].build(make_context('at'))(s, t, None).item()
    assert default != pytest.approx(loss.item(), rel=1e-3)
    loss.backward()
    for name in ('rb1', 'rb2', 'rb3'):
        assert s_leaves[name].grad is not None and s_leaves[name].grad.abs().sum() > 0
    for name in ('stem', 'feat', 'out'):
        assert s_leaves[name].grad is None
    assert all(leaf.grad is None for leaf in t_leaves.values())


# ----------------------------------------------------------------------------- AT across shapes

def block_mean(x, size):
    b, c, h, w = x.shape
    return x.reshape(b, c, size[0], h // size[0], size[1], w // size[1]).mean(axis=(3, 5))


@pytest.mark.parametrize('s_shape, t_shape', [((6, 8, 8), (3, 4, 4)), ((6, 2, 2), (3, 8, 8))])
def test_at_pools_the_larger_map_before_its_attention(s_shape, t_shape):
    """As RepDistiller: the feature map (not its attention map) is average-pooled."""
    g = torch.Generator().manual_seed(9)
    s = torch.randn(3, *s_shape, generator=g, dtype=torch.float64)
    t = torch.randn(3, *t_shape, generator=g, dtype=torch.float64)
    size = tuple(min(a, b) for a, b in zip(s_shape[1:], t_shape[1:]))
    pooled = [torch.from_numpy(block_mean(x.numpy(), size)) if x.shape[2:] != size else x
              for x in (s, t)]
    assert AT(2.0)(s, t).item() == pytest.approx(at_reference(*pooled, 2.0), rel=1e-6)


def test_at_through_the_registry_averages_every_stage_of_four():
    shapes = {'stem': (4, 8, 8), 'rb1': (4, 8, 8), 'rb2': (6, 4, 4), 'rb3': (8, 2, 2),
              'rb4': (8, 2, 2), 'feat': (8,), 'out': (10,)}
    t_shapes = {**shapes, 'rb1': (5, 16, 16), 'rb4': (3, 4, 4)}
    ctx = make_context('at')
    ctx.student_shapes, ctx.teacher_shapes = shapes, t_shapes
    distiller = METHODS['at'].build(ctx)
    assert distiller.keys == ('rb1', 'rb2', 'rb3', 'rb4')
    from network import Features4
    g = torch.Generator().manual_seed(10)

    def features(sh):
        maps = [torch.relu(torch.randn(2, *sh[k], generator=g)) for k in ('stem', 'rb1', 'rb2', 'rb3', 'rb4')]
        return Features4(*[(m, m) for m in maps], torch.randn(2, 8), torch.randn(2, 10))

    s, t = features(shapes), features(t_shapes)
    expected = []
    for k in distiller.keys:
        fs, ft = getattr(s, k)[1].double(), getattr(t, k)[1].double()
        size = tuple(min(a, b) for a, b in zip(fs.shape[2:], ft.shape[2:]))
        fs, ft = [torch.from_numpy(block_mean(x.numpy(), size)) if x.shape[2:] != size else x
                  for x in (fs, ft)]
        expected.append(at_reference(fs, ft, 2.0))
    assert distiller(s, t, None).item() == pytest.approx(np.mean(expected), rel=1e-5)
