"""Logits (MSE on logits), FitNets hints (MSE on rb3 post) and NST (MMD with
a polynomial kernel on rb3 post), each against a direct numpy computation."""
import numpy as np
import pytest
import torch

from conftest import make_context, make_features
from kd_losses import METHODS, NST, Distiller, Hint, Logits


def as_np(x):
    return x.detach().double().numpy()


def mse_reference(a, b):
    a, b = as_np(a), as_np(b)
    return ((a - b) ** 2).sum() / a.size


def nst_reference(fm_s, fm_t):
    """Per sample: normalise each channel's spatial vector, then
    mean_cc' (t_c.t_c')^2 + mean (s_c.s_c')^2 - 2 mean (s_c.t_c')^2; batch mean."""
    s, t = as_np(fm_s), as_np(fm_t)
    total = 0.0
    for b in range(len(s)):
        sv = [c.ravel() / np.linalg.norm(c.ravel()) for c in s[b]]
        tv = [c.ravel() / np.linalg.norm(c.ravel()) for c in t[b]]

        def kernel_mean(xs, ys):
            return np.mean([np.dot(x, y) ** 2 for x in xs for y in ys])

        total += kernel_mean(tv, tv) + kernel_mean(sv, sv) - 2 * kernel_mean(sv, tv)
    return total / len(s)


# ----- formulas -----

def test_logits_matches_reference_and_hand_case():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    assert Logits()(s, t).item() == pytest.approx(mse_reference(s, t), rel=1e-5)
    assert Logits()(s, s).item() == 0.0
    # (1^2 + 2^2) / 2 entries
    assert Logits()(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)).item() == pytest.approx(2.5)


def test_hint_matches_reference_and_hand_case():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 8, 3, 3, generator=g), torch.randn(4, 8, 3, 3, generator=g)
    assert Hint()(s, t).item() == pytest.approx(mse_reference(s, t), rel=1e-5)
    assert Hint()(t, t).item() == 0.0
    s = torch.zeros(1, 1, 2, 2)
    t = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    assert Hint()(s, t).item() == pytest.approx(1.0)  # 4 / 4 entries


def test_nst_matches_reference():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(3, 6, 4, 4, generator=g), torch.randn(3, 5, 4, 4, generator=g)
    assert NST()(s, t).item() == pytest.approx(nst_reference(s, t), rel=1e-5)


def test_nst_hand_case_and_invariances():
    # one channel each, orthogonal unit vectors: k(t,t)=1, k(s,s)=1, k(s,t)=0 -> 2
    s = torch.tensor([[[[1.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 1.0]]]])
    assert NST()(s, t).item() == pytest.approx(2.0)
    g = torch.Generator().manual_seed(4)
    s, t = torch.rand(2, 4, 3, 3, generator=g), torch.rand(2, 4, 3, 3, generator=g)
    assert NST()(t, t).item() == pytest.approx(0.0, abs=1e-6)
    # each channel is normalised: scaling a channel changes nothing
    scale = torch.tensor([1.0, 3.0, 0.5, 7.0]).view(1, 4, 1, 1)
    assert NST()(s * scale, t).item() == pytest.approx(NST()(s, t).item(), rel=1e-5)


def test_nst_pools_the_larger_map():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    s_pooled = s.view(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))  # 2x2 block means
    assert NST()(s, t).item() == pytest.approx(nst_reference(s_pooled, t), rel=1e-5)


@pytest.mark.parametrize('loss', [Logits(), Hint(), NST()])
def test_float32_result_for_low_precision_inputs(loss):
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(4, 8, 4, 4, generator=g), torch.randn(4, 8, 4, 4, generator=g)
    if isinstance(loss, Logits):
        s, t = s.flatten(1), t.flatten(1)
    out = loss(s.bfloat16(), t.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out)


# ----- registry level -----

FEATURE = {'logits': lambda f: f.out, 'fitnet': lambda f: f.rb3[1], 'nst': lambda f: f.rb3[1]}
REFERENCE = {'logits': mse_reference, 'fitnet': mse_reference, 'nst': nst_reference}


@pytest.mark.parametrize('mode', ['logits', 'fitnet', 'nst'])
def test_no_method_flags(mode):
    # lambda_kd's default: its effect on a run is checked in tests/test_train_kd.py (SEED_DEFAULTS)
    assert dict(METHODS[mode].flags) == {}


@pytest.mark.parametrize('mode', ['logits', 'fitnet', 'nst'])
def test_distiller_reads_its_feature_and_detaches_the_teacher(mode):
    distiller = METHODS[mode].build(make_context(mode))
    assert isinstance(distiller, Distiller)
    assert distiller.pretrain_phases(make_context(mode)) == [] and distiller.kd_weight(1, 200) == 1.0
    assert list(distiller.learnable_parameters()) == [] and not distiller.teacher_grad
    s, s_leaves = make_features(batch=6, seed=0, requires_grad=True)
    t, t_leaves = make_features(batch=6, seed=1, requires_grad=True)
    loss = distiller(s, t, None)
    assert loss.dim() == 0 and torch.isfinite(loss)
    expected = REFERENCE[mode](FEATURE[mode](s), FEATURE[mode](t))
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()
    used = 'out' if mode == 'logits' else 'rb3'
    assert s_leaves[used].grad is not None and s_leaves[used].grad.abs().sum() > 0
    for name, leaf in s_leaves.items():
        if name != used:
            assert leaf.grad is None
    assert all(leaf.grad is None for leaf in t_leaves.values())
