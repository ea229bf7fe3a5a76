"""DML: KL(softmax(out2) || softmax(out1)), batch mean, against explicit loops;
exported by kd_losses but not a --kd_mode."""
import math

import pytest
import torch

import kd_losses
from kd_losses import DML, METHODS


def dml_reference(out1, out2):
    total = 0.0
    for row1, row2 in zip(out1.tolist(), out2.tolist()):
        z1, z2 = sum(math.exp(x) for x in row1), sum(math.exp(x) for x in row2)
        for a, b in zip(row1, row2):
            p1, p2 = math.exp(a) / z1, math.exp(b) / z2
            total += p2 * math.log(p2 / p1)
    return total / len(out1)


def test_dml_matches_reference():
    g = torch.Generator().manual_seed(0)
    out1, out2 = torch.randn(5, 10, generator=g), torch.randn(5, 10, generator=g)
    assert DML()(out1, out2).item() == pytest.approx(dml_reference(out1, out2), rel=1e-5)
    # KL is not symmetric: the direction matters
    assert DML()(out2, out1).item() == pytest.approx(dml_reference(out2, out1), rel=1e-5)
    assert dml_reference(out1, out2) != pytest.approx(dml_reference(out2, out1), rel=1e-3)


def test_dml_hand_cases():
    x = torch.randn(3, 4)
    assert DML()(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert DML()(x, x + 5.0).item() == pytest.approx(0.0, abs=1e-6)  # softmax ignores shifts
    # p2 = (1/2, 1/2), p1 = (1/(1+e), e/(1+e)): KL = sum_i p2_i log(p2_i / p1_i)
    out1, out2 = torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2)
    e = math.e
    expected = 0.5 * math.log(0.5 * (1 + e)) + 0.5 * math.log(0.5 * (1 + e) / e)
    assert DML()(out1, out2).item() == pytest.approx(expected, rel=1e-6)


def test_gradient_reaches_out1_only():
    out1 = torch.randn(4, 10, requires_grad=True)
    out2 = torch.randn(4, 10, requires_grad=True)
    loss = DML()(out1, out2)
    assert torch.isfinite(loss)
    loss.backward()
    assert out1.grad is not None and out1.grad.abs().sum() > 0
    assert out2.grad is None


def test_exported_but_not_a_kd_mode():
    assert 'DML' in kd_losses.dml.__all__ and kd_losses.DML is DML
    assert 'dml' not in METHODS
