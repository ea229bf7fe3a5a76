"""WTTM against independent computations: hand-worked numbers, float64
loops, the official formula (softmax ** gamma) and its special case
gamma = 1 (plain KL at T = 1), and the registry entry.

p_t = softmax(z_t), p_s = softmax(z_s); U = sum p_t^gamma; q = p_t^gamma / U;
loss = mean_i U_i KL(q_i || p_s,i).
"""
import math

import numpy as np
import pytest
import torch

from conftest import make_context, make_features
from kd_losses import METHODS, WTTM, ConfigError, SoftTarget


def softmax_np(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def wttm_reference(out_s, out_t, gamma):
    s, t = out_s.detach().double().numpy(), out_t.detach().double().numpy()
    total = 0.0
    for i in range(len(s)):
        powered = softmax_np(t[i]) ** gamma
        u = powered.sum()
        q, p_s = powered / u, softmax_np(s[i])
        total += u * sum(a * math.log(a / b) for a, b in zip(q, p_s))
    return total / len(s)


def random_case(batch=6, classes=10, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes, generator=g) * scale, torch.randn(batch, classes, generator=g) * scale


def test_hand_case():
    # Teacher (ln 4, 0): p_t = (4/5, 1/5). gamma = 1/2: p_t^gamma = (2, 1)/sqrt(5),
    # U = 3/sqrt(5), q = (2/3, 1/3). A student (ln 2, 0) has p_s = q: loss 0. A student
    # (0, 0): KL(q || (1/2, 1/2)) = 2/3 ln(4/3) + 1/3 ln(2/3), times U.
    out_t = torch.tensor([[math.log(4.0), 0.0]])
    assert WTTM(0.5)(torch.tensor([[math.log(2.0), 0.0]]), out_t).item() == pytest.approx(0.0, abs=1e-7)
    kl = 2 / 3 * math.log(4 / 3) + 1 / 3 * math.log(2 / 3)
    assert WTTM(0.5)(torch.zeros(1, 2), out_t).item() == pytest.approx(3 / math.sqrt(5) * kl, rel=1e-6)


def test_gamma_one_is_kl_at_temperature_one():
    out_s, out_t = random_case(5, 10, seed=1)
    assert WTTM(1.0)(out_s, out_t).item() == pytest.approx(SoftTarget(1.0)(out_s, out_t).item(), rel=1e-5)


@pytest.mark.parametrize('gamma', [0.1, 0.2, 0.5])
@pytest.mark.parametrize('batch, classes', [(1, 2), (7, 10), (3, 100)])
def test_matches_reference_and_the_official_formula(gamma, batch, classes):
    out_s, out_t = random_case(batch, classes, seed=batch * 7 + classes)
    got = WTTM(gamma)(out_s, out_t)
    assert got.dim() == 0 and got.item() == pytest.approx(wttm_reference(out_s, out_t, gamma), rel=1e-5)
    # the official code's direct form: softmax ** gamma, normalised
    p_t = torch.softmax(out_t, 1) ** gamma
    norm = p_t.sum(1)
    kl = torch.nn.functional.kl_div(torch.log_softmax(out_s, 1), p_t / norm[:, None], reduction='none').sum(1)
    assert got.item() == pytest.approx((norm * kl).mean().item(), rel=1e-5)


def test_weight_grows_with_a_smoother_teacher():
    # U is 1 for a one-hot teacher and C^(1 - gamma) for a uniform one
    sharp = torch.tensor([[50.0, 0.0, 0.0, 0.0]])
    flat = torch.zeros(1, 4)
    student = torch.tensor([[1.0, 2.0, 0.0, -1.0]])
    kl_sharp = -math.log(torch.softmax(student, 1)[0, 0].item())
    assert WTTM(0.5)(student, sharp).item() == pytest.approx(kl_sharp, rel=1e-5)
    kl_flat = sum(0.25 * math.log(0.25 / p) for p in torch.softmax(student, 1)[0].tolist())
    assert WTTM(0.5)(student, flat).item() == pytest.approx(4 ** 0.5 * kl_flat, rel=1e-5)


def test_extreme_teacher_logits_stay_finite():
    out_t = torch.tensor([[400.0, 0.0, -400.0]])
    out_s = torch.tensor([[0.0, 1.0, 2.0]], requires_grad=True)
    loss = WTTM(0.2)(out_s, out_t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(out_s.grad).all()


def test_gradient_matches_the_formula_differentiated_in_float64():
    out_s, out_t = random_case(5, 10, seed=2)
    x = out_s.clone().requires_grad_(True)
    WTTM(0.2)(x, out_t).backward()
    ref = out_s.double().clone().requires_grad_(True)
    p_t = torch.softmax(out_t.double(), 1) ** 0.2
    u = p_t.sum(1, keepdim=True)
    q = p_t / u
    (u[:, 0] * (q * (q.log() - torch.log_softmax(ref, 1))).sum(1)).mean().backward()
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=1e-4, atol=1e-7)


def test_float32_under_bf16_autocast():
    out_s, out_t = random_case(4, 10, seed=3)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mixed = WTTM(0.2)(out_s.bfloat16(), out_t.bfloat16())
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)


def test_registry_and_distiller():
    for data in ('cifar10', 'cifar100'):
        a = make_context('wttm', data_name=data, num_class=100).args
        assert (a.lambda_kd, a.wttm_gamma, a.ce_weight) == (4.0, 0.2, 1.0)
    with pytest.raises(ConfigError, match='wttm_gamma'):
        METHODS['wttm'].build(make_context('wttm', {'wttm_gamma': 0.0}))
    distiller = METHODS['wttm'].build(make_context('wttm', {'wttm_gamma': 0.3}))
    assert list(distiller.learnable_parameters()) == [] and distiller.loss_terms == ()
    s, s_leaves = make_features(batch=5, seed=0, requires_grad=True)
    t, t_leaves = make_features(batch=5, seed=1, requires_grad=True)
    loss = distiller(s, t, None)
    assert loss.item() == pytest.approx(wttm_reference(s.out, t.out, 0.3), rel=1e-5)
    loss.backward()
    assert s_leaves['out'].grad.abs().sum() > 0 and t_leaves['out'].grad is None
