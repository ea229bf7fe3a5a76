"""The two-phase schedule AB and FSP share (kd_losses/_two_phase.py): a
KD-only initialisation of the student, then cross-entropy only."""
import pytest
import torch

from conftest import make_context, make_features
from dataset import Batch
from kd_losses import METHODS
from network import resnet20

MODES = ['ab', 'fsp']


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('init_epochs, expected', [
    (50, [0.1] * 30 + [0.01] * 10 + [0.001] * 10),   # the seed's schedule
    (20, [0.1] * 12 + [0.01] * 4 + [0.001] * 4),
    (10, [0.1] * 6 + [0.01] * 2 + [0.001] * 2),
    (5, [0.1] * 3 + [0.01] + [0.001]),
    (2, [0.1, 0.01]),
    (1, [0.1]),
])
def test_init_stage_epochs_and_lr(mode, init_epochs, expected):
    ctx = make_context(mode, {'init_epochs': init_epochs}, student=resnet20())
    stages = METHODS[mode].build(ctx).pretrain_phases(ctx)
    assert [st.name for st in stages] == ['init']
    assert stages[0].epochs == init_epochs and stages[0].needs_student
    assert [stages[0].lr_scale(e) for e in range(1, init_epochs + 1)] == pytest.approx(expected)


@pytest.mark.parametrize('mode', MODES)
def test_init_stage_trains_exactly_the_student(mode):
    student, teacher = resnet20(), resnet20()
    ctx = make_context(mode, student=student, teacher=teacher)
    distiller = METHODS[mode].build(ctx)
    stage = distiller.pretrain_phases(ctx)[0]
    assert [id(p) for p in stage.params] == [id(p) for p in student.parameters()]
    assert student in list(stage.train_modules)
    assert list(distiller.parameters()) == []  # nothing of its own to learn

    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = Batch(img, torch.tensor([0, 1]), torch.tensor([0, 1]))
    with torch.no_grad():
        t = teacher(img)
    loss = stage.loss(student(img), t, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert student.conv1.weight.grad.abs().sum() > 0
    assert student.res1[0].conv1.weight.grad.abs().sum() > 0
    assert student.fc.weight.grad is None  # no cross-entropy: the classifier is untouched


@pytest.mark.parametrize('mode', MODES)
def test_init_stage_loss_is_lambda_times_kd(mode):
    ctx = make_context(mode, {'lambda_kd': 2.5}, student=resnet20())
    distiller = METHODS[mode].build(ctx)
    s, _ = make_features(batch=2, seed=3)
    t, _ = make_features(batch=2, seed=4)
    stage = distiller.pretrain_phases(ctx)[0]
    assert stage.loss(s, t, None).item() == pytest.approx(2.5 * distiller(s, t, None).item(),
                                                          rel=1e-6)


@pytest.mark.parametrize('mode', MODES)
def test_main_stage_is_ce_only(mode):
    distiller = METHODS[mode].build(make_context(mode))
    assert all(distiller.kd_weight(e, 200) == 0 for e in range(1, 201))
    assert all(distiller.kd_weight(e, 3) == 0 for e in range(1, 4))


@pytest.mark.parametrize('mode', MODES)
def test_init_stage_needs_the_student(mode):
    ctx = make_context(mode)
    with pytest.raises(ValueError, match='student'):
        METHODS[mode].build(ctx).pretrain_phases(ctx)
