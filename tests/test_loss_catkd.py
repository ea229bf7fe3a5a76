"""CAT-KD (class activation maps from the last stage and each network's
classifier weights, average-pooled, optionally normalised, MSE) against a
float64 numpy computation in the paper's order (CAMs first, then pooling);
shapes across families; a train_kd run that resumes bitwise."""

import numpy as np
import pytest
import torch
import torch.nn as nn

import train_kd
from conftest import (assert_same_run, bn_state, distill_argv, hook_head_maps, make_context, metrics_rows,
                      shaped_features, stop_after_first_epoch_then_resume)
from kd_losses import CATKD, METHODS, ConfigError
from network import ZooNetwork, build_network
from reference import np_, avg_pool

MODE = 'catkd'


def cat_reference(fm_s, w_s, fm_t, w_t, resolution, normalize):
    def cams(fm, w):
        cam = avg_pool(np.einsum('kc,bchw->bkhw', np_(w), np_(fm)), resolution)  # CAM, then pool
        if normalize:
            cam = cam / np.sqrt((cam ** 2).sum(axis=(2, 3), keepdims=True))
        return cam
    return np.mean((cams(fm_s, w_s) - cams(fm_t, w_t)) ** 2)


@pytest.mark.parametrize('resolution, normalize, s_size, t_size', [
    (2, False, 4, 4), (2, True, 8, 4), (4, True, 4, 8), (3, False, 7, 5), (1, False, 2, 8)])
def test_loss_matches_reference(resolution, normalize, s_size, t_size):
    g = torch.Generator().manual_seed(resolution)
    fm_s = torch.rand(3, 4, s_size, s_size, generator=g)
    fm_t = torch.rand(3, 6, t_size, t_size, generator=g)
    w_s, w_t = torch.randn(5, 4, generator=g), torch.randn(5, 6, generator=g)
    loss = CATKD(resolution, normalize)(fm_s, w_s, fm_t, w_t)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(cat_reference(fm_s, w_s, fm_t, w_t, resolution, normalize),
                                        rel=1e-5)


def test_hand_cases():
    # the same network on both sides: no loss
    fm, w = torch.rand(2, 3, 4, 4), torch.randn(5, 3)
    assert CATKD(2, False)(fm, w, fm, w).item() == 0.0
    # constant maps c, one channel, weights a and b: every pooled CAM entry is (a - b) c apart
    fm = torch.full((1, 1, 4, 4), 2.0)
    three, one = torch.tensor([[3.0]]), torch.tensor([[1.0]])
    assert CATKD(2, False)(fm, three, fm, one).item() == pytest.approx(16.0)
    # normalised, positive constant CAMs are all equal to 1/r: no loss whatever the scale
    assert CATKD(2, True)(fm, three, fm, one).item() == pytest.approx(0.0)


def shapes_with(last, num_class=5):
    return {'stem': (2, 8, 8), 'rb1': (2, 8, 8), 'rb2': (2, 4, 4), 'rb3': last, 'feat': (last[0],),
            'out': (num_class,)}


class Net(ZooNetwork):
    """Only what CAT-KD reads of a network: its classifier, and its head map,
    the base class's (the last stage's map, channels x size x size)."""

    def __init__(self, channels, num_class=5, size=4):
        super().__init__()
        self.head = nn.Linear(channels, num_class)
        self.shapes = shapes_with((channels, size, size), num_class)

    @property
    def feature_shapes(self):
        return self.shapes


def test_distiller_reads_both_classifiers_and_trains_the_students():
    student, teacher = Net(3), Net(4, size=8)
    teacher.requires_grad_(False)
    ctx = make_context(MODE, {'cat_resolution': 2, 'cat_normalize': True}, num_class=5,
                       student=student, teacher=teacher)
    ctx.student_shapes, ctx.teacher_shapes = shapes_with((3, 4, 4)), shapes_with((4, 8, 8))
    distiller = METHODS[MODE].build(ctx)
    assert list(distiller.parameters()) == [] and distiller.state_dict() == {}  # read, not owned
    s, s_leaves = shaped_features(ctx.student_shapes, 3, 0, requires_grad=True)
    t, t_leaves = shaped_features(ctx.teacher_shapes, 3, 1, requires_grad=True)
    loss = distiller(s, t, None)
    expected = cat_reference(s.rb3[1], student.head.weight, t.rb3[1], teacher.head.weight, 2, True)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert student.head.weight.grad.abs().sum() > 0 and student.head.bias.grad is None
    assert s_leaves['rb3'].grad.abs().sum() > 0
    assert all(leaf.grad is None for leaf in t_leaves.values())


def test_float32_under_bf16_autocast_and_channels_last():
    g = torch.Generator().manual_seed(0)
    fm_s, fm_t = torch.rand(3, 4, 8, 8, generator=g), torch.rand(3, 6, 4, 4, generator=g)
    w_s, w_t = torch.randn(5, 4, generator=g), torch.randn(5, 6, generator=g)
    reference = CATKD(2, False)(fm_s, w_s, fm_t, w_t).item()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = CATKD(2, False)(fm_s.contiguous(memory_format=torch.channels_last).bfloat16(), w_s,
                               fm_t, w_t)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(reference, rel=0.05)


def test_registry_entry():
    method = METHODS[MODE]
    assert method.defaults == {'lambda_kd': 0.7, 'cat_resolution': 2, 'cat_normalize': False}
    assert method.flags['cat_resolution'].type is int and method.flags['cat_resolution'].positive
    assert method.flags['cat_normalize'].type is bool


def network_context(s_name, t_name, **flags):
    student, teacher = build_network(s_name, 100), build_network(t_name, 100)
    ctx = make_context(MODE, flags, num_class=100, student=student, teacher=teacher)
    ctx.student_shapes, ctx.teacher_shapes = student.feature_shapes, teacher.feature_shapes
    return ctx


@pytest.mark.parametrize('s_name, t_name, flags', [
    ('resnet20', 'resnet20', {}), ('resnet8x4', 'resnet32x4', {}),
    ('ShuffleV1', 'wrn_40_2', {'cat_resolution': 4, 'cat_normalize': True}),
    ('vgg8', 'vgg13', {})])
def test_network_pairs_forward_backward(s_name, t_name, flags):
    ctx = network_context(s_name, t_name, **flags)
    distiller = METHODS[MODE].build(ctx)
    s, s_leaves = shaped_features(ctx.student_shapes, 2, 0, requires_grad=True)
    t, _ = shaped_features(ctx.teacher_shapes, 2, 1)
    distiller(s, t, None).backward()
    last = [k for k in ctx.student_shapes if k.startswith('rb')][-1]
    assert s_leaves[last].grad.abs().sum() > 0 and ctx.student.head.weight.grad is not None


@pytest.mark.parametrize('s_name, t_name, flags', [
    ('MobileNetV2', 'ShuffleV2', {'cat_resolution': 2, 'cat_normalize': True}),
    ('ShuffleV2', 'MobileNetV2', {'cat_resolution': 4, 'cat_normalize': False})])
def test_mobilenetv2_and_shufflev2_cams_come_from_their_extra_convs_map(s_name, t_name, flags):
    # their classifier averages the output of a 1x1 conv after the last stage
    # (the official CAT-KD networks apply the classifier to that map): the
    # CAMs are of that map, hooked here in the forward, in float64
    torch.manual_seed(0)
    student, teacher = build_network(s_name, 10).train(), build_network(t_name, 10).eval()
    teacher.requires_grad_(False)
    s_maps, t_maps = hook_head_maps(student), hook_head_maps(teacher)
    ctx = make_context(MODE, flags, num_class=10, student=student, teacher=teacher)
    ctx.student_shapes, ctx.teacher_shapes = student.feature_shapes, teacher.feature_shapes
    distiller = METHODS[MODE].build(ctx)
    img = torch.randn(3, 3, 32, 32)
    s = student(img)
    with torch.no_grad():
        t = teacher(img)
    before = bn_state(student)
    loss = distiller(s, t, None)
    assert all(torch.equal(a, b) for a, b in zip(before, bn_state(student)))  # counted once

    def cams(fm, head):
        r = flags['cat_resolution']
        fm = fm.detach().double()
        b, c, h, w = fm.shape
        if h < r:  # adaptive pooling to a larger grid repeats each position
            fm = fm.repeat_interleave(r // h, dim=2).repeat_interleave(r // w, dim=3)
        pooled = fm.reshape(b, c, r, fm.shape[2] // r, r, fm.shape[3] // r).mean(dim=(3, 5))
        cam = torch.einsum('kc,bcij->bkij', head.weight.detach().double(), pooled).reshape(b, -1, r * r)
        if flags['cat_normalize']:
            cam = cam / cam.norm(dim=2, keepdim=True).clamp_min(1e-12)
        return cam
    reference = ((cams(s_maps[0], student.head) - cams(t_maps[0], teacher.head)) ** 2).mean()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-4)
    loss.backward()  # the loss trains the student's extra conv and classifier
    conv = student.conv2[0] if s_name == 'MobileNetV2' else student.conv2
    assert conv.weight.grad.abs().sum() > 0 and student.head.weight.grad.abs().sum() > 0


def test_config_errors():
    with pytest.raises(ConfigError, match='classifiers'):
        METHODS[MODE].build(make_context(MODE))
    ctx = make_context(MODE, student=Net(64, 10), teacher=Net(64, 7))
    with pytest.raises(ConfigError, match='numbers of classes'):
        METHODS[MODE].build(ctx)


# ----------------------------------------------------------------------------- train_kd

def kd_argv(base_run, root, note, epochs):
    return distill_argv(base_run, root, note, MODE, epochs, 50, ['--seed', '3', '--cat_normalize'])


def test_train_kd_runs_and_resumes(base_run, tmp_path, monkeypatch):
    train_kd.main(kd_argv(base_run, tmp_path, 'straight', 2))
    ckpt = torch.load(tmp_path / 'straight' / 'checkpoint.pth.tar', weights_only=True)
    assert ckpt['distiller'] == {}
    log = (tmp_path / 'straight' / 'log.txt').read_text()
    assert 'cat_normalize = True (command line)' in log and 'cat_resolution = 2 (default' in log
    rows = metrics_rows(tmp_path / 'straight')
    assert all(float(r['train_kd']) > 0 for r in rows)
    stop_after_first_epoch_then_resume(monkeypatch, kd_argv(base_run, tmp_path, 'resumed', 2))
    assert_same_run(tmp_path / 'straight', tmp_path / 'resumed')
