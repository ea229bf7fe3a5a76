"""OFD (margin-clipped teacher pre-activations, 1x1 conv + BN connector, partial
L2) against a numpy computation with loops over channels."""
import numpy as np
import pytest
import torch

from conftest import SHAPES, make_context, make_features
from kd_losses import METHODS, OFD, ConfigError, Distiller

STAGES = ('rb1', 'rb2', 'rb3')


def margin_reference(t):
    t = t.detach().double().numpy()
    margins = []
    for c in range(t.shape[1]):
        negatives = t[:, c][t[:, c] < 0]
        margins.append(negatives.mean() if negatives.size else 0.0)
    return np.array(margins)


def ofd_reference(ofd, fm_s, fm_t, bn_eps=1e-5):
    """Connector in train mode: BN normalises with the batch statistics (biased variance)."""
    x = fm_s.detach().double().numpy()
    w = ofd.connector[0].weight.detach().double().numpy()[:, :, 0, 0]
    y = np.einsum('oc,bchw->bohw', w, x)
    bn = ofd.connector[1]
    gamma, beta = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    s = np.empty_like(y)
    for c in range(y.shape[1]):
        s[:, c] = (y[:, c] - y[:, c].mean()) / np.sqrt(y[:, c].var() + bn_eps) * gamma[c] + beta[c]
    t = fm_t.detach().double().numpy()
    t = np.maximum(t, margin_reference(fm_t).reshape(1, -1, 1, 1))
    ignored = (s <= t) & (t <= 0)
    return np.mean(np.where(ignored, 0.0, (s - t) ** 2))


def identity_connector(channels):
    """An OFD whose connector, in eval mode, passes the student map unchanged."""
    ofd = OFD(channels, channels).eval()
    with torch.no_grad():
        ofd.connector[0].weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
        ofd.connector[1].running_var.fill_(1 - ofd.connector[1].eps)
    return ofd


def test_margin_is_the_mean_of_negative_values():
    t = torch.tensor([[-1.0, -3.0, 2.0], [4.0, 5.0, 6.0]]).view(1, 2, 1, 3)
    assert OFD.margin(t).flatten().tolist() == pytest.approx([-2.0, 0.0], abs=1e-5)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(3, 4, 5, 5, generator=g)
    assert OFD.margin(t).flatten().numpy() == pytest.approx(margin_reference(t), rel=1e-5)


def test_hand_cases():
    ofd = identity_connector(1)
    t = torch.tensor([-1.0, -3.0]).view(1, 1, 1, 2)   # margin -2: targets become [-1, -2]
    # student below both non-positive targets: the ReLU hides the difference
    assert ofd(torch.tensor([-5.0, -5.0]).view(1, 1, 1, 2), t).item() == pytest.approx(0.0)
    # student at 0: (0 + 1)^2 and (0 + 2)^2, mean 2.5
    assert ofd(torch.zeros(1, 1, 1, 2), t).item() == pytest.approx(2.5, rel=1e-5)
    # positive targets are matched exactly, from either side
    t = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    assert ofd(t.clone(), t).item() == pytest.approx(0.0)
    assert ofd(torch.tensor([0.0, 4.0]).view(1, 1, 1, 2), t).item() == pytest.approx(2.5, rel=1e-5)


def test_matches_reference_and_gradients():
    g = torch.Generator().manual_seed(1)
    ofd = OFD(4, 6).train()
    with torch.no_grad():  # non-trivial BN affine
        ofd.connector[1].weight.uniform_(0.5, 1.5, generator=g)
        ofd.connector[1].bias.normal_(generator=g)
    fm_s = torch.randn(3, 4, 5, 5, generator=g).requires_grad_()
    fm_t = torch.randn(3, 6, 5, 5, generator=g)
    loss = ofd(fm_s, fm_t)
    assert loss.item() == pytest.approx(ofd_reference(ofd, fm_s, fm_t), rel=1e-5)
    loss.backward()
    assert fm_s.grad.abs().sum() > 0
    for name, p in ofd.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_margin_is_not_state():
    """The margin comes from the batch at hand: same inputs, same loss, whatever came before."""
    g = torch.Generator().manual_seed(2)
    ofd = OFD(4, 4).train()
    fm_s, fm_t = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    first = ofd(fm_s, fm_t).item()
    ofd(torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g) - 3)
    assert ofd(fm_s, fm_t).item() == pytest.approx(first, rel=1e-6)
    assert {k.split('.')[0] for k in ofd.state_dict()} == {'connector'}


def test_distiller_forward_matches_reference_and_gradients():
    distiller = METHODS['ofd'].build(make_context('ofd'))
    assert isinstance(distiller, Distiller)
    distiller.train()
    for ofd, key in zip(distiller.per_key, STAGES):
        channels = SHAPES[key][0]
        assert ofd.connector[0].weight.shape == (channels, channels, 1, 1)
    s, s_leaves = make_features(batch=2, seed=0, requires_grad=True)
    t, t_leaves = make_features(batch=2, seed=1, requires_grad=True)
    loss = distiller(s, t, None)
    assert loss.dim() == 0 and torch.isfinite(loss)
    expected = np.mean([ofd_reference(ofd, getattr(s, k)[0], getattr(t, k)[0])
                        for ofd, k in zip(distiller.per_key, STAGES)])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    for key in STAGES:  # pre-activations are read directly
        assert s_leaves[key].grad.abs().sum() > 0
    assert all(leaf.grad is None for leaf in t_leaves.values())
    params = distiller.learnable_parameters()
    assert len(params) == 9  # conv weight, BN weight and bias per stage
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_config_error_on_spatial_mismatch():
    ctx = make_context('ofd')
    ctx.teacher_shapes = {**ctx.teacher_shapes, 'rb3': (64, 4, 4)}
    with pytest.raises(ConfigError, match='rb3'):
        METHODS['ofd'].build(ctx)
    # the message names both shapes
    with pytest.raises(ConfigError, match=r'student rb3 \(64, 8, 8\).*teacher rb3 \(64, 4, 4\)'):
        METHODS['ofd'].build(ctx)


def test_a_larger_teacher_map_is_pooled_after_its_margin():
    """The teacher's map, larger in space, meets the student's size: margin from
    the map as it is, 2x2 block means, then the clipping; channels through the connector."""
    ctx = make_context('ofd')
    ctx.student_shapes = {**ctx.student_shapes, 'rb2': (8, 8, 8)}
    distiller = METHODS['ofd'].build(ctx)
    ofd = distiller.per_key[1].train()
    assert ofd.connector[0].weight.shape == (32, 8, 1, 1)
    g = torch.Generator().manual_seed(3)
    fm_s = torch.randn(2, 8, 8, 8, generator=g).requires_grad_()
    fm_t = torch.randn(2, 32, 16, 16, generator=g)
    loss = ofd(fm_s, fm_t)
    margin = margin_reference(fm_t).reshape(1, -1, 1, 1)
    pooled = fm_t.double().numpy().reshape(2, 32, 8, 2, 8, 2).mean(axis=(3, 5))
    x = fm_s.detach().double().numpy()
    w = ofd.connector[0].weight.detach().double().numpy()[:, :, 0, 0]
    y = np.einsum('oc,bchw->bohw', w, x)
    bn = ofd.connector[1]
    s = ((y - y.mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(y.var(axis=(0, 2, 3), keepdims=True) + bn.eps)
         * bn.weight.detach().double().numpy().reshape(1, -1, 1, 1)
         + bn.bias.detach().double().numpy().reshape(1, -1, 1, 1))
    t = np.maximum(pooled, margin)
    expected = np.mean(np.where((s <= t) & (t <= 0), 0.0, (s - t) ** 2))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert fm_s.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ofd.parameters())
