"""AFD (teacher-driven channel attention weighting spatially normalised L2
distances) against loops over samples and channels."""
import re

import numpy as np
import pytest
import torch

from conftest import SHAPES, make_context, make_features
from kd_losses import AFD, METHODS, ConfigError, Distiller

STAGES = ('rb1', 'rb2', 'rb3')


def afd_reference(afd, fm_s, fm_t, eps=1e-6):
    s, t = fm_s.detach().double().numpy(), fm_t.detach().double().numpy()
    conv1, conv2 = afd.attention[0], afd.attention[2]
    w1, b1 = conv1.weight.detach().double().numpy()[:, :, 0, 0], conv1.bias.detach().double().numpy()
    w2, b2 = conv2.weight.detach().double().numpy()[:, :, 0, 0], conv2.bias.detach().double().numpy()
    per_sample = []
    for n in range(len(s)):
        pooled = np.array([t[n, c].mean() for c in range(t.shape[1])])
        rho = 1 / (1 + np.exp(-(w2 @ np.maximum(w1 @ pooled + b1, 0) + b2)))
        rho = rho / rho.sum()
        total = 0.0
        for c in range(s.shape[1]):
            s_hat = s[n, c] / (np.linalg.norm(s[n, c]) + eps)
            t_hat = t[n, c] / (np.linalg.norm(t[n, c]) + eps)
            total += rho[c] * np.mean((s_hat - t_hat) ** 2)
        per_sample.append(total)
    return np.mean(per_sample)


def test_hand_cases():
    afd = AFD(2, 1.0)
    with torch.no_grad():  # attention silenced: rho = sigmoid(0) normalised = 1/2 per channel
        for p in afd.parameters():
            p.zero_()
    t = torch.tensor([[0.0, 1.0], [3.0, 4.0]]).view(1, 2, 1, 2)
    s = torch.tensor([[1.0, 0.0], [3.0, 4.0]]).view(1, 2, 1, 2)
    # channel 0: unit maps (1, 0) vs (0, 1) -> mean squared difference 1; channel 1 equal
    assert afd(s, t).item() == pytest.approx(0.5 * 1.0, rel=1e-5)
    # maps equal up to a positive scale normalise to the same thing
    g = torch.Generator().manual_seed(0)
    t = torch.rand(2, 2, 3, 3, generator=g) + 0.1
    assert afd(t.clone(), t).item() == pytest.approx(0.0, abs=1e-10)
    assert afd(3 * t, t).item() == pytest.approx(0.0, abs=1e-10)


def test_channel_weights_are_a_distribution():
    afd = AFD(8, 0.5)
    rho = afd.channel_weights(torch.randn(3, 8, 4, 4))
    assert rho.shape == (3, 8)
    assert (rho > 0).all() and torch.allclose(rho.sum(dim=1), torch.ones(3))


def test_matches_reference_and_gradients():
    g = torch.Generator().manual_seed(1)
    # a fixed initialisation: with three hidden units, some draws leave every ReLU off for
    # these three samples, and then the first conv rightly gets no gradient
    torch.manual_seed(0)
    afd = AFD(6, 0.5)
    fm_s = torch.randn(3, 6, 4, 4, generator=g).requires_grad_()
    fm_t = torch.randn(3, 6, 4, 4, generator=g).relu()
    loss = afd(fm_s, fm_t)
    assert loss.item() == pytest.approx(afd_reference(afd, fm_s, fm_t), rel=1e-5)
    loss.backward()
    assert fm_s.grad.abs().sum() > 0
    for name, p in afd.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_registry_defaults_and_flags():
    method = METHODS['afd']
    # lambda_kd's default: its effect on a run is checked in tests/test_train_kd.py (SEED_DEFAULTS)
    # att_f's default (1.0): attention blocks as wide as the stage
    distiller = method.build(make_context('afd'))
    for afd, key in zip(distiller.per_key, STAGES):
        channels = SHAPES[key][0]
        assert afd.attention[0].weight.shape == (channels, channels, 1, 1)
    assert method.flags['att_f'].type is float


@pytest.mark.parametrize('att_f', [1.0, 0.25])
def test_build_one_attention_block_per_stage(att_f):
    distiller = METHODS['afd'].build(make_context('afd', {'att_f': att_f}))
    assert isinstance(distiller, Distiller)
    for afd, key in zip(distiller.per_key, STAGES):
        channels = SHAPES[key][0]
        assert afd.attention[0].weight.shape == (int(channels * att_f), channels, 1, 1)
        assert afd.attention[2].weight.shape == (channels, int(channels * att_f), 1, 1)


def test_distiller_forward_matches_reference_and_gradients():
    distiller = METHODS['afd'].build(make_context('afd'))
    s, s_leaves = make_features(batch=2, seed=0, requires_grad=True)
    t, t_leaves = make_features(batch=2, seed=1, requires_grad=True)
    loss = distiller(s, t, None)
    assert loss.dim() == 0 and torch.isfinite(loss)
    expected = np.mean([afd_reference(afd, getattr(s, k)[1], getattr(t, k)[1])
                        for afd, k in zip(distiller.per_key, STAGES)])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    for key in STAGES:
        assert s_leaves[key].grad.abs().sum() > 0
    assert all(leaf.grad is None for leaf in t_leaves.values())
    params = distiller.learnable_parameters()
    assert len(params) == 12  # two convs with bias per stage
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_config_errors():
    with pytest.raises(ConfigError, match='--att_f'):
        METHODS['afd'].build(make_context('afd', {'att_f': 0.01}))
    ctx = make_context('afd')
    ctx.student_shapes = {**ctx.student_shapes, 'rb2': (16, 16, 16)}
    with pytest.raises(ConfigError, match='rb2'):
        METHODS['afd'].build(ctx)
    # no connector in the paper or its code: any difference is refused, naming both shapes
    for student_rb2 in ((64, 16, 16), (32, 8, 8)):
        ctx.student_shapes = {**ctx.student_shapes, 'rb2': student_rb2}
        with pytest.raises(ConfigError, match=re.escape(f'{student_rb2} vs (32, 16, 16)')):
            METHODS['afd'].build(ctx)
