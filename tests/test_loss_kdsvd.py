"""KDSVD against independent computations: a hand-worked case, a float64
numpy implementation of the official algorithm (SVD, alignment to the
teacher's vectors, RBF relations of consecutive stages), the exact SVD
gradient (against torch's autograd and finite differences, also where
repeated zero singular values make torch's own backward give NaN), and the
registry entry.

Per sample, a map [C, H, W] is the matrix X [HW, C] = U S V^T. With the
first k+1 right singular vectors of each net, the teacher's first k
singular values s normalised to unit norm:
  a_t[:, j] = s_j v_t,j;  a_s[:, j] = s_j v_s,b(j), b(j) = argmax_i |v_s,i . v_t,j|,
  a_t[:, j] flipped where a_s[:, j] . a_t[:, j] < 0;
  loss = sum over stage pairs (l, l+1) of sqrt(k)/2 sum_{c, c', j}
         (exp(-(a_s,l[c, j] - a_s,l+1[c', j])^2 / 8) - the same for a_t)^2, / batch.
"""
import math

import numpy as np
import pytest
import torch

from conftest import make_context, make_features
from kd_losses import KDSVD, METHODS, ConfigError, Distiller
from kd_losses.kdsvd import _RightSingularVectors, right_singular_vectors


def as_matrices(fm):
    """[B, HW, C] float64 numpy."""
    f = fm.detach().double().numpy()
    return f.reshape(f.shape[0], f.shape[1], -1).transpose(0, 2, 1)


def kdsvd_reference(fms_s, fms_t, k):
    """The loss in float64 numpy. The student's singular vectors take the signs
    torch chose (the loss depends on them, as the official one does)."""
    batch = fms_s[0].shape[0]
    stages = []
    for fm_s, fm_t in zip(fms_s, fms_t):
        v_torch, _ = right_singular_vectors(fm_s.detach(), min(k + 1, fm_s.shape[1], fm_s.shape[2] * fm_s.shape[3]))
        per_sample = []
        for b in range(batch):
            entry = {}
            for who, fm in (('s', fm_s), ('t', fm_t)):
                x = as_matrices(fm)[b]
                _, s, vh = np.linalg.svd(x, full_matrices=False)
                m = min(k + 1, x.shape[0], x.shape[1])
                v = vh[:m].T.copy()
                if who == 's':
                    for j in range(m):
                        if v[:, j] @ v_torch[b, :, j].double().numpy() < 0:
                            v[:, j] *= -1
                entry[who] = (v, s[:m])
            per_sample.append(entry)
        stages.append(per_sample)
    total = 0.0
    for l in range(len(stages) - 1):
        for b in range(batch):
            a, z = stages[l][b], stages[l + 1][b]
            n = min(k, a['s'][0].shape[1], z['s'][0].shape[1], a['t'][0].shape[1], z['t'][0].shape[1])
            aligned = []
            for entry in (a, z):
                (v_s, _), (v_t, s_t) = entry['s'], entry['t']
                w = s_t[:n] / math.sqrt(sum(x * x for x in s_t[:n]))
                al_s, al_t = np.zeros((v_s.shape[0], n)), np.zeros((v_t.shape[0], n))
                for j in range(n):
                    best = max(range(v_s.shape[1]), key=lambda i: abs(v_s[:, i] @ v_t[:, j]))
                    al_s[:, j], al_t[:, j] = v_s[:, best] * w[j], v_t[:, j] * w[j]
                    if al_s[:, j] @ al_t[:, j] < 0:
                        al_t[:, j] *= -1
                aligned.append((al_s, al_t))
            (s_top, t_top), (s_bot, t_bot) = aligned
            pair = 0.0
            for c in range(s_top.shape[0]):
                for c2 in range(s_bot.shape[0]):
                    for j in range(n):
                        rs = math.exp(-(s_top[c, j] - s_bot[c2, j]) ** 2 / 8)
                        rt = math.exp(-(t_top[c, j] - t_bot[c2, j]) ** 2 / 8)
                        pair += (rs - rt) ** 2
            total += 0.5 * math.sqrt(n) * pair
    return total / batch


def random_maps(seed, batch=3, shapes=((4, 6, 6), (6, 3, 3), (12, 2, 2)), relu=True):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn((batch, *s), generator=g) for s in shapes]
    return [m.relu() for m in maps] if relu else maps


# ----------------------------------------------------------------------------- the loss

def test_hand_case():
    # Stage 1 (2 channels, 2 positions): X = diag(3, 1) for both nets: first right singular
    # vector +-e1, the teacher's singular values (3, 1) -> weight 1 for k = 1.
    # Stage 2: student X = [[0, 2], [1, 0]]: X^T X = diag(1, 4), vectors (e2, e1); the
    # teacher's first vector is u = (cos t, sin t), t = 0.3, so the student's e1 is chosen.
    t = 0.3
    rot = torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])

    def fm(x):  # [HW, C] -> [1, C, HW, 1]
        return x.t().reshape(1, 2, 2, 1)
    stage1 = fm(torch.diag(torch.tensor([3.0, 1.0])))
    student2 = fm(torch.tensor([[0.0, 2.0], [1.0, 0.0]]))
    teacher2 = fm(torch.diag(torch.tensor([2.0, 1.0])) @ rot.t())  # right singular vectors: rot's columns
    loss = KDSVD(1)([stage1, student2], [stage1, teacher2]).item()
    v1, _ = right_singular_vectors(stage1, 2)
    v2, _ = right_singular_vectors(student2, 2)
    assert v1[0, :, 0].abs().tolist() == pytest.approx([1, 0], abs=1e-6)
    assert v2[0, :, 1].abs().tolist() == pytest.approx([1, 0], abs=1e-6)
    rho = (v1[0, 0, 0] * v2[0, 0, 1]).sign().item()  # the relative sign torch chose
    # student vectors sigma1 e1 and sigma2 e1, the teacher's sigma1 e1 and sigma2 u (signs matched)
    d_s = [[(1 - rho) ** 2, 1.0], [1.0, 0.0]]
    u = (math.cos(t), math.sin(t))
    d_t = [[(1 - rho * u[0]) ** 2, (1 - rho * u[1]) ** 2], [u[0] ** 2, u[1] ** 2]]
    want = 0.5 * sum((math.exp(-d_s[c][c2] / 8) - math.exp(-d_t[c][c2] / 8)) ** 2
                     for c in range(2) for c2 in range(2))
    assert loss == pytest.approx(want, rel=1e-5)
    assert want > 1e-4


@pytest.mark.parametrize('k', [1, 2])
@pytest.mark.parametrize('seed', [0, 1])
def test_matches_reference(k, seed):
    fms_s, fms_t = random_maps(seed), random_maps(seed + 100)
    got = KDSVD(k)(fms_s, fms_t)
    assert got.dim() == 0 and got.dtype == torch.float32
    assert got.item() == pytest.approx(kdsvd_reference(fms_s, fms_t, k), rel=1e-4)


def test_teacher_maps_may_have_other_spatial_sizes():
    fms_s = random_maps(2)
    fms_t = random_maps(3, shapes=((4, 3, 3), (6, 4, 4), (12, 1, 3)))
    assert KDSVD(1)(fms_s, fms_t).item() == pytest.approx(kdsvd_reference(fms_s, fms_t, 1), rel=1e-4)


def test_identical_maps_give_zero_and_batch_mean():
    fms = random_maps(4)
    assert KDSVD(1)(fms, fms).item() == pytest.approx(0.0, abs=1e-10)
    fms_s, fms_t = random_maps(5), random_maps(6)
    one = KDSVD(1)([f[:1] for f in fms_s], [f[:1] for f in fms_t]).item()
    two = KDSVD(1)([torch.cat([f[:1], f[:1]]) for f in fms_s], [torch.cat([f[:1], f[:1]]) for f in fms_t]).item()
    assert two == pytest.approx(one, rel=1e-6)


def test_shape_errors():
    fms = random_maps(7)
    with pytest.raises(ValueError, match='channels'):
        KDSVD(1)(fms, [fms[0], fms[1], fms[2][:, :6]])
    with pytest.raises(ValueError, match='consecutive'):
        KDSVD(1)(fms[:1], fms[:1])


def test_float32_under_bf16_autocast():
    fms_s, fms_t = random_maps(8), random_maps(9)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mixed = KDSVD(1)([f.bfloat16() for f in fms_s], [f.bfloat16() for f in fms_t])
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)


# ----------------------------------------------------------------------------- the SVD's gradient

def gauge_free(v, weights):
    """A function of the singular vectors that does not depend on their signs."""
    return ((v.unsqueeze(2) * v.unsqueeze(1)) * weights).sum() + v.pow(4).sum()


@pytest.mark.parametrize('shape', [(3, 20, 6), (3, 7, 7), (2, 4, 9)])  # tall, square, wide
def test_gradient_is_torchs_exact_one(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    weights = torch.randn(1, shape[2], shape[2], 1, generator=g, dtype=torch.float64)
    a = x.clone().requires_grad_(True)
    v, _ = _RightSingularVectors.apply(a, 2)
    gauge_free(v, weights).backward()
    b = x.clone().requires_grad_(True)
    gauge_free(torch.linalg.svd(b, full_matrices=False)[2].mT[:, :, :2], weights).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_repeated_zero_singular_values_give_the_finite_exact_gradient():
    # two all-zero channels (dead ReLU channels): two zero singular values. torch's own
    # backward divides 0 by 0 there; the pairs both beyond the used vectors are left out
    # here, and the gradient matches central differences.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 12, 5, generator=g, dtype=torch.float64)
    x[:, :, 3:] = 0
    weights = torch.randn(1, 5, 5, 1, generator=g, dtype=torch.float64)
    b = x.clone().requires_grad_(True)
    gauge_free(torch.linalg.svd(b, full_matrices=False)[2].mT[:, :, :2], weights).backward()
    assert not torch.isfinite(b.grad).all()
    a = x.clone().requires_grad_(True)
    v, _ = _RightSingularVectors.apply(a, 2)
    gauge_free(v, weights).backward()
    assert torch.isfinite(a.grad).all()
    h = 1e-6
    numeric = torch.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        plus, minus = x.clone(), x.clone()
        plus[idx] += h
        minus[idx] -= h
        f = [gauge_free(torch.linalg.svd(p, full_matrices=False)[2].mT[:, :, :2], weights).item()
             for p in (plus, minus)]
        numeric[idx] = (f[0] - f[1]) / (2 * h)
    torch.testing.assert_close(a.grad, numeric, rtol=1e-5, atol=1e-6)


def test_loss_gradient_reaches_every_student_stage_and_is_finite():
    fms_s = [f.requires_grad_(True) for f in random_maps(10)]
    fms_t = [f.requires_grad_(True) for f in random_maps(11)]
    KDSVD(1)(fms_s, fms_t).backward()
    for f in fms_s:
        assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0
    assert all(f.grad is None for f in fms_t)


# ----------------------------------------------------------------------------- registry

def test_registry():
    for data in ('cifar10', 'cifar100'):
        a = make_context('kdsvd', data_name=data, num_class=100).args
        assert (a.lambda_kd, a.svd_k, a.ce_weight) == (1.0, 1, 1.0)
    assert METHODS['kdsvd'].flags['svd_k'].type is int
    ctx = make_context('kdsvd')
    ctx.teacher_shapes = {**ctx.teacher_shapes, 'rb2': (48, 16, 16)}
    with pytest.raises(ConfigError, match='rb2'):
        METHODS['kdsvd'].build(ctx)
    with pytest.raises(ConfigError, match='svd_k'):
        METHODS['kdsvd'].build(make_context('kdsvd', {'svd_k': 0}))


def test_distiller_reads_every_stage_post_activation_and_detaches_the_teacher():
    distiller = METHODS['kdsvd'].build(make_context('kdsvd'))
    assert isinstance(distiller, Distiller) and distiller.keys == ('rb1', 'rb2', 'rb3')
    assert list(distiller.learnable_parameters()) == []
    s, s_leaves = make_features(batch=2, seed=0, requires_grad=True)
    t, t_leaves = make_features(batch=2, seed=1, requires_grad=True)
    loss = distiller(s, t, None)
    want = kdsvd_reference([s.rb1[1], s.rb2[1], s.rb3[1]], [t.rb1[1], t.rb2[1], t.rb3[1]], 1)
    assert loss.item() == pytest.approx(want, rel=1e-4)
    loss.backward()
    for key in ('rb1', 'rb2', 'rb3'):
        assert s_leaves[key].grad.abs().sum() > 0 and t_leaves[key].grad is None
    assert s_leaves['stem'].grad is None and s_leaves['out'].grad is None
