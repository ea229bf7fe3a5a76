"""DIST against independent computations: hand-worked correlations of +-1,
float64 loops over rows (inter) and columns (intra), the global batch the
intra term needs under torchrun, and the registry entry.

Y = softmax(Z / tau); rho = Pearson correlation (denominator + 1e-8);
loss = tau^2 (beta (1 - mean_i rho(Y_s[i], Y_t[i])) + gamma (1 - mean_c rho(Y_s[:, c], Y_t[:, c]))).
"""
import math

import numpy as np
import pytest
import torch

import kd_losses.dist as dist_module
from conftest import make_context, make_features
from kd_losses import DIST, METHODS, ConfigError, Distiller


def pearson_np(a, b, eps=1e-8):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (math.sqrt((a * a).sum()) * math.sqrt((b * b).sum()) + eps))


def softmax_rows_np(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def dist_reference(out_s, out_t, beta, gamma, tau):
    """(weighted inter, weighted intra) by loops over rows and columns in float64."""
    y_s = softmax_rows_np(out_s.detach().double().numpy() / tau)
    y_t = softmax_rows_np(out_t.detach().double().numpy() / tau)
    rows = [pearson_np(y_s[i], y_t[i]) for i in range(y_s.shape[0])]
    cols = [pearson_np(y_s[:, c], y_t[:, c]) for c in range(y_s.shape[1])]
    return (tau * tau * beta * (1 - sum(rows) / len(rows)),
            tau * tau * gamma * (1 - sum(cols) / len(cols)))


def random_case(batch=6, classes=10, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes, generator=g) * scale, torch.randn(batch, classes, generator=g) * scale


# ----------------------------------------------------------------------------- the loss

def test_hand_case_correlations_of_minus_one():
    # Two classes: every centred row or column of two entries is (d, -d), so each
    # correlation is the sign of the product of the two d's. Student rows prefer
    # class 0 then 1; teacher rows the other way: every row and column correlates -1.
    out_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    out_t = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    for tau in (1.0, 2.0):
        parts = DIST(1.0, 2.0, tau).terms(out_s, out_t)
        assert parts['inter'].item() == pytest.approx(tau ** 2 * 1.0 * 2, rel=1e-6)   # 1 - (-1)
        assert parts['intra'].item() == pytest.approx(tau ** 2 * 2.0 * 2, rel=1e-6)
    # the same direction everywhere: correlations +1, loss 0
    out_t = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    assert DIST(1.0, 1.0, 1.0)(out_s, out_t).item() == pytest.approx(0.0, abs=1e-6)


def test_hand_case_inter_zero_intra_not():
    # Each student row is its teacher row scaled up: same ordering, and with 2 classes
    # the row correlations are +1 (inter 0). Columns: student class-0 probabilities
    # (s(3), s(-3)) fall, the teacher's (s(1), s(0.5)) fall too: +1 as well. A third
    # sample that flips only the teacher's column trend: teacher row 3 (0, 4).
    out_s = torch.tensor([[3.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    out_t = torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.0, 4.0]])
    want = dist_reference(out_s, out_t, 1.0, 1.0, 1.0)
    parts = DIST(1.0, 1.0, 1.0).terms(out_s, out_t)
    assert parts['inter'].item() == pytest.approx(0.0, abs=1e-6) and want[0] == pytest.approx(0.0, abs=1e-7)
    assert parts['intra'].item() == pytest.approx(want[1], rel=1e-5) and want[1] > 0.01


@pytest.mark.parametrize('beta, gamma, tau', [(1.0, 1.0, 4.0), (2.0, 0.5, 1.0)])
@pytest.mark.parametrize('batch, classes', [(2, 3), (8, 10), (5, 100)])
def test_matches_reference(beta, gamma, tau, batch, classes):
    out_s, out_t = random_case(batch, classes, seed=batch + classes)
    want = dist_reference(out_s, out_t, beta, gamma, tau)
    loss = DIST(beta, gamma, tau)
    parts = loss.terms(out_s, out_t)
    assert (parts['inter'].item(), parts['intra'].item()) == pytest.approx(want, rel=1e-4, abs=1e-6)
    total = loss(out_s, out_t)
    assert total.dim() == 0 and torch.equal(total, parts['inter'] + parts['intra'])


def test_intra_relates_the_samples_of_the_batch():
    # inter is a per-sample mean (halves of a batch average to the whole);
    # intra is not: it correlates each class over the batch's samples
    out_s, out_t = random_case(8, 10, seed=4)
    loss = DIST(1.0, 1.0, 4.0)
    whole, first, second = loss.terms(out_s, out_t), loss.terms(out_s[:4], out_t[:4]), loss.terms(out_s[4:], out_t[4:])
    assert whole['inter'].item() == pytest.approx((first['inter'] + second['inter']).item() / 2, rel=1e-5)
    assert whole['intra'].item() != pytest.approx((first['intra'] + second['intra']).item() / 2, rel=1e-2)


def test_invariances():
    out_s, out_t = random_case(6, 10, seed=5)
    loss = DIST(1.0, 1.0, 4.0)
    # identical outputs: 0 up to the 1e-8 in the denominators (and float32 rounding)
    assert loss(out_t, out_t).item() == pytest.approx(sum(dist_reference(out_t, out_t, 1.0, 1.0, 4.0)),
                                                      abs=5e-5)
    assert abs(loss(out_t, out_t).item()) < 1e-3
    # a per-row shift of the logits changes no softmax
    shift = torch.arange(6.0)[:, None] * 2
    assert loss(out_s + shift, out_t).item() == pytest.approx(loss(out_s, out_t).item(), rel=1e-5)


def test_gradient_matches_the_formula_differentiated_in_float64():
    out_s, out_t = random_case(6, 10, seed=6)
    x = out_s.clone().requires_grad_(True)
    DIST(1.0, 2.0, 4.0)(x, out_t).backward()
    ref = out_s.double().clone().requires_grad_(True)
    y_s, y_t = torch.softmax(ref / 4, 1), torch.softmax(out_t.double() / 4, 1)

    def rho(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)
    loss = 16 * ((1 - rho(y_s, y_t).mean()) + 2 * (1 - rho(y_s.t(), y_t.t()).mean()))
    loss.backward()
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=1e-3, atol=1e-8)


def test_float32_under_bf16_autocast():
    out_s, out_t = random_case(6, 10, seed=8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mixed = DIST(1.0, 1.0, 4.0)(out_s.bfloat16(), out_t.bfloat16())
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)


# ----------------------------------------------------------------------------- registry

def test_registry_defaults_are_the_official_cifar100_configuration():
    for data in ('cifar10', 'cifar100'):
        a = make_context('dist', data_name=data, num_class=100).args
        assert (a.lambda_kd, a.dist_beta, a.dist_gamma, a.T, a.ce_weight) == (2.0, 1.0, 1.0, 4.0, 1.0)
    assert METHODS['dist'].flags['T'] == METHODS['st'].flags['T']
    with pytest.raises(ConfigError, match='dist_gamma'):
        METHODS['dist'].build(make_context('dist', {'dist_gamma': -1.0}))


def test_distiller_returns_the_weighted_terms_and_detaches_the_teacher():
    distiller = METHODS['dist'].build(make_context('dist', {'dist_beta': 2.0, 'dist_gamma': 3.0, 'T': 2.0}))
    assert isinstance(distiller, Distiller) and distiller.loss_terms == ('inter', 'intra')
    assert list(distiller.learnable_parameters()) == []
    s, s_leaves = make_features(batch=6, seed=0, requires_grad=True)
    t, t_leaves = make_features(batch=6, seed=1, requires_grad=True)
    parts = distiller(s, t, None)
    assert list(parts) == ['inter', 'intra']
    want = dist_reference(s.out, t.out, 2.0, 3.0, 2.0)
    assert (parts['inter'].item(), parts['intra'].item()) == pytest.approx(want, rel=1e-4)
    sum(parts.values()).backward()
    assert s_leaves['out'].grad.abs().sum() > 0 and t_leaves['out'].grad is None


def test_distiller_uses_the_global_batch(monkeypatch):
    # Under torchrun gather_batch returns every process's rows; stand in another
    # process's rows here: both terms must be those of the gathered batch, and the
    # student's gather must be the differentiable one.
    s, s_leaves = make_features(batch=4, seed=0, requires_grad=True)
    t, _ = make_features(batch=4, seed=1)
    other_s, other_t = random_case(4, 10, seed=11)
    calls = []

    def gather(x, differentiable=False):
        calls.append(differentiable)
        other = other_s if differentiable else other_t
        return torch.cat([x, other])
    monkeypatch.setattr(dist_module, 'gather_batch', gather)
    parts = METHODS['dist'].build(make_context('dist'))(s, t, None)
    assert sorted(calls) == [False, True]
    want = dist_reference(torch.cat([s.out, other_s]), torch.cat([t.out, other_t]), 1.0, 1.0, 4.0)
    assert (parts['inter'].item(), parts['intra'].item()) == pytest.approx(want, rel=1e-4)
    sum(parts.values()).backward()
    assert s_leaves['out'].grad.shape == (4, 10) and s_leaves['out'].grad.abs().sum() > 0
