"""VID (Gaussian negative log-likelihood of the teacher map under a regressor's
mean and a learned per-channel variance) against a numpy computation."""
import math

import numpy as np
import pytest
import torch

from conftest import SHAPES, make_context, make_features
from kd_losses import METHODS, VID, ConfigError, Distiller

STAGES = ('rb1', 'rb2', 'rb3')


def conv1x1(weight, x):
    return np.einsum('oc,bchw->bohw', weight.detach().double().numpy()[:, :, 0, 0], x)


def vid_reference(vid, fm_s, fm_t, eps=1e-6):
    x = fm_s.detach().double().numpy()
    convs = [m for m in vid.regressor if isinstance(m, torch.nn.Conv2d)]
    h = np.maximum(conv1x1(convs[0].weight, x), 0)
    h = np.maximum(conv1x1(convs[1].weight, h), 0)
    mean = conv1x1(convs[2].weight, h)
    alpha = vid.alpha.detach().double().numpy()
    var = (np.log1p(np.exp(alpha)) + eps).reshape(1, -1, 1, 1)
    t = fm_t.detach().double().numpy()
    return np.mean(0.5 * (np.log(var) + (mean - t) ** 2 / var))


@pytest.mark.parametrize('init_var', [5.0, 0.5, 1e-3, 60.0])
def test_variance_starts_at_init_var(init_var):
    vid = VID(4, 4, 6, init_var)
    alpha = vid.alpha.detach().double()
    assert alpha.shape == (6,)
    variance = torch.log1p(torch.exp(alpha)) + 1e-6
    assert torch.allclose(variance, torch.full((6,), init_var, dtype=torch.float64), rtol=1e-5)


def test_hand_case_zero_mean():
    # regressor silenced: mean 0, so each entry costs 0.5 * (log v + t^2 / v)
    vid = VID(3, 4, 2, init_var=5.0)
    with torch.no_grad():
        vid.regressor[-1].weight.zero_()
    fm_t = torch.full((2, 2, 3, 3), 2.0)
    expected = 0.5 * (math.log(5.0) + 4.0 / 5.0)
    assert vid(torch.randn(2, 3, 3, 3), fm_t).item() == pytest.approx(expected, rel=1e-5)
    assert vid(torch.randn(2, 3, 3, 3), torch.zeros(2, 2, 3, 3)).item() == pytest.approx(
        0.5 * math.log(5.0), rel=1e-5)


def test_matches_reference_and_gradients():
    g = torch.Generator().manual_seed(3)
    vid = VID(4, 5, 6, init_var=2.0)
    with torch.no_grad():
        vid.alpha.add_(torch.randn(6, generator=g))  # per-channel variances differ
    fm_s = torch.randn(3, 4, 5, 5, generator=g).requires_grad_()
    fm_t = torch.randn(3, 6, 5, 5, generator=g)
    loss = vid(fm_s, fm_t)
    assert loss.item() == pytest.approx(vid_reference(vid, fm_s, fm_t), rel=1e-5)
    loss.backward()
    assert fm_s.grad.abs().sum() > 0
    for name, p in vid.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_registry_defaults_and_flags():
    method = METHODS['vid']
    # lambda_kd's default: its effect on a run is checked in tests/test_train_kd.py (SEED_DEFAULTS)
    # sf's default (1.0): hidden channels = the teacher's; init_var's: variance 5 at the start
    for vid, key in zip(method.build(make_context('vid')).per_key, STAGES):
        channels = SHAPES[key][0]
        assert vid.regressor[0].weight.shape == (channels, channels, 1, 1)
        assert torch.allclose(vid.variance(), torch.full((channels,), 5.0))
    assert method.flags['sf'].type is float and method.flags['init_var'].type is float


@pytest.mark.parametrize('sf, mids', [(1.0, (16, 32, 64)), (0.5, (8, 16, 32))])
def test_build_one_regressor_per_stage(sf, mids):
    distiller = METHODS['vid'].build(make_context('vid', {'sf': sf, 'init_var': 3.0}))
    assert isinstance(distiller, Distiller)
    for vid, key, mid in zip(distiller.per_key, STAGES, mids):
        channels = SHAPES[key][0]
        assert vid.regressor[0].weight.shape == (mid, channels, 1, 1)
        assert vid.regressor[-1].weight.shape == (channels, mid, 1, 1)
        assert torch.allclose(vid.variance(), torch.full((channels,), 3.0))
    # 3 convs + alpha per stage, all handed to the optimiser
    assert len(distiller.learnable_parameters()) == 12


def test_distiller_forward_matches_reference_and_gradients():
    distiller = METHODS['vid'].build(make_context('vid'))
    s, s_leaves = make_features(batch=2, seed=0, requires_grad=True)
    t, t_leaves = make_features(batch=2, seed=1, requires_grad=True)
    loss = distiller(s, t, None)
    assert loss.dim() == 0 and torch.isfinite(loss)
    expected = np.mean([vid_reference(vid, getattr(s, k)[1], getattr(t, k)[1])
                        for vid, k in zip(distiller.per_key, STAGES)])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    for key in STAGES:
        assert s_leaves[key].grad.abs().sum() > 0
    assert all(leaf.grad is None for leaf in t_leaves.values())
    for p in distiller.learnable_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_config_errors():
    with pytest.raises(ConfigError, match='--sf'):
        METHODS['vid'].build(make_context('vid', {'sf': 0.01}))
    with pytest.raises(ConfigError, match='--init_var'):
        METHODS['vid'].build(make_context('vid', {'init_var': 1e-7}))


# ----------------------------------------------------------------------------- across shapes

def block_mean(x, size):
    """Average over equal blocks down to `size` (what adaptive pooling does for divisible sizes)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, size[0], h // size[0], size[1], w // size[1]).mean(axis=(3, 5))


@pytest.mark.parametrize('s_rb1, t_rb1', [((8, 16, 16), (16, 32, 32)),   # the teacher's map pooled
                                          ((24, 32, 32), (16, 8, 8))])   # the student's, before the regressor
def test_the_larger_map_is_pooled_to_the_smaller(s_rb1, t_rb1):
    ctx = make_context('vid')
    ctx.student_shapes = {**ctx.student_shapes, 'rb1': s_rb1}
    ctx.teacher_shapes = {**ctx.teacher_shapes, 'rb1': t_rb1}
    distiller = METHODS['vid'].build(ctx)
    vid = distiller.per_key[0]
    assert vid.regressor[0].weight.shape[1] == s_rb1[0] and vid.regressor[-1].weight.shape[0] == t_rb1[0]
    g = torch.Generator().manual_seed(4)
    fm_s = torch.randn(2, *s_rb1, generator=g).requires_grad_()
    fm_t = torch.randn(2, *t_rb1, generator=g)
    loss = vid(fm_s, fm_t)
    size = tuple(min(a, b) for a, b in zip(s_rb1[1:], t_rb1[1:]))
    pooled_s = torch.from_numpy(block_mean(fm_s.detach().double().numpy(), size))
    pooled_t = torch.from_numpy(block_mean(fm_t.double().numpy(), size))
    assert loss.item() == pytest.approx(vid_reference(vid, pooled_s, pooled_t), rel=1e-5)
    loss.backward()
    assert fm_s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vid.parameters())
