"""Logit standardisation (--logit_stand) against independent computations:
the z-score by hand (unbiased deviation, epsilon 1e-7), st/dkd/ctkd with it
on equal to their formulas on z-scored logits (float64 loops), with it off
exactly what they computed before, and the one flag the modes share.

z -> (z - mean(z)) / (std(z) + 1e-7), per sample over the classes, std with C - 1.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_kd
from conftest import make_context, make_features
from dataset import Batch
from kd_losses import CTKD, DKD, METHODS, SoftTarget
from kd_losses._logit_stand import EPS, LOGIT_STAND, standardize

MODES_WITH_THE_SWITCH = ('ctkd', 'dkd', 'mlkd', 'st')


def zscore_np(z):
    z = np.asarray(z, dtype=np.float64)
    mean = z.mean(axis=1, keepdims=True)
    std = np.sqrt(((z - mean) ** 2).sum(axis=1, keepdims=True) / (z.shape[1] - 1))
    return (z - mean) / (std + 1e-7)


def softmax_np(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def kd_np(s, t, T):
    """T^2 mean_i KL(softmax(t_i / T) || softmax(s_i / T)), float64 loops."""
    total = 0.0
    for i in range(len(s)):
        p_s, p_t = softmax_np(s[i] / T), softmax_np(t[i] / T)
        total += sum(a * math.log(a / b) for a, b in zip(p_t, p_s))
    return T * T * total / len(s)


def random_case(batch=5, classes=10, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    out_s = torch.randn(batch, classes, generator=g) * scale + 1.5
    out_t = torch.randn(batch, classes, generator=g) * scale * 2 - 0.5
    return out_s, out_t, torch.randint(0, classes, (batch,), generator=g)


def np64(x):
    return x.detach().double().numpy()


# ----------------------------------------------------------------------------- the z-score

def test_zscore_hand_cases():
    # (1, 2, 3): mean 2, unbiased std 1. (0, 0, 4): mean 4/3, unbiased variance
    # (16/9 + 16/9 + 64/9) / 2 = 16/3, std 4/sqrt(3) (the biased one would be 4 sqrt(2)/3).
    z = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 4.0]], dtype=torch.float64)
    got = standardize(z)
    assert got.dtype == torch.float64
    assert got[0].tolist() == pytest.approx([-1 / (1 + EPS), 0.0, 1 / (1 + EPS)], rel=1e-12)
    std = 4 / math.sqrt(3)
    assert got[1].tolist() == pytest.approx([-4 / 3 / (std + EPS), -4 / 3 / (std + EPS), 8 / 3 / (std + EPS)],
                                            rel=1e-12)
    assert EPS == 1e-7


def test_zscore_of_constant_logits_is_finite_and_affine_invariant():
    assert standardize(torch.full((2, 5), 3.0)).abs().max().item() == 0.0
    z, _, _ = random_case()
    torch.testing.assert_close(standardize(3.0 * z - 7.0), standardize(z), rtol=1e-5, atol=1e-5)


def test_zscore_is_float32_for_low_precision_logits():
    z, _, _ = random_case()
    assert standardize(z.bfloat16()).dtype == torch.float32
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert standardize(z.bfloat16()).dtype == torch.float32


# ----------------------------------------------------------------------------- the modes, switched on

@pytest.mark.parametrize('T', [1.0, 2.0, 4.0])
def test_st_on_is_kd_of_zscored_logits(T):
    out_s, out_t, _ = random_case(seed=1)
    got = SoftTarget(T, logit_stand=True)(out_s, out_t).item()
    assert got == pytest.approx(kd_np(zscore_np(np64(out_s)), zscore_np(np64(out_t)), T), rel=1e-5)
    # only the logits' relations count: a per-sample rescaling of the student changes nothing
    scale = torch.tensor([[0.5], [2.0], [3.0], [1.0], [10.0]])
    assert SoftTarget(T, logit_stand=True)(out_s * scale + 4, out_t).item() == pytest.approx(got, rel=1e-4)


def test_dkd_on_is_dkd_of_zscored_logits():
    from test_loss_dkd import dkd_reference
    out_s, out_t, target = random_case(seed=2)
    parts = DKD(1.0, 8.0, 2.0, logit_stand=True).terms(out_s, out_t, target)
    want = dkd_reference(torch.from_numpy(zscore_np(np64(out_s))), torch.from_numpy(zscore_np(np64(out_t))),
                         target, 1.0, 8.0, 2.0)
    assert (parts['tckd'].item(), parts['nckd'].item()) == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_ctkd_on_is_kd_of_zscored_logits_at_the_learned_temperature():
    out_s, out_t, _ = random_case(seed=3)
    loss = CTKD(1.0, 20.0, logit_stand=True)
    T = loss.temperature().item()
    # float32 against float64: a small KL (T ~ 15.6) times T^2
    assert loss(out_s, out_t).item() == pytest.approx(
        kd_np(zscore_np(np64(out_s)), zscore_np(np64(out_t)), T), rel=1e-4)


# ----------------------------------------------------------------------------- switched off: unchanged

def test_st_off_computes_exactly_the_original_loss():
    out_s, out_t, _ = random_case(seed=4)
    for dtype in (torch.float32, torch.float64):
        s, t = out_s.to(dtype), out_t.to(dtype)
        original = F.kl_div(F.log_softmax(s / 4.0, dim=1), F.log_softmax(t / 4.0, dim=1),
                            reduction='batchmean', log_target=True) * 16.0
        assert torch.equal(SoftTarget(4.0)(s, t), original)
        assert torch.equal(SoftTarget(4.0, logit_stand=False)(s, t), original)


def test_off_is_the_default_and_differs_from_on():
    out_s, out_t, target = random_case(seed=5)
    s, _ = make_features(batch=5, seed=0)
    t, _ = make_features(batch=5, seed=1)
    batch = Batch(None, target, None)
    for mode in MODES_WITH_THE_SWITCH:
        assert make_context(mode).args.logit_stand is False
        if METHODS[mode].views != ('weak',):  # reads two views: tests/test_loss_mlkd.py checks it
            continue
        off = METHODS[mode].build(make_context(mode))(s, t, batch)
        on = METHODS[mode].build(make_context(mode, {'logit_stand': True}))(s, t, batch)
        off, on = (sum(x.values()) if isinstance(x, dict) else x for x in (off, on))
        assert off.item() != pytest.approx(on.item(), rel=1e-3), mode
    assert torch.equal(DKD(1.0, 8.0, 4.0)(out_s, out_t, target),
                       DKD(1.0, 8.0, 4.0, logit_stand=False)(out_s, out_t, target))


# ----------------------------------------------------------------------------- the flag

def test_one_flag_declared_by_the_modes_it_applies_to():
    declaring = sorted(m for m, method in METHODS.items() if 'logit_stand' in method.flags)
    assert tuple(declaring) == MODES_WITH_THE_SWITCH
    for mode in MODES_WITH_THE_SWITCH:
        assert METHODS[mode].flags['logit_stand'] == LOGIT_STAND
        assert METHODS[mode].defaults['logit_stand'] is False
    assert LOGIT_STAND.type is bool
    assert not any(name.startswith('_') for name in METHODS)


def parse(*extra):
    args, _, ignored = train_kd.parse_args(
        ['--data_name', 'cifar10', '--s_name', 'resnet20', '--t_name', 'resnet20', '--s_init', 'unused',
         '--t_model', 'unused', '--device', 'cpu', *extra])
    return args, ignored


def test_the_command_line_switch():
    assert parse('--kd_mode', 'st')[0].logit_stand is False
    assert parse('--kd_mode', 'st', '--logit_stand')[0].logit_stand is True
    assert parse('--kd_mode', 'dkd', '--logit_stand', '--no-logit_stand')[0].logit_stand is False
    args, ignored = parse('--kd_mode', 'nkd', '--logit_stand')
    assert '--logit_stand' in ignored
