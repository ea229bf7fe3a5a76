"""SimKD: the projector and MSE against a float64 numpy computation; the
wrapper that classifies with the teacher's frozen classifier (forward,
state dict, evaluation, model_best reload); shapes across families; a
train_kd run: the projector trains, is saved with the student and resumes
bitwise."""
import argparse

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from checkpoints import strip_prefixes
from conftest import (assert_same_run, distill_argv, make_context, metrics_rows,
                      run_capturing_distiller, shaped_features, stop_after_first_epoch_then_resume)
from dataset import Batch, make_loaders
from kd_losses import METHODS, ConfigError, SimKD, SimKDStudent
from network import Features, build_network
from reference import np_, conv1x1, conv3x3, batchnorm, avg_pool
from utils import evaluate

MODE = 'simkd'


# ----------------------------------------------------------------------------- numpy reference

def projector_reference(proj, x):
    relu = lambda v: np.maximum(v, 0)  # noqa: E731
    x = relu(batchnorm(proj[1], conv1x1(proj[0], x)))
    x = relu(batchnorm(proj[4], conv3x3(proj[3], x)))
    return relu(batchnorm(proj[7], conv1x1(proj[6], x)))


def simkd_reference(distiller, fm_s, fm_t, head):
    """(loss, logits) by the formula: align sizes, project, MSE; teacher head on the mean."""
    s, t = np_(fm_s), np_(fm_t)
    if s.shape[2] > t.shape[2]:
        s = avg_pool(s, t.shape[2:])
    elif s.shape[2] < t.shape[2]:
        t = avg_pool(t, s.shape[2:])
    projected = projector_reference(distiller.parts[0], s)
    logits = projected.mean(axis=(2, 3)) @ np_(head.weight).T + np_(head.bias)
    return np.mean((projected - t) ** 2), logits


# ----------------------------------------------------------------------------- tiny set-up

class Teacher(nn.Module):
    """Only what SimKD reads of the teacher: its classifier."""

    def __init__(self, channels, num_class=5):
        super().__init__()
        self.head = nn.Linear(channels, num_class)


def shapes_with(last, num_class=5):
    return {'stem': (2, 8, 8), 'rb1': (2, 8, 8), 'rb2': (2, 4, 4), 'rb3': last, 'feat': (last[0],),
            'out': (num_class,)}


def tiny_context(s_last, t_last, factor=2):
    ctx = make_context(MODE, {'simkd_factor': factor}, num_class=5, teacher=Teacher(t_last[0]))
    ctx.student_shapes, ctx.teacher_shapes = shapes_with(s_last), shapes_with(t_last)
    return ctx


@pytest.mark.parametrize('s_last, t_last', [((3, 4, 4), (6, 2, 2)),    # student pooled
                                            ((3, 2, 2), (6, 4, 4)),    # teacher pooled
                                            ((5, 3, 3), (4, 3, 3))])   # same size
def test_loss_matches_reference(s_last, t_last):
    torch.manual_seed(0)
    ctx = tiny_context(s_last, t_last)
    distiller = METHODS[MODE].build(ctx)
    s, _ = shaped_features(ctx.student_shapes, 4, seed=1)
    t, _ = shaped_features(ctx.teacher_shapes, 4, seed=2)
    loss = distiller(s, t, None)
    expected, _ = simkd_reference(distiller, s.rb3[1], t.rb3[1], ctx.teacher.head)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected, rel=1e-5)
    mid = t_last[0] // 2
    assert [m.weight.shape for m in distiller.parts[0] if isinstance(m, nn.Conv2d)] == [
        (mid, s_last[0], 1, 1), (mid, mid, 3, 3), (t_last[0], mid, 1, 1)]


def test_gradients_reach_the_projector_and_the_student():
    ctx = tiny_context((3, 4, 4), (6, 2, 2))
    distiller = METHODS[MODE].build(ctx)
    s, s_leaves = shaped_features(ctx.student_shapes, 4, seed=1, requires_grad=True)
    t, t_leaves = shaped_features(ctx.teacher_shapes, 4, seed=2, requires_grad=True)
    distiller(s, t, None).backward()
    for name, p in distiller.parts[0].named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert s_leaves['rb3'].grad.abs().sum() > 0
    assert all(leaf.grad is None for leaf in t_leaves.values())
    assert all(p.grad is None for p in distiller.parts[1].parameters())  # the frozen head


# ----------------------------------------------------------------------------- the wrapper

def resnet_wrapper(seed=0):
    torch.manual_seed(seed)
    student, teacher = build_network('resnet20', 10), build_network('resnet8x4', 10)
    ctx = make_context(MODE, student=student, teacher=teacher)
    ctx.student_shapes, ctx.teacher_shapes = student.feature_shapes, teacher.feature_shapes
    distiller = METHODS[MODE].build(ctx)
    return distiller, distiller.wrap_student(student), student, teacher


def test_wrapper_classifies_with_the_teachers_frozen_classifier():
    distiller, model, student, teacher = resnet_wrapper()
    assert isinstance(distiller, SimKD) and isinstance(model, SimKDStudent)
    # the projector moved from the distiller into the wrapper
    assert list(distiller.parameters()) == [] and distiller.state_dict() == {}
    assert distiller.learnable_parameters() == []
    keys = set(model.state_dict())
    assert set(student.state_dict()) < keys
    added = {k.split('.')[0] for k in keys - set(student.state_dict())}
    assert added == {'simkd_projector', 'simkd_head'}
    assert all(a is b for a, b in zip(student.parameters(), list(model.parameters())))
    assert torch.equal(model.simkd_head.weight, teacher.head.weight)
    assert model.simkd_head is not teacher.head and not model.simkd_head.weight.requires_grad

    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    assert isinstance(out, Features) and out.projected.shape == (3, 256, 8, 8)
    fm = student(x).rb3[1]  # train mode: the same batch statistics
    _, logits = simkd_reference(distiller, fm, torch.zeros(3, 256, 8, 8), model.simkd_head)
    assert np.allclose(np_(out.out), logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out.out, student.fc(out.feat))  # not the student's own classifier
    assert torch.equal(out.rb3[1], fm)  # the student's features otherwise
    # the distiller's loss reads the projected map the wrapper carries
    t = teacher(x)
    assert distiller(out, t, None).item() == pytest.approx(
        F.mse_loss(out.projected, t.rb3[1]).item(), rel=1e-6)

    F.cross_entropy(out.out, torch.tensor([0, 1, 2])).backward()
    assert model.simkd_head.weight.grad is None
    assert all(p.grad is not None for p in model.simkd_projector.parameters())
    assert student.conv1.weight.grad is not None and student.fc.weight.grad is None

    model.eval()
    assert not student.training and not model.simkd_projector.training
    model.train()
    assert student.training and all(m.training for m in student.modules())


class ListLoader(list):
    device = torch.device('cpu')


def test_evaluate_uses_the_teachers_classifier():
    _, model, student, _ = resnet_wrapper()
    with torch.no_grad():  # the reused classifier always says class 3
        model.simkd_head.weight.zero_()
        model.simkd_head.bias.copy_(torch.arange(10.0) == 3)
    g = torch.Generator().manual_seed(0)
    target = torch.tensor([3, 1, 3, 0, 3, 2])
    loader = ListLoader([Batch(torch.randn(6, 3, 32, 32, generator=g), target, torch.arange(6))])
    result = evaluate(model, loader)
    assert result['top1'] == pytest.approx(50.0)
    expected_loss = F.cross_entropy(torch.eye(10)[[3] * 6], target).item()
    assert result['loss'] == pytest.approx(expected_loss, rel=1e-5)
    assert evaluate(student, loader)['loss'] != pytest.approx(expected_loss, rel=1e-3)


# ----------------------------------------------------------------------------- registry and shapes

def test_registry_entry():
    method = METHODS[MODE]
    assert method.defaults == {'lambda_kd': 1.0, 'ce_weight': 0.0, 'simkd_factor': 2}
    assert method.defaults_for('cifar100')['ce_weight'] == 0.0
    assert method.flags['simkd_factor'].type is int and method.flags['simkd_factor'].positive


def network_context(s_name, t_name):
    s, t = build_network(s_name, 100), build_network(t_name, 100)
    ctx = make_context(MODE, num_class=100, student=s, teacher=t)
    ctx.student_shapes, ctx.teacher_shapes = s.feature_shapes, t.feature_shapes
    return ctx


@pytest.mark.parametrize('s_name, t_name, projected', [
    ('resnet20', 'resnet20', (64, 8, 8)), ('resnet8x4', 'resnet32x4', (256, 8, 8)),
    ('ShuffleV1', 'wrn_40_2', (128, 4, 4)), ('MobileNetV2', 'vgg13', (512, 2, 2))])
def test_network_pairs_forward_backward(s_name, t_name, projected):
    ctx = network_context(s_name, t_name)
    distiller = METHODS[MODE].build(ctx)
    s, s_leaves = shaped_features(ctx.student_shapes, 2, seed=0, requires_grad=True)
    t, _ = shaped_features(ctx.teacher_shapes, 2, seed=1)
    loss = distiller(s, t, None)
    assert distiller.project(s).shape[1:] == projected
    loss.backward()
    last = [k for k in ctx.student_shapes if k.startswith('rb')][-1]
    assert s_leaves[last].grad.abs().sum() > 0


def test_config_errors():
    for s_name, t_name in (('resnet20', 'ShuffleV2'), ('resnet20', 'MobileNetV2')):
        with pytest.raises(ConfigError, match="teacher's classifier reads"):
            METHODS[MODE].build(network_context(s_name, t_name))
    with pytest.raises(ConfigError, match='--simkd_factor'):
        METHODS[MODE].build(tiny_context((3, 4, 4), (6, 2, 2), factor=7))
    with pytest.raises(ConfigError, match='teacher'):
        METHODS[MODE].build(make_context(MODE))


def test_float32_under_bf16_autocast_and_channels_last():
    ctx = tiny_context((3, 4, 4), (6, 2, 2))
    torch.manual_seed(0)
    distiller = METHODS[MODE].build(ctx)
    s, _ = shaped_features(ctx.student_shapes, 4, seed=1)
    t, _ = shaped_features(ctx.teacher_shapes, 4, seed=2)
    reference = distiller(s, t, None).item()
    distiller.to(memory_format=torch.channels_last)
    rb3 = tuple(x.contiguous(memory_format=torch.channels_last) for x in s.rb3)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = distiller(s._replace(rb3=rb3), t, None)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(reference, rel=0.05)


# ----------------------------------------------------------------------------- train_kd

def kd_argv(base_run, root, note, epochs):
    return distill_argv(base_run, root, note, MODE, epochs, 50, ['--seed', '3'])


def test_train_kd_trains_saves_and_resumes_the_wrapper(base_run, tmp_path, monkeypatch):
    initial = run_capturing_distiller(monkeypatch, MODE, kd_argv(base_run, tmp_path, 'straight', 2))
    run_dir = tmp_path / 'straight'
    ckpt = torch.load(run_dir / 'checkpoint.pth.tar', weights_only=True)
    net = strip_prefixes(ckpt['net'])
    assert ckpt['distiller'] == {}
    teacher_fc = strip_prefixes(torch.load(base_run['best'], weights_only=True)['net'])
    assert torch.equal(net['simkd_head.weight'], teacher_fc['fc.weight'])  # frozen
    assert torch.equal(net['simkd_head.bias'], teacher_fc['fc.bias'])
    for name, value in initial.items():
        assert name.startswith(('projector.', 'head.'))
        if name.startswith('projector.') and name.endswith('weight'):
            assert not torch.equal(net['simkd_' + name], value), f'{name} did not train'
    log = (run_dir / 'log.txt').read_text()
    assert 'ce_weight = 0.0 (default for simkd on cifar10)' in log
    rows = metrics_rows(run_dir)

    # model_best.pth.tar loads into a fresh wrapper, whose evaluation is the logged one
    best = torch.load(run_dir / 'model_best.pth.tar', weights_only=True)
    _, model, _, _ = fresh_resnet20_wrapper()
    model.load_state_dict(strip_prefixes(best['net']))
    args = argparse.Namespace(data_name='cifar10', img_root=base_run['img_root'], no_download=True,
                              eval_batch_size=1000, channels_last=False)
    _, test_loader = make_loaders(args, torch.device('cpu'), log=lambda *a: None, training=False)
    result = evaluate(model, test_loader)
    row = rows[best['epoch'] - 1]
    assert result['top1'] == pytest.approx(float(row['test_top1']))
    assert result['loss'] == pytest.approx(float(row['test_loss']), rel=1e-4)

    stop_after_first_epoch_then_resume(monkeypatch, kd_argv(base_run, tmp_path, 'resumed', 2))
    assert_same_run(tmp_path / 'straight', tmp_path / 'resumed')


def fresh_resnet20_wrapper():
    student, teacher = build_network('resnet20', 10), build_network('resnet20', 10)
    ctx = make_context(MODE, student=student, teacher=teacher)
    distiller = METHODS[MODE].build(ctx)
    return distiller, distiller.wrap_student(student), student, teacher
