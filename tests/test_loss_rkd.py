"""RKD: distance term (mean-normalised pairwise distances, smooth-L1) and angle
term (cosines at each vertex of every triplet, smooth-L1), against loops over
pairs and triplets."""
import numpy as np
import pytest
import torch

from conftest import make_context, make_features
from kd_losses import METHODS, RKD, ConfigError, Distiller


def smooth_l1(x):
    x = abs(x)
    return 0.5 * x * x if x < 1 else x - 0.5


def unit(v):
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def rkd_reference(feat_s, feat_t, w_dist, w_angle):
    s, t = feat_s.detach().double().numpy(), feat_t.detach().double().numpy()
    n = len(s)

    def distances(f):
        d = np.array([[np.linalg.norm(f[i] - f[j]) if i != j else 0.0 for j in range(n)]
                      for i in range(n)])
        return d / d[d > 0].mean()

    def angles(f):
        return np.array([[[np.dot(unit(f[j] - f[i]), unit(f[k] - f[i])) for k in range(n)]
                          for j in range(n)] for i in range(n)])

    dist = np.mean([smooth_l1(x) for x in (distances(s) - distances(t)).ravel()])
    angle = np.mean([smooth_l1(x) for x in (angles(s) - angles(t)).ravel()])
    return w_dist * dist + w_angle * angle


def test_matches_reference():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g) * 3
    assert RKD(25.0, 50.0)(s, t).item() == pytest.approx(rkd_reference(s, t, 25.0, 50.0), rel=1e-4)


def test_hand_case_line_against_equilateral_triangle():
    line = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    triangle = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 3 ** 0.5 / 2]])
    # distances: line 1,2,1 (mean 4/3) -> 3/4, 3/2, 3/4; triangle all 1;
    # |diff| 1/4, 1/2, 1/4 twice each over 9 entries: 2 * (1/32 + 1/8 + 1/32) / 9 = 1/24
    assert RKD(1.0, 0.0)(line, triangle).item() == pytest.approx(1 / 24, rel=1e-5)
    # angles: triangle 1 on same edges, 0.5 across; line +-1. Non-zero diffs: 0.5 (x4)
    # at the end points, -1.5 (x2) at the middle point -> (4 * 0.125 + 2 * 1.0) / 27
    assert RKD(0.0, 1.0)(line, triangle).item() == pytest.approx(2.5 / 27, rel=1e-5)
    assert RKD(2.0, 3.0)(line, triangle).item() == pytest.approx(2 / 24 + 7.5 / 27, rel=1e-5)


def test_relations_ignore_scale_and_rotation():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 4, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    assert RKD(25.0, 50.0)(s, s).item() == pytest.approx(0.0, abs=1e-6)
    assert RKD(25.0, 50.0)(s, 2.5 * s @ rotation + 1.0).item() == pytest.approx(0.0, abs=1e-4)


def test_degenerate_batches_give_finite_gradients():
    # a batch of one (no pairs) and a repeated sample (a zero distance and zero difference vectors)
    g = torch.Generator().manual_seed(3)
    rows = torch.randn(4, 8, generator=g)
    for s in (rows[:1].clone(), torch.cat([rows, rows[:1]])):
        s.requires_grad_(True)
        out = RKD(25.0, 50.0)(s, torch.randn(s.shape, generator=g))
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(s.grad).all()


def test_float32_result_for_low_precision_inputs():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    out = RKD(25.0, 50.0)(s.bfloat16(), t.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_registry():
    method = METHODS['rkd']
    # lambda_kd's default: its effect on a run is checked in tests/test_train_kd.py (SEED_DEFAULTS)
    # the weights' defaults: 25 (distance) and 50 (angle)
    s, _ = make_features(batch=5, seed=2)
    t, _ = make_features(batch=5, seed=3)
    loss = sum(method.build(make_context('rkd'))(s, t, None).values())
    assert loss.item() == pytest.approx(rkd_reference(s.feat, t.feat, 25.0, 50.0), rel=1e-4)
    assert method.flags['w_dist'].type is float and method.flags['w_angle'].type is float
    with pytest.raises(ConfigError, match='w_dist'):
        method.build(make_context('rkd', {'w_dist': -1.0}))


def test_distiller_matches_reference_and_detaches_the_teacher():
    ctx = make_context('rkd', {'w_dist': 10.0, 'w_angle': 20.0})
    distiller = METHODS['rkd'].build(ctx)
    assert isinstance(distiller, Distiller)
    assert distiller.pretrain_phases(ctx) == [] and list(distiller.learnable_parameters()) == []
    s, s_leaves = make_features(batch=6, seed=0, requires_grad=True)
    t, t_leaves = make_features(batch=6, seed=1, requires_grad=True)
    loss = sum(distiller(s, t, None).values())  # the weighted terms, logged on their own
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(rkd_reference(s.feat, t.feat, 10.0, 20.0), rel=1e-4)
    loss.backward()
    assert s_leaves['feat'].grad.abs().sum() > 0 and torch.isfinite(s_leaves['feat'].grad).all()
    assert all(leaf.grad is None for leaf in t_leaves.values())
