"""Sobolev: MSE between L2-normalised input gradients of the target logit.

Tiny explicit models give the input gradients in closed form:
linear  out = x W^T + b        -> d out_y / d x = W[y]
square  out = (x*x/2) W^T      -> d out_y / d x = W[y] * x
"""
import numpy as np
import pytest
import torch

from conftest import make_context
from kd_losses import METHODS, Distiller, Sobolev
from network import resnet20

B, D, C = 5, 12, 4  # batch, input size (as an image [3, 2, 2]), classes


def image(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 2, 2, generator=g, dtype=torch.float64).requires_grad_(True)


def weights(seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(C, D, generator=g, dtype=torch.float64).requires_grad_(requires_grad)


def linear(x, w):
    return x.flatten(1) @ w.t() + 0.5


def square(x, w):
    return (x.flatten(1) ** 2 / 2) @ w.t()


def expected_loss(grads_s, grads_t):
    """grads_*: [B, D] numpy input gradients; MSE of per-sample L2-normalised rows."""
    total = 0.0
    for gs, gt in zip(grads_s, grads_t):
        ns, nt = gs / np.linalg.norm(gs), gt / np.linalg.norm(gt)
        total += ((ns - nt) ** 2).sum()
    return total / (len(grads_s) * grads_s.shape[1])


def test_linear_models_closed_form():
    x, ws, wt = image(0), weights(1), weights(2)
    target = torch.tensor([0, 1, 2, 3, 1])
    loss = Sobolev()(linear(x, ws), linear(x, wt), x, target)
    y = target.numpy()
    want = expected_loss(ws.detach().numpy()[y], wt.detach().numpy()[y])
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_square_models_closed_form_depends_on_input():
    x, ws, wt = image(3), weights(4), weights(5)
    target = torch.tensor([3, 0, 0, 2, 1])
    loss = Sobolev()(square(x, ws), square(x, wt), x, target)
    xn, y = x.detach().flatten(1).numpy(), target.numpy()
    want = expected_loss(ws.detach().numpy()[y] * xn, wt.detach().numpy()[y] * xn)
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_hand_checkable_values():
    # one sample, 2 inputs: student gradient (3, 4) -> (0.6, 0.8); teacher (1, 0)
    x = torch.zeros(1, 2, requires_grad=True)
    ws = torch.tensor([[3.0, 4.0]], requires_grad=True)
    wt = torch.tensor([[1.0, 0.0]])
    loss = Sobolev()(x @ ws.t(), x @ wt.t(), x, torch.tensor([0]))
    assert loss.item() == pytest.approx(((0.6 - 1) ** 2 + 0.8 ** 2) / 2, rel=1e-6)


def test_identical_and_rescaled_student_give_zero():
    x, w = image(6), weights(7)
    target = torch.tensor([1, 1, 0, 3, 2])
    # separate forwards of the same function; a scaled copy has the same normalised gradient
    assert Sobolev()(linear(x, w), linear(x, w), x, target).item() == pytest.approx(0, abs=1e-12)
    assert Sobolev()(square(x, 3 * w), square(x, w), x, target).item() == pytest.approx(0, abs=1e-12)


def test_gradients_reach_student_not_teacher():
    x, ws, wt = image(8), weights(9), weights(10)
    target = torch.tensor([0, 1, 2, 3, 0])
    loss = Sobolev()(square(x, ws), square(x, wt), x, target)
    assert torch.isfinite(loss)
    loss.backward()
    assert ws.grad is not None and ws.grad.abs().sum() > 0   # through create_graph
    assert x.grad is not None and x.grad.abs().sum() > 0     # student gradient depends on x
    assert wt.grad is None                                   # teacher side detached


def test_input_without_grad_is_a_clear_error():
    x = torch.randn(2, 3)
    w = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match='require grad'):
        Sobolev()(x @ w.t(), x @ w.t(), x, torch.tensor([0, 1]))


def test_registry_entry_and_distiller_on_resnets():
    method = METHODS['sobolev']
    # lambda_kd's default: its effect on a run is checked in tests/test_train_kd.py (SEED_DEFAULTS)
    assert not method.flags
    distiller = method.build(make_context('sobolev'))
    assert isinstance(distiller, Distiller) and distiller.teacher_grad
    assert distiller.learnable_parameters() == [] and distiller.kd_weight(1, 200) == 1.0

    torch.manual_seed(0)
    student, teacher = resnet20().train(), resnet20().eval().requires_grad_(False)
    img = torch.randn(2, 3, 8, 8).requires_grad_(True)  # as train_kd.py does for teacher_grad
    target = torch.tensor([3, 7])
    from dataset import Batch
    loss = distiller(student(img), teacher(img), Batch(img, target, torch.arange(2)))
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in teacher.parameters())
