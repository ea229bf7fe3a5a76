"""SemCKD (per-sample attention over teacher stages from batch-similarity
queries and keys, per-pair regressors, attention-weighted MSE) against
explicit float64 loops; different stage counts and sizes; a train_kd run:
the attention and regressors train, are checkpointed and resume bitwise."""

import numpy as np
import pytest
import torch

from conftest import (assert_same_run, distill_argv, make_context, metrics_rows,
                      run_capturing_distiller, shaped_features, stop_after_first_epoch_then_resume)
from kd_losses import METHODS, ConfigError, SemCKD
from network import build_network
from reference import np_, conv1x1, conv3x3, batchnorm, avg_pool

MODE = 'semckd'


# ----------------------------------------------------------------------------- numpy reference

def mlp(m, g):
    """The query/key MLP on a [B, B] similarity matrix: only the first B input
    columns of its first layer meet data (the rest would meet zero padding)."""
    w1 = np_(m.linear1.weight)[:, :g.shape[1]]
    h = np.maximum(g @ w1.T + np_(m.linear1.bias), 0) @ np_(m.linear2.weight).T + np_(m.linear2.bias)
    return h / np.linalg.norm(h, axis=1, keepdims=True)


def regress(r, x):
    x = np.maximum(batchnorm(r[1], conv1x1(r[0], x)), 0)
    x = np.maximum(batchnorm(r[4], conv3x3(r[3], x)), 0)
    return conv1x1(r[6], x)


def semckd_reference(module, feats_s, feats_t):
    s = [np_(f) for f in feats_s]
    t = [np_(f) for f in feats_t]
    b = s[0].shape[0]
    gram = lambda f: f.reshape(b, -1) @ f.reshape(b, -1).T  # noqa: E731
    q = [mlp(m, gram(f)) for m, f in zip(module.query, s)]
    k = [mlp(m, gram(f)) for m, f in zip(module.key, t)]
    total = 0.0
    for n in range(b):
        for i in range(len(s)):
            energy = np.array([q[i][n] @ k[j][n] for j in range(len(t))])
            att = np.exp(energy - energy.max())
            att /= att.sum()
            for j in range(len(t)):
                src, tgt = s[i], t[j]
                if src.shape[2] > tgt.shape[2]:
                    src = avg_pool(src, tgt.shape[2:])
                elif src.shape[2] < tgt.shape[2]:
                    tgt = avg_pool(tgt, src.shape[2:])
                out = regress(module.regressors[i * len(t) + j], src)  # BN over the whole batch
                total += att[j] * np.mean((out[n] - tgt[n]) ** 2)
    return total / (b * len(s))


# ----------------------------------------------------------------------------- tiny set-up

S_STAGES = [(2, 4, 4), (3, 2, 2)]
T_STAGES = [(3, 8, 8), (2, 4, 4), (4, 2, 2)]


def maps(shapes, batch, seed, requires_grad=False, draw=torch.rand):
    g = torch.Generator().manual_seed(seed)
    return [draw((batch, *s), generator=g).requires_grad_(requires_grad) for s in shapes]


@pytest.mark.parametrize('batch', [8, 6])  # 6: a last, smaller batch (zero-padded similarities)
def test_loss_matches_reference_with_different_stage_counts(batch):
    torch.manual_seed(0)
    module = SemCKD(S_STAGES, T_STAGES, batch_size=8)
    assert len(module.query) == 2 and len(module.key) == 3 and len(module.regressors) == 6
    assert module.query[0].linear1.weight.shape == (4, 8)  # 2 d = 2 (batch size // 4)
    assert module.query[0].linear2.weight.shape == (2, 4)
    fs, ft = maps(S_STAGES, batch, 1), maps(T_STAGES, batch, 2)
    loss = module(fs, ft)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(semckd_reference(module, fs, ft), rel=1e-5)


def test_attention_is_a_distribution_over_teacher_stages():
    module = SemCKD(S_STAGES, T_STAGES, batch_size=8)
    att = module.attention(maps(S_STAGES, 5, 1), maps(T_STAGES, 5, 2))
    assert att.shape == (5, 2, 3)
    assert torch.allclose(att.sum(dim=2), torch.ones(5, 2)) and (att > 0).all()


def test_regressor_shapes():
    module = SemCKD(S_STAGES, T_STAGES, batch_size=8)
    for i, s in enumerate(S_STAGES):
        for j, t in enumerate(T_STAGES):
            convs = [m for m in module.regressors[i * 3 + j] if isinstance(m, torch.nn.Conv2d)]
            assert [c.weight.shape for c in convs] == [(2 * t[0], s[0], 1, 1),
                                                      (2 * t[0], 2 * t[0], 3, 3), (t[0], 2 * t[0], 1, 1)]


def test_gradients_reach_every_part_and_the_student_not_the_teacher():
    torch.manual_seed(0)
    module = SemCKD(S_STAGES, T_STAGES, batch_size=16)
    # signed maps: similarities of both signs, so no MLP unit is dead from the start
    fs = maps(S_STAGES, 16, 1, requires_grad=True, draw=torch.randn)
    ft = maps(T_STAGES, 16, 2, requires_grad=True, draw=torch.randn)
    module(fs, ft).backward()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(f.grad.abs().sum() > 0 for f in fs)
    assert all(f.grad is None for f in ft)


def test_a_larger_batch_than_built_for_is_refused():
    module = SemCKD(S_STAGES, T_STAGES, batch_size=4)
    with pytest.raises(ValueError, match='exceeds the batch size'):
        module(maps(S_STAGES, 5, 1), maps(T_STAGES, 5, 2))


def test_float32_under_bf16_autocast_and_channels_last():
    torch.manual_seed(0)
    module = SemCKD(S_STAGES, T_STAGES, batch_size=8)
    fs, ft = maps(S_STAGES, 8, 1), maps(T_STAGES, 8, 2)
    reference = module(fs, ft).item()
    module.to(memory_format=torch.channels_last)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss = module([f.contiguous(memory_format=torch.channels_last) for f in fs], ft)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(reference, rel=0.05)


# ----------------------------------------------------------------------------- registry and networks

def test_registry_entry():
    assert METHODS[MODE].defaults == {'lambda_kd': 400.0}
    assert METHODS[MODE].flags == {}


@pytest.mark.parametrize('s_name, t_name', [('resnet20', 'resnet20'), ('resnet8x4', 'resnet32x4'),
                                            ('ShuffleV1', 'wrn_40_2'), ('vgg8', 'wrn_40_2')])
def test_network_pairs_forward_backward(s_name, t_name):
    student, teacher = build_network(s_name, 100), build_network(t_name, 100)
    ctx = make_context(MODE, {'batch_size': 8}, num_class=100, student=student, teacher=teacher)
    ctx.student_shapes, ctx.teacher_shapes = student.feature_shapes, teacher.feature_shapes
    distiller = METHODS[MODE].build(ctx)
    n_s = len([k for k in student.feature_shapes if k.startswith('rb')])
    assert len(distiller.semckd.regressors) == n_s * 3
    s, leaves = shaped_features(student.feature_shapes, 8, 0, requires_grad=True)
    t, _ = shaped_features(teacher.feature_shapes, 8, 1, requires_grad=True)
    distiller(s, t, None).backward()
    assert all(leaves[f'rb{i}'].grad.abs().sum() > 0 for i in range(1, n_s + 1))


def test_config_errors():
    with pytest.raises(ConfigError, match='at least 4 samples'):
        METHODS[MODE].build(make_context(MODE, {'batch_size': 3}))
    with pytest.raises(ConfigError, match='--batch_size'):
        METHODS[MODE].build(make_context(MODE))


# ----------------------------------------------------------------------------- train_kd

def kd_argv(base_run, root, note, epochs):
    # batch 40: 100 samples give a last batch of 20 (zero-padded attention input).
    # lambda 1: the tiny fixture's teacher (one epoch on 100 images) has large
    # maps, and the default 400 makes the student diverge there.
    return distill_argv(base_run, root, note, MODE, epochs, 40, ['--seed', '3', '--lambda_kd', '1'])


def test_train_kd_trains_saves_and_resumes_attention_and_regressors(base_run, tmp_path, monkeypatch):
    initial = run_capturing_distiller(monkeypatch, MODE, kd_argv(base_run, tmp_path, 'straight', 2))
    ckpt = torch.load(tmp_path / 'straight' / 'checkpoint.pth.tar', weights_only=True)
    saved = ckpt['distiller']
    assert set(saved) == set(initial)
    assert saved['semckd.query.0.linear1.weight'].shape == (2 * 10, 40)  # built for the batch size
    for name, value in initial.items():
        if name.endswith('weight'):
            assert not torch.equal(saved[name], value), f'{name} did not train'
    rows = metrics_rows(tmp_path / 'straight')
    assert all(float(r['train_kd']) > 0 for r in rows)

    stop_after_first_epoch_then_resume(monkeypatch, kd_argv(base_run, tmp_path, 'resumed', 2))
    assert_same_run(tmp_path / 'straight', tmp_path / 'resumed')
