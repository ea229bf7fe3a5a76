"""ICKD (row-normalised inter-channel Gram matrices of the embedded student
map and the teacher map, squared error / (C B)) against float64 loops;
shapes across families; a train_kd run: the embedding trains, is
checkpointed and resumes bitwise."""
import math

import numpy as np
import pytest
import torch

from conftest import (assert_same_run, distill_argv, make_context, run_capturing_distiller,
                      shaped_features, stop_after_first_epoch_then_resume)
from kd_losses import ICKD, METHODS
from kd_losses.ickd import channel_correlation
from network import build_network
from reference import np_

MODE = 'ickd'


def ickd_reference(ickd, fm_s, fm_t, eps=1e-5):
    conv, bn = ickd.embed[0], ickd.embed[1]
    e = np.einsum('oc,bchw->bohw', np_(conv.weight)[:, :, 0, 0], np_(fm_s))
    mean, var = e.mean(axis=(0, 2, 3), keepdims=True), e.var(axis=(0, 2, 3), keepdims=True)
    e = (e - mean) / np.sqrt(var + eps) * np_(bn.weight).reshape(1, -1, 1, 1) \
        + np_(bn.bias).reshape(1, -1, 1, 1)
    t = np_(fm_t)
    b, c = e.shape[:2]
    total = 0.0
    for n in range(b):
        fs, ft = e[n].reshape(c, -1), t[n].reshape(c, -1)
        gs = np.array([[fs[i] @ fs[j] for j in range(c)] for i in range(c)])
        gt = np.array([[ft[i] @ ft[j] for j in range(c)] for i in range(c)])
        gs /= np.linalg.norm(gs, axis=1, keepdims=True)
        gt /= np.linalg.norm(gt, axis=1, keepdims=True)
        total += ((gs - gt) ** 2).sum()
    return total / (c * b)


@pytest.mark.parametrize('s_shape, t_shape', [((3, 4, 4), (5, 4, 4)), ((3, 8, 8), (5, 2, 2)),
                                              ((6, 2, 2), (4, 4, 4))])
def test_loss_matches_reference(s_shape, t_shape):
    torch.manual_seed(0)
    ickd = ICKD(s_shape[0], t_shape[0])
    g = torch.Generator().manual_seed(1)
    fm_s, fm_t = torch.randn(3, *s_shape, generator=g), torch.rand(3, *t_shape, generator=g)
    loss = ickd(fm_s, fm_t)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ickd_reference(ickd, fm_s, fm_t), rel=1e-5)
    assert ickd.embed[0].weight.shape == (t_shape[0], s_shape[0], 1, 1)


def test_hand_cases():
    # orthogonal channels: the normalised Gram is the identity
    fm = torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])  # [1, 2, 1, 2]
    assert torch.allclose(channel_correlation(fm), torch.eye(2).unsqueeze(0))
    # against two equal channels (rows (1, 1) / sqrt 2): 2 rows of (1 - 1/sqrt2)^2 + 1/2, / (C B = 2)
    same = torch.ones(1, 2, 1, 2)
    diff = channel_correlation(fm) - channel_correlation(same)
    assert (diff.pow(2).sum() / 2).item() == pytest.approx(2 - math.sqrt(2), rel=1e-6)


def test_gradients_reach_the_embedding_and_the_student_not_the_teacher():
    ickd = ICKD(3, 5)
    fm_s, fm_t = torch.randn(4, 3, 4, 4, requires_grad=True), torch.rand(4, 5, 2, 2, requires_grad=True)
    ickd(fm_s, fm_t.detach()).backward()
    for name, p in ickd.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert fm_s.grad.abs().sum() > 0 and fm_t.grad is None


def test_float32_under_bf16_autocast_and_channels_last():
    torch.manual_seed(0)
    ickd = ICKD(3, 5)
    g = torch.Generator().manual_seed(1)
    fm_s, fm_t = torch.randn(4, 3, 4, 4, generator=g), torch.rand(4, 5, 4, 4, generator=g)
    reference = ickd(fm_s, fm_t).item()
    ickd.to(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = ickd(fm_s.contiguous(memory_format=torch.channels_last), fm_t)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(reference, rel=0.05)


def test_registry_entry():
    assert METHODS[MODE].defaults == {'lambda_kd': 2.5} and METHODS[MODE].flags == {}


@pytest.mark.parametrize('s_name, t_name', [('resnet20', 'resnet20'), ('resnet8x4', 'resnet32x4'),
                                            ('ShuffleV1', 'wrn_40_2'), ('MobileNetV2', 'vgg13'),
                                            ('resnet8x4', 'ShuffleV2')])
def test_network_pairs_forward_backward(s_name, t_name):
    student, teacher = build_network(s_name, 100), build_network(t_name, 100)
    ctx = make_context(MODE, num_class=100, student=student, teacher=teacher)
    ctx.student_shapes, ctx.teacher_shapes = student.feature_shapes, teacher.feature_shapes
    distiller = METHODS[MODE].build(ctx)
    s, leaves = shaped_features(ctx.student_shapes, 2, 0, requires_grad=True)
    t, _ = shaped_features(ctx.teacher_shapes, 2, 1)
    loss = distiller(s, t, None)
    s_last = [k for k in ctx.student_shapes if k.startswith('rb')][-1]
    t_last = [k for k in ctx.teacher_shapes if k.startswith('rb')][-1]
    expected = ickd_reference(distiller.ickd, getattr(s, s_last)[1], getattr(t, t_last)[1])
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()
    assert leaves[s_last].grad.abs().sum() > 0


# ----------------------------------------------------------------------------- train_kd

def kd_argv(base_run, root, note, epochs):
    return distill_argv(base_run, root, note, MODE, epochs, 50, ['--seed', '3'])


def test_train_kd_trains_saves_and_resumes_the_embedding(base_run, tmp_path, monkeypatch):
    initial = run_capturing_distiller(monkeypatch, MODE, kd_argv(base_run, tmp_path, 'straight', 2))
    ckpt = torch.load(tmp_path / 'straight' / 'checkpoint.pth.tar', weights_only=True)
    assert set(ckpt['distiller']) == set(initial)
    for name in ('ickd.embed.0.weight', 'ickd.embed.1.weight', 'ickd.embed.1.bias'):
        assert not torch.equal(ckpt['distiller'][name], initial[name]), f'{name} did not train'
    stop_after_first_epoch_then_resume(monkeypatch, kd_argv(base_run, tmp_path, 'resumed', 2))
    assert_same_run(tmp_path / 'straight', tmp_path / 'resumed')
