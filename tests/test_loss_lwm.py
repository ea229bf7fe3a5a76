"""LwM: L1 between L2-normalised gradient-weighted CAMs at a feature map.

Tiny explicit heads give the gradient of the target logit w.r.t. the map in
closed form:
linear  out_k = sum A[k] * fm        -> grad = A[y]
square  out_k = sum A[k] * fm^2 / 2  -> grad = A[y] * fm
"""
import math

import numpy as np
import pytest
import torch

from conftest import make_context
from dataset import Batch
from kd_losses import METHODS, Distiller, LwM
from network import resnet20

B, CH, H, W, K = 4, 3, 3, 2, 5  # batch, channels, height, width, classes


def feature_map(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, CH, H, W, generator=g, dtype=torch.float64).requires_grad_(True)


def head(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(K, CH, H, W, generator=g, dtype=torch.float64).requires_grad_(True)


def linear(fm, a):
    return torch.einsum('bchw,kchw->bk', fm, a)


def square(fm, a):
    return torch.einsum('bchw,kchw->bk', fm ** 2 / 2, a)


def cam(grad):
    """One sample's [C, H, W] gradient -> normalised CAM, with explicit loops."""
    c, h, w = grad.shape
    out = np.zeros(h * w)
    for i in range(h):
        for j in range(w):
            out[i * w + j] = max(0.0, sum(grad[k].mean() * grad[k, i, j] for k in range(c)))
    return out / max(np.linalg.norm(out), 1e-12)


def expected_loss(grads_s, grads_t):
    diffs = [np.abs(cam(gs) - cam(gt)) for gs, gt in zip(grads_s, grads_t)]
    return np.concatenate(diffs).mean()


def test_linear_heads_closed_form():
    fm_s, fm_t, a_s, a_t = feature_map(0), feature_map(1), head(2), head(3)
    target = torch.tensor([0, 4, 2, 2])
    loss = LwM()(linear(fm_s, a_s), fm_s, linear(fm_t, a_t), fm_t, target)
    y = target.numpy()
    want = expected_loss(a_s.detach().numpy()[y], a_t.detach().numpy()[y])
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_square_heads_closed_form_depends_on_map():
    fm_s, fm_t, a_s, a_t = feature_map(4), feature_map(5), head(6), head(7)
    target = torch.tensor([1, 3, 3, 0])
    loss = LwM()(square(fm_s, a_s), fm_s, square(fm_t, a_t), fm_t, target)
    y = target.numpy()
    want = expected_loss(a_s.detach().numpy()[y] * fm_s.detach().numpy(),
                         a_t.detach().numpy()[y] * fm_t.detach().numpy())
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_hand_checkable_values():
    # one channel, 2x2 map. Student gradient [1, -1, 2, 0]: weight 0.5, CAM
    # relu(0.5 * g) = [0.5, 0, 1, 0] -> [1, 0, 2, 0] / sqrt(5). Teacher gradient
    # all ones: CAM uniform -> 0.5 everywhere.
    fm = torch.zeros(1, 1, 2, 2, requires_grad=True)
    a_s = torch.tensor([1.0, -1.0, 2.0, 0.0]).view(1, 1, 2, 2)
    a_t = torch.ones(1, 1, 2, 2)
    loss = LwM()(linear(fm, a_s), fm, linear(fm, a_t), fm, torch.tensor([0]))
    r5 = math.sqrt(5)
    want = (abs(1 / r5 - 0.5) + 0.5 + abs(2 / r5 - 0.5) + 0.5) / 4
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_gradient_sign_cancels_and_identical_nets_give_zero():
    fm = feature_map(8)
    a = head(9)
    target = torch.tensor([0, 1, 2, 3])
    # flipping the sign of the gradient leaves w_c * grad_c unchanged
    loss = LwM()(square(fm, -a), fm, square(fm, a), fm, target)
    assert loss.item() == pytest.approx(0, abs=1e-12)
    assert LwM()(square(fm, a), fm, square(fm, a), fm, target).item() == pytest.approx(0, abs=1e-12)


def test_gradients_reach_student_not_teacher():
    fm_s, fm_t, a_s, a_t = feature_map(10), feature_map(11), head(12), head(13)
    target = torch.tensor([4, 3, 2, 1])
    loss = LwM()(square(fm_s, a_s), fm_s, square(fm_t, a_t), fm_t, target)
    assert torch.isfinite(loss)
    loss.backward()
    assert a_s.grad is not None and a_s.grad.abs().sum() > 0    # through create_graph
    assert fm_s.grad is not None and fm_s.grad.abs().sum() > 0  # the CAM depends on the map
    assert a_t.grad is None and fm_t.grad is None                # teacher CAM detached


def test_registry_entry_and_distiller_on_resnets():
    method = METHODS['lwm']
    # lambda_kd's default: its effect on a run is checked in tests/test_train_kd.py (SEED_DEFAULTS)
    assert not method.flags
    distiller = method.build(make_context('lwm'))
    assert isinstance(distiller, Distiller) and distiller.teacher_grad
    assert distiller.learnable_parameters() == [] and distiller.kd_weight(5, 200) == 1.0

    torch.manual_seed(0)
    student, teacher = resnet20().train(), resnet20().eval().requires_grad_(False)
    img = torch.randn(2, 3, 8, 8).requires_grad_(True)  # as train_kd.py does for teacher_grad
    s, t = student(img), teacher(img)
    target = torch.tensor([1, 8])
    loss = distiller(s, t, Batch(img, target, torch.arange(2)))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    s2, t2 = student(img), teacher(img)  # fresh graphs: the teacher's is freed once used
    direct = LwM()(s2.out, s2.rb2[1], t2.out, t2.rb2[1], target)
    assert loss.item() == pytest.approx(direct.item(), rel=1e-5)  # it reads rb2 post
    loss.backward()
    grads = [p.grad for p in student.res3.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------- across shapes

def test_the_larger_cam_is_pooled_to_the_smaller_before_normalising():
    """Student map 4x4 (linear head: gradient A[y]), teacher map 2x2: the
    student's ReLU'd CAM is averaged over 2x2 blocks, then normalised."""
    g = torch.Generator().manual_seed(14)
    fm_s = torch.randn(B, 5, 4, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    a_s = torch.randn(K, 5, 4, 4, generator=g, dtype=torch.float64)
    fm_t = torch.randn(B, CH, 2, 2, generator=g, dtype=torch.float64).requires_grad_(True)
    a_t = torch.randn(K, CH, 2, 2, generator=g, dtype=torch.float64)
    target = torch.tensor([0, 1, 4, 2])
    loss = LwM()(linear(fm_s, a_s), fm_s, linear(fm_t, a_t), fm_t, target)
    y = target.numpy()
    grads_s, grads_t = a_s.numpy()[y], a_t.numpy()[y]
    diffs = []
    for gs, gt in zip(grads_s, grads_t):
        raw = np.maximum((gs.mean(axis=(1, 2))[:, None, None] * gs).sum(axis=0), 0.0)  # [4, 4]
        pooled = raw.reshape(2, 2, 2, 2).mean(axis=(1, 3)).ravel()
        diffs.append(np.abs(pooled / max(np.linalg.norm(pooled), 1e-12) - cam(gt)))
    assert loss.item() == pytest.approx(np.concatenate(diffs).mean(), rel=1e-6)


def test_distiller_reads_the_penultimate_stage_of_four():
    ctx = make_context('lwm')
    four = {'stem': (4, 8, 8), 'rb1': (4, 8, 8), 'rb2': (6, 4, 4), 'rb3': (8, 2, 2),
            'rb4': (8, 2, 2), 'feat': (8,), 'out': (10,)}
    ctx.student_shapes = ctx.teacher_shapes = four
    assert METHODS['lwm'].build(ctx).key == 'rb3'
    assert METHODS['lwm'].build(make_context('lwm')).key == 'rb2'  # the seed's, of three
