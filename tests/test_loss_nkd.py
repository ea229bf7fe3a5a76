"""NKD against independent computations: hand-worked numbers, float64
loops, the normalisation (the non-target term ignores the target logits),
its gradient equal to that of the KL form, and the registry entry.

t = softmax(z_t), s = softmax(z_s); t^, s^ = softmax of the non-target logits / T;
loss = mean_i [ -t_y log s_y - gamma T^2 sum_{c != y} t^_c log s^_c ].
"""
import math

import numpy as np
import pytest
import torch

from conftest import make_context, make_features
from dataset import Batch
from kd_losses import METHODS, NKD, ConfigError, Distiller


def softmax_np(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def nkd_reference(out_s, out_t, target, T, gamma):
    """(target term, weighted non-target term) by loops in float64."""
    s, t = out_s.detach().double().numpy(), out_t.detach().double().numpy()
    target_term = non_target = 0.0
    for i, y in enumerate(target.tolist()):
        target_term -= softmax_np(t[i])[y] * math.log(softmax_np(s[i])[y])
        others = [c for c in range(s.shape[1]) if c != y]
        t_hat, s_hat = softmax_np(t[i, others] / T), softmax_np(s[i, others] / T)
        non_target -= sum(a * math.log(b) for a, b in zip(t_hat, s_hat))
    n = len(target)
    return target_term / n, gamma * T * T * non_target / n


def random_case(batch=6, classes=10, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    out_s = torch.randn(batch, classes, generator=g) * scale
    out_t = torch.randn(batch, classes, generator=g) * scale
    return out_s, out_t, torch.randint(0, classes, (batch,), generator=g)


def test_hand_case():
    # Three classes, target 0, all logits 0: t_y = s_y = 1/3, t^ = s^ = (1/2, 1/2).
    # target term -1/3 ln(1/3); non-target -(1/2 ln 1/2 + 1/2 ln 1/2) = ln 2, times gamma T^2
    # (the softmax of equal logits does not depend on T).
    z = torch.zeros(1, 3)
    y = torch.tensor([0])
    parts = NKD(1.0, 1.0).terms(z, z, y)
    assert parts['target'].item() == pytest.approx(math.log(3) / 3, rel=1e-6)
    assert parts['non_target'].item() == pytest.approx(math.log(2), rel=1e-6)
    parts = NKD(2.0, 1.5).terms(z, z, y)
    assert parts['non_target'].item() == pytest.approx(1.5 * 4 * math.log(2), rel=1e-6)
    # the loss is a cross-entropy: not 0 for identical outputs (the teacher's entropies)
    assert NKD(2.0, 1.5)(z, z, y).item() == pytest.approx(math.log(3) / 3 + 6 * math.log(2), rel=1e-6)


def test_hand_case_student_differs():
    # T = 1, gamma = 1, target 1. Teacher (0, ln 2, 0): t = (1/4, 1/2, 1/4), t^ = (1/2, 1/2).
    # Student (ln 3, 0, 0): s = (3/5, 1/5, 1/5), s^ = (3/4, 1/4).
    out_t = torch.tensor([[0.0, math.log(2.0), 0.0]])
    out_s = torch.tensor([[math.log(3.0), 0.0, 0.0]])
    parts = NKD(1.0, 1.0).terms(out_s, out_t, torch.tensor([1]))
    assert parts['target'].item() == pytest.approx(-0.5 * math.log(0.2), rel=1e-6)
    assert parts['non_target'].item() == pytest.approx(-(0.5 * math.log(0.75) + 0.5 * math.log(0.25)), rel=1e-6)


@pytest.mark.parametrize('T, gamma', [(3.0, 3.5), (1.0, 1.5), (4.0, 1.0)])
@pytest.mark.parametrize('batch, classes', [(1, 2), (7, 10), (3, 100)])
def test_matches_reference(T, gamma, batch, classes):
    out_s, out_t, target = random_case(batch, classes, seed=batch * 31 + classes)
    want = nkd_reference(out_s, out_t, target, T, gamma)
    loss = NKD(T, gamma)
    parts = loss.terms(out_s, out_t, target)
    assert (parts['target'].item(), parts['non_target'].item()) == pytest.approx(want, rel=1e-5, abs=1e-6)
    total = loss(out_s, out_t, target)
    assert total.dim() == 0 and torch.equal(total, parts['target'] + parts['non_target'])


def test_non_target_term_is_normalised():
    # changing either net's target logit changes the target term only
    out_s, out_t, target = random_case(4, 10, seed=3)
    bumped_s, bumped_t = out_s.clone(), out_t.clone()
    rows = torch.arange(4)
    bumped_s[rows, target] += 5.0
    bumped_t[rows, target] -= 3.0
    a, b = NKD(3.0, 3.5).terms(out_s, out_t, target), NKD(3.0, 3.5).terms(bumped_s, bumped_t, target)
    assert a['non_target'].item() == pytest.approx(b['non_target'].item(), rel=1e-6)
    assert a['target'].item() != pytest.approx(b['target'].item(), rel=1e-3)


def test_gradient_is_that_of_the_kl_form():
    # cross-entropy = KL + the teacher's entropy: the student's gradient is the KL's
    out_s, out_t, target = random_case(5, 10, seed=4)
    T, gamma = 3.0, 3.5
    x = out_s.clone().requires_grad_(True)
    NKD(T, gamma)(x, out_t, target).backward()
    ref = out_s.double().clone().requires_grad_(True)
    mask = torch.nn.functional.one_hot(target, 10).bool()
    t_y = torch.softmax(out_t.double(), 1)[mask]
    s_y = torch.softmax(ref, 1)[mask]
    t_hat = torch.softmax(out_t.double()[~mask].view(5, 9) / T, 1)
    s_hat = torch.softmax(ref[~mask].view(5, 9) / T, 1)
    kl_form = (t_y * (t_y / s_y).log()).mean() + gamma * T * T * (t_hat * (t_hat / s_hat).log()).sum(1).mean()
    kl_form.backward()
    torch.testing.assert_close(x.grad.double(), ref.grad, rtol=1e-4, atol=1e-7)


def test_float32_under_bf16_autocast():
    out_s, out_t, target = random_case(4, 10, seed=6)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mixed = NKD(3.0, 3.5)(out_s.bfloat16(), out_t.bfloat16(), target)
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)


def test_registry_defaults_are_the_official_cifar100_configuration():
    for data in ('cifar10', 'cifar100'):
        a = make_context('nkd', data_name=data, num_class=100).args
        assert (a.lambda_kd, a.T, a.nkd_gamma, a.ce_weight) == (1.0, 3.0, 3.5, 1.0)
    assert METHODS['nkd'].flags['T'] == METHODS['st'].flags['T']
    with pytest.raises(ConfigError, match='nkd_gamma'):
        METHODS['nkd'].build(make_context('nkd', {'nkd_gamma': -1.0}))


def test_distiller_returns_the_weighted_terms_and_detaches_the_teacher():
    distiller = METHODS['nkd'].build(make_context('nkd'))
    assert isinstance(distiller, Distiller) and distiller.loss_terms == ('target', 'non_target')
    s, s_leaves = make_features(batch=5, seed=0, requires_grad=True)
    t, t_leaves = make_features(batch=5, seed=1, requires_grad=True)
    target = torch.tensor([2, 0, 9, 9, 4])
    parts = distiller(s, t, Batch(None, target, None))
    want = nkd_reference(s.out, t.out, target, 3.0, 3.5)
    assert (parts['target'].item(), parts['non_target'].item()) == pytest.approx(want, rel=1e-5)
    sum(parts.values()).backward()
    assert s_leaves['out'].grad.abs().sum() > 0 and t_leaves['out'].grad is None
