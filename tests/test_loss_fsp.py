"""FSP (Gram matrices between consecutive stages, MSE) against loops over channel
pairs, and its two-stage schedule: a KD-only 'init' stage over the student's
parameters, then cross-entropy only."""
import numpy as np
import pytest
import torch

from conftest import make_context, make_features
from kd_losses import FSP, METHODS, ConfigError, Distiller
from network import resnet20

PAIRS = (('stem', 'rb1'), ('rb1', 'rb2'), ('rb2', 'rb3'))


def avg_pool(fm, size):
    b, c, h, w = fm.shape
    return fm.reshape(b, c, size[0], h // size[0], size[1], w // size[1]).mean(axis=(3, 5))


def fsp_matrix_reference(fm1, fm2):
    fm1, fm2 = fm1.detach().double().numpy(), fm2.detach().double().numpy()
    if fm1.shape[2] > fm2.shape[2]:
        fm1 = avg_pool(fm1, fm2.shape[2:])
    elif fm2.shape[2] > fm1.shape[2]:
        fm2 = avg_pool(fm2, fm1.shape[2:])
    b, c1, c2 = fm1.shape[0], fm1.shape[1], fm2.shape[1]
    positions = fm1.shape[2] * fm1.shape[3]
    g = np.zeros((b, c1, c2))
    for n in range(b):
        for i in range(c1):
            for j in range(c2):
                g[n, i, j] = np.sum(fm1[n, i] * fm2[n, j]) / positions
    return g


def fsp_reference(s1, s2, t1, t2):
    return np.mean((fsp_matrix_reference(s1, s2) - fsp_matrix_reference(t1, t2)) ** 2)


def test_hand_cases():
    fsp = FSP()
    ones = torch.ones(1, 1, 2, 2)
    # constant maps: G = a * b; student 1*2 vs teacher 3*1 -> (2 - 3)^2
    assert fsp(1 * ones, 2 * ones, 3 * ones, 1 * ones).item() == pytest.approx(1.0)
    # the larger map is average-pooled: the top-left 2x2 block of arange(16) averages 2.5,
    # paired with a one-hot map at (0, 0) and divided by the 4 positions -> 0.625
    big = torch.arange(16.0).view(1, 1, 4, 4)
    one_hot = torch.tensor([[1.0, 0.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    assert FSP.fsp_matrix(big, one_hot).item() == pytest.approx(0.625)
    assert FSP.fsp_matrix(one_hot, big).item() == pytest.approx(0.625)
    # identical student and teacher
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)
    assert fsp(x, y, x.clone(), y.clone()).item() == 0.0


def test_matches_loop_reference():
    g = torch.Generator().manual_seed(2)
    s1, t1 = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    s2, t2 = torch.randn(2, 6, 4, 4, generator=g), torch.randn(2, 6, 4, 4, generator=g)
    assert FSP()(s1, s2, t1, t2).item() == pytest.approx(fsp_reference(s1, s2, t1, t2), rel=1e-5)
    same = torch.randn(2, 3, 4, 4, generator=g)
    assert FSP()(same, s2, same, t2).item() == pytest.approx(fsp_reference(same, s2, same, t2),
                                                           rel=1e-5)


def test_registry_defaults_and_flags():
    method = METHODS['fsp']
    # lambda_kd's default: its effect on a run is checked in tests/test_train_kd.py (SEED_DEFAULTS)
    ctx = make_context('fsp', student=resnet20())
    assert [p.epochs for p in method.build(ctx).pretrain_phases(ctx)] == [50]  # the seed's 50
    assert method.flags['init_epochs'].type is int


def test_distiller_forward_matches_reference_and_gradients():
    distiller = METHODS['fsp'].build(make_context('fsp'))
    assert isinstance(distiller, Distiller)
    s, s_leaves = make_features(batch=2, seed=0, requires_grad=True)
    t, t_leaves = make_features(batch=2, seed=1, requires_grad=True)
    loss = distiller(s, t, None)
    assert loss.dim() == 0 and torch.isfinite(loss)
    expected = np.mean([fsp_reference(getattr(s, a)[1], getattr(s, b)[1],
                                      getattr(t, a)[1], getattr(t, b)[1]) for a, b in PAIRS])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    for key in ('stem', 'rb1', 'rb2', 'rb3'):  # post = relu(pre leaf)
        assert s_leaves[key].grad.abs().sum() > 0
    assert all(leaf.grad is None for leaf in t_leaves.values())


def test_config_error_on_channel_mismatch():
    ctx = make_context('fsp')
    ctx.teacher_shapes = {**ctx.teacher_shapes, 'rb3': (128, 8, 8)}
    with pytest.raises(ConfigError, match='rb3'):
        METHODS['fsp'].build(ctx)
    # the message names both shapes
    with pytest.raises(ConfigError, match=r'rb3 channels differ \(\(64, 8, 8\) vs \(128, 8, 8\)\)'):
        METHODS['fsp'].build(ctx)


def test_four_stages_give_four_pairs_and_sizes_may_differ():
    """vgg-like networks: (stem, rb1), ..., (rb3, rb4); the teacher's maps may be
    larger in space (each network's matrices are its own), not wider."""
    from network import Features4
    s_shapes = {'stem': (3, 8, 8), 'rb1': (4, 4, 4), 'rb2': (5, 2, 2), 'rb3': (6, 2, 2),
                'rb4': (6, 1, 1), 'feat': (6,), 'out': (10,)}
    t_shapes = {**s_shapes, 'rb1': (4, 8, 8), 'rb4': (6, 2, 2)}
    ctx = make_context('fsp')
    ctx.student_shapes, ctx.teacher_shapes = s_shapes, t_shapes
    distiller = METHODS['fsp'].build(ctx)
    keys = ('stem', 'rb1', 'rb2', 'rb3', 'rb4')
    assert distiller.kd.pairs == tuple(zip(keys[:-1], keys[1:]))
    g = torch.Generator().manual_seed(7)

    def features(shapes):
        maps = [torch.relu(torch.randn(2, *shapes[k], generator=g)) for k in keys]
        return Features4(*[(m, m) for m in maps], torch.randn(2, 6), torch.randn(2, 10))

    s, t = features(s_shapes), features(t_shapes)
    expected = np.mean([fsp_reference(getattr(s, a)[1], getattr(s, b)[1], getattr(t, a)[1],
                                      getattr(t, b)[1]) for a, b in zip(keys[:-1], keys[1:])])
    assert distiller(s, t, None).item() == pytest.approx(expected, rel=1e-5)
