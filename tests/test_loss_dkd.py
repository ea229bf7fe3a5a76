"""DKD against independent computations of its formula: hand-worked numbers,
float64 loops, the paper's identity KD = TCKD + (1 - p_target) NCKD, and
the mode's registry entry (defaults, the warm-up as kd_weight, the logged
terms).

With p = softmax(z / T), b = (p_y, 1 - p_y), q = softmax of the non-target
z / T:  loss = T^2 mean_i [alpha KL(b_t || b_s) + beta KL(q_t || q_s)].
"""
import math

import numpy as np
import pytest
import torch

from conftest import make_context, make_features
from dataset import Batch
from kd_losses import DKD, METHODS, ConfigError, Distiller, SoftTarget


def softmax_np(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def kl_np(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def dkd_reference(out_s, out_t, target, alpha, beta, T):
    """(alpha TCKD, beta NCKD) by explicit loops in float64."""
    s, t = out_s.detach().double().numpy(), out_t.detach().double().numpy()
    tckd = nckd = 0.0
    for i, y in enumerate(target.tolist()):
        p_s, p_t = softmax_np(s[i] / T), softmax_np(t[i] / T)
        tckd += kl_np([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]])
        others = [c for c in range(s.shape[1]) if c != y]
        nckd += kl_np(softmax_np(t[i, others] / T), softmax_np(s[i, others] / T))
    n = len(target)
    return alpha * T * T * tckd / n, beta * T * T * nckd / n


def random_case(batch=6, classes=10, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    out_s = torch.randn(batch, classes, generator=g) * scale
    out_t = torch.randn(batch, classes, generator=g) * scale
    target = torch.randint(0, classes, (batch,), generator=g)
    return out_s, out_t, target


# ----------------------------------------------------------------------------- the loss

def test_hand_case_target_term_only():
    # T = 1, target 0. Teacher logits (0, 0, 0): p_t = (1/3, 1/3, 1/3), b_t = (1/3, 2/3),
    # q_t = (1/2, 1/2). Student (ln 2, 0, 0): p_s = (1/2, 1/4, 1/4), b_s = (1/2, 1/2),
    # q_s = (1/2, 1/2): NCKD = 0, TCKD = 1/3 ln(2/3) + 2/3 ln(4/3).
    out_t = torch.zeros(1, 3)
    out_s = torch.tensor([[math.log(2.0), 0.0, 0.0]])
    target = torch.tensor([0])
    parts = DKD(1.0, 1.0, 1.0).terms(out_s, out_t, target)
    assert parts['tckd'].item() == pytest.approx(math.log(2 / 3) / 3 + 2 * math.log(4 / 3) / 3, rel=1e-6)
    assert parts['nckd'].item() == pytest.approx(0.0, abs=1e-7)


def test_hand_case_non_target_term_only():
    # T = 1, target 0, teacher (0, 0, 0) as above. Student (0, ln 3, 0): p_s = (1/5, 3/5, 1/5),
    # b_s = (1/5, 4/5), q_s = (3/4, 1/4).
    out_t = torch.zeros(1, 3)
    out_s = torch.tensor([[0.0, math.log(3.0), 0.0]])
    target = torch.tensor([0])
    tckd = math.log((1 / 3) / (1 / 5)) / 3 + 2 / 3 * math.log((2 / 3) / (4 / 5))
    nckd = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    parts = DKD(2.0, 8.0, 1.0).terms(out_s, out_t, target)
    assert parts['tckd'].item() == pytest.approx(2 * tckd, rel=1e-5)
    assert parts['nckd'].item() == pytest.approx(8 * nckd, rel=1e-5)
    # T = 2 scales logits by 1/2 and the KLs by T^2 = 4: recomputed by the reference
    want = dkd_reference(out_s, out_t, target, 2.0, 8.0, 2.0)
    parts = DKD(2.0, 8.0, 2.0).terms(out_s, out_t, target)
    assert (parts['tckd'].item(), parts['nckd'].item()) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize('alpha, beta, T', [(1.0, 8.0, 4.0), (0.5, 2.0, 1.0), (1.0, 1.0, 2.5)])
@pytest.mark.parametrize('batch, classes', [(1, 2), (7, 10), (3, 100)])
def test_matches_reference(alpha, beta, T, batch, classes):
    out_s, out_t, target = random_case(batch, classes, seed=batch * classes)
    want_t, want_n = dkd_reference(out_s, out_t, target, alpha, beta, T)
    loss = DKD(alpha, beta, T)
    parts = loss.terms(out_s, out_t, target)
    # float32 against float64: each KL sums differences of logs good to ~1e-7 each, times T^2
    assert parts['tckd'].item() == pytest.approx(want_t, rel=1e-4, abs=1e-6)
    assert parts['nckd'].item() == pytest.approx(want_n, rel=1e-4, abs=1e-6)
    total = loss(out_s, out_t, target)
    assert total.dim() == 0 and torch.equal(total, parts['tckd'] + parts['nckd'])


def test_decomposition_identity_of_the_paper():
    # KD = TCKD + (1 - p_t,target) NCKD per sample (the paper's Eq. 4), at any T
    out_s, out_t, target = random_case(5, 10, seed=3)
    for T in (1.0, 4.0):
        for i in range(5):
            s, t, y = out_s[i:i + 1], out_t[i:i + 1], target[i:i + 1]
            p_y = torch.softmax(t / T, dim=1)[0, y].item()
            dkd = DKD(1.0, 1.0 - p_y, T)(s, t, y).item()
            assert dkd == pytest.approx(SoftTarget(T)(s, t).item(), rel=1e-5)


def test_class_order_does_not_matter():
    out_s, out_t, target = random_case(4, 7, seed=5)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    inverse = torch.argsort(perm)
    loss = DKD(1.0, 8.0, 4.0)
    assert loss(out_s[:, perm], out_t[:, perm], inverse[target]).item() == pytest.approx(
        loss(out_s, out_t, target).item(), rel=1e-6)


def test_identical_logits_give_zero():
    out_s, _, target = random_case(4, 10, seed=2)
    assert DKD(1.0, 8.0, 4.0)(out_s, out_s, target).item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_matches_the_formula_differentiated_in_float64():
    out_s, out_t, target = random_case(5, 10, seed=7)
    T, alpha, beta = 4.0, 1.0, 8.0
    x = out_s.clone().requires_grad_(True)
    DKD(alpha, beta, T)(x, out_t, target).backward()
    # the reference: the loss written with masks and plain probabilities, in float64
    ref = out_s.double().clone().requires_grad_(True)
    mask = torch.nn.functional.one_hot(target, 10).bool()
    p_s, p_t = torch.softmax(ref / T, 1), torch.softmax(out_t.double() / T, 1)
    b_s = torch.stack([p_s[mask], 1 - p_s[mask]], 1)
    b_t = torch.stack([p_t[mask], 1 - p_t[mask]], 1)
    q_s = torch.softmax((ref / T).masked_fill(mask, float('-inf')), 1)[~mask].view(5, 9)
    q_t = torch.softmax((out_t.double() / T).masked_fill(mask, float('-inf')), 1)[~mask].view(5, 9)
    loss = T * T * (alpha * (b_t * (b_t / b_s).log()).sum() + beta * (q_t * (q_t / q_s).log()).sum()) / 5
    loss.backward()
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=1e-4, atol=1e-7)


def test_a_certain_student_stays_finite():
    # p_target = 1 in float32: the official log(1 - p) would be -inf; log space is not
    out_t = torch.tensor([[2.0, 0.5, -1.0]])
    out_s = torch.tensor([[200.0, 0.0, 0.0]], requires_grad=True)
    loss = DKD(1.0, 8.0, 1.0)(out_s, out_t, torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(out_s.grad).all()
    # 1 - p_s,target = 2 e^-200: the TCKD is dominated by (1 - p_t) log((1 - p_t) / (2 e^-200))
    p_t = torch.softmax(out_t.double(), 1)[0]
    want = p_t[0] * math.log(p_t[0]) + (1 - p_t[0]) * (math.log(1 - p_t[0]) - math.log(2) + 200)
    assert DKD(1.0, 0.0, 1.0)(out_s, out_t, torch.tensor([0])).item() == pytest.approx(want.item(), rel=1e-5)


def test_float32_under_bf16_autocast():
    out_s, out_t, target = random_case(4, 10, seed=9)
    plain = DKD(1.0, 8.0, 4.0)(out_s, out_t, target)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mixed = DKD(1.0, 8.0, 4.0)(out_s.bfloat16(), out_t.bfloat16(), target)
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)
    assert mixed.item() == pytest.approx(plain.item(), rel=0.05)


# ----------------------------------------------------------------------------- registry

def test_registry_defaults_are_the_official_cifar100_configuration():
    method = METHODS['dkd']
    for data in ('cifar10', 'cifar100'):
        a = make_context('dkd', data_name=data, num_class=100).args
        assert (a.lambda_kd, a.dkd_alpha, a.dkd_beta, a.T, a.dkd_warmup, a.ce_weight,
                a.logit_stand) == (1.0, 1.0, 8.0, 4.0, 20, 1.0, False)
    assert method.flags['dkd_warmup'].type is int and method.flags['logit_stand'].type is bool
    assert method.flags['T'] == METHODS['st'].flags['T']


def test_warm_up_is_the_kd_weight_not_inside_the_loss():
    distiller = METHODS['dkd'].build(make_context('dkd'))
    weights = [distiller.kd_weight(e, 200) for e in (1, 2, 10, 19, 20, 21, 200)]
    assert weights == pytest.approx([0.05, 0.1, 0.5, 0.95, 1.0, 1.0, 1.0])
    assert METHODS['dkd'].build(make_context('dkd', {'dkd_warmup': 0})).kd_weight(1, 200) == 1.0
    assert METHODS['dkd'].build(make_context('dkd', {'dkd_warmup': 4})).kd_weight(2, 200) == 0.5
    with pytest.raises(ConfigError, match='dkd_warmup'):
        METHODS['dkd'].build(make_context('dkd', {'dkd_warmup': -1}))
    with pytest.raises(ConfigError, match='dkd_beta'):
        METHODS['dkd'].build(make_context('dkd', {'dkd_beta': -1.0}))


def test_distiller_returns_the_weighted_terms_and_detaches_the_teacher():
    ctx = make_context('dkd', {'dkd_alpha': 2.0, 'dkd_beta': 3.0, 'T': 2.0})
    distiller = METHODS['dkd'].build(ctx)
    assert isinstance(distiller, Distiller) and distiller.loss_terms == ('tckd', 'nckd')
    assert list(distiller.learnable_parameters()) == [] and not distiller.teacher_grad
    s, s_leaves = make_features(batch=5, seed=0, requires_grad=True)
    t, t_leaves = make_features(batch=5, seed=1, requires_grad=True)
    target = torch.tensor([0, 3, 9, 3, 1])
    parts = distiller(s, t, Batch(None, target, None))
    assert list(parts) == ['tckd', 'nckd']
    want = dkd_reference(s.out, t.out, target, 2.0, 3.0, 2.0)
    assert (parts['tckd'].item(), parts['nckd'].item()) == pytest.approx(want, rel=1e-5)
    sum(parts.values()).backward()
    assert s_leaves['out'].grad.abs().sum() > 0 and t_leaves['out'].grad is None
    assert s_leaves['feat'].grad is None
