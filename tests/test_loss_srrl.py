"""SRRL (connector on the pooled feature; feature matching and softmax
regression through the teacher's frozen classifier) against a float64 numpy
computation; shapes across families; a train_kd run: the connector trains,
both terms are logged, the connector is checkpointed and resumes bitwise."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import (assert_same_run, distill_argv, make_context, metrics_rows,
                      run_capturing_distiller, stop_after_first_epoch_then_resume)
from kd_losses import METHODS, SRRL, ConfigError
from network import Features, build_network
from reference import np_

MODE = 'srrl'


def srrl_reference(srrl, feat_s, feat_t, out_t, head, eps=1e-5):
    """(fm, sr) by the formula, BN with the batch's statistics (train mode)."""
    conv, bn = srrl.connector[0], srrl.connector[1]
    z = np_(feat_s) @ np_(conv.weight)[:, :, 0, 0].T
    z = (z - z.mean(axis=0)) / np.sqrt(z.var(axis=0) + eps) * np_(bn.weight) + np_(bn.bias)
    h = np.maximum(z, 0)
    logits = h @ np_(head.weight).T + np_(head.bias)
    return np.mean((h - np_(feat_t)) ** 2), np.mean((logits - np_(out_t)) ** 2)


class Teacher(nn.Module):
    """Only what SRRL reads of the teacher: its classifier."""

    def __init__(self, dim, num_class):
        super().__init__()
        self.head = nn.Linear(dim, num_class)


def tiny_case(s_dim=3, t_dim=4, num_class=5, batch=6, alpha=1.0, beta=1.0, requires_grad=False):
    torch.manual_seed(0)
    ctx = make_context(MODE, {'srrl_alpha': alpha, 'srrl_beta': beta}, num_class=num_class,
                       teacher=Teacher(t_dim, num_class))
    ctx.student_shapes = {**ctx.student_shapes, 'feat': (s_dim,), 'out': (num_class,)}
    ctx.teacher_shapes = {**ctx.teacher_shapes, 'feat': (t_dim,), 'out': (num_class,)}
    distiller = METHODS[MODE].build(ctx)
    g = torch.Generator().manual_seed(1)
    feat_s = torch.randn(batch, s_dim, generator=g).requires_grad_(requires_grad)
    feat_t = torch.rand(batch, t_dim, generator=g) * 2
    out_t = torch.randn(batch, num_class, generator=g) * 3
    return ctx, distiller, feat_s, feat_t, out_t


def as_features(feat, out):
    """Only `feat` and `out` are read."""
    pair = (None, None)
    return Features(pair, pair, pair, pair, feat, out)


def test_terms_match_reference():
    ctx, distiller, feat_s, feat_t, out_t = tiny_case(alpha=0.5, beta=3.0)
    terms = distiller(as_features(feat_s, torch.zeros(6, 5)), as_features(feat_t, out_t), None)
    assert tuple(terms) == ('fm', 'sr') == distiller.loss_terms
    fm, sr = srrl_reference(distiller.srrl, feat_s, feat_t, out_t, ctx.teacher.head)
    assert terms['fm'].dtype == torch.float32 and terms['sr'].dtype == torch.float32
    assert terms['fm'].item() == pytest.approx(0.5 * fm, rel=1e-5)
    assert terms['sr'].item() == pytest.approx(3.0 * sr, rel=1e-5)


def test_hand_case():
    # connector silenced (BN gamma 0, beta 1): h = 1 everywhere, so
    # fm = mean((1 - t)^2) and sr = mean((W 1 + b - out_t)^2)
    srrl = SRRL(2, 3)
    with torch.no_grad():
        srrl.connector[1].weight.zero_()
        srrl.connector[1].bias.fill_(1.0)
    w, b = torch.ones(2, 3), torch.tensor([0.5, -1.0])
    fm, sr = srrl(torch.randn(4, 2), torch.zeros(4, 3), torch.zeros(4, 2), w, b)
    assert fm.item() == pytest.approx(1.0)
    assert sr.item() == pytest.approx((3.5 ** 2 + 2.0 ** 2) / 2)


def test_gradients_reach_the_connector_and_the_student_only():
    ctx, distiller, feat_s, feat_t, out_t = tiny_case(requires_grad=True)
    head = ctx.teacher.head  # trainable here, to show that no gradient reaches it
    feat_t.requires_grad_(True)
    terms = distiller(as_features(feat_s, torch.zeros(6, 5)), as_features(feat_t, out_t), None)
    sum(terms.values()).backward()
    for name, p in distiller.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert feat_s.grad.abs().sum() > 0
    assert feat_t.grad is None and head.weight.grad is None and head.bias.grad is None
    # the teacher's classifier is read, not owned
    assert set(distiller.state_dict()) == {f'srrl.connector.{k}' for k in
                                           ('0.weight', '1.weight', '1.bias', '1.running_mean',
                                            '1.running_var', '1.num_batches_tracked')}


def test_float32_under_bf16_autocast():
    _, distiller, feat_s, feat_t, out_t = tiny_case()
    s, t = as_features(feat_s, torch.zeros(6, 5)), as_features(feat_t, out_t)
    reference = distiller(s, t, None)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        terms = distiller(s, t, None)
    for name, value in terms.items():
        assert value.dtype == torch.float32
        assert value.item() == pytest.approx(reference[name].item(), rel=0.05)


def test_registry_entry():
    method = METHODS[MODE]
    assert method.defaults == {'lambda_kd': 1.0, 'srrl_alpha': 1.0, 'srrl_beta': 1.0}
    assert method.flags['srrl_alpha'].type is float and method.flags['srrl_beta'].type is float


@pytest.mark.parametrize('s_name, t_name', [('resnet20', 'resnet20'), ('resnet8x4', 'resnet32x4'),
                                            ('ShuffleV1', 'wrn_40_2'), ('MobileNetV2', 'vgg13'),
                                            ('resnet8x4', 'ShuffleV2')])
def test_network_pairs_forward_backward(s_name, t_name):
    student, teacher = build_network(s_name, 100), build_network(t_name, 100)
    ctx = make_context(MODE, num_class=100, student=student, teacher=teacher)
    ctx.student_shapes, ctx.teacher_shapes = student.feature_shapes, teacher.feature_shapes
    distiller = METHODS[MODE].build(ctx)
    s_dim, t_dim = student.feature_shapes['feat'][0], teacher.feature_shapes['feat'][0]
    assert distiller.srrl.connector[0].weight.shape == (t_dim, s_dim, 1, 1)
    feat_s = torch.randn(2, s_dim, requires_grad=True)
    terms = distiller(as_features(feat_s, None),
                      as_features(torch.rand(2, t_dim), torch.randn(2, 100)), None)
    sum(terms.values()).backward()
    assert feat_s.grad.abs().sum() > 0


def test_config_error_without_the_teacher():
    with pytest.raises(ConfigError, match='teacher'):
        METHODS[MODE].build(make_context(MODE))


# ----------------------------------------------------------------------------- train_kd

def kd_argv(base_run, root, note, epochs):
    return distill_argv(base_run, root, note, MODE, epochs, 50, ['--seed', '3'])


def test_train_kd_trains_saves_and_resumes_the_connector(base_run, tmp_path, monkeypatch):
    initial = run_capturing_distiller(monkeypatch, MODE, kd_argv(base_run, tmp_path, 'straight', 2))
    ckpt = torch.load(tmp_path / 'straight' / 'checkpoint.pth.tar', weights_only=True)
    assert set(ckpt['distiller']) == set(initial)
    for name in ('srrl.connector.0.weight', 'srrl.connector.1.weight', 'srrl.connector.1.bias'):
        assert not torch.equal(ckpt['distiller'][name], initial[name]), f'{name} did not train'
    rows = metrics_rows(tmp_path / 'straight')
    for r in rows:
        assert float(r['train_kd_fm']) > 0 and float(r['train_kd_sr']) > 0
        assert float(r['train_kd_fm']) + float(r['train_kd_sr']) == pytest.approx(
            float(r['train_kd']), rel=1e-4)

    stop_after_first_epoch_then_resume(monkeypatch, kd_argv(base_run, tmp_path, 'resumed', 2))
    assert_same_run(tmp_path / 'straight', tmp_path / 'resumed')
