"""ReviewKD (ABF review path, hierarchical context loss, linear warm-up)
against a float64 numpy computation; shapes across families; a train_kd run:
the ABF modules train, are checkpointed and resume bitwise."""

import numpy as np
import pytest
import torch

from conftest import (assert_same_run, distill_argv, make_context, metrics_rows,
                      run_capturing_distiller, shaped_features, stop_after_first_epoch_then_resume)
from kd_losses import HCL, METHODS, ConfigError, ReviewKD
from network import Features, build_network
from reference import np_, conv1x1, conv3x3, batchnorm, avg_pool

MODE = 'reviewkd'


# ----------------------------------------------------------------------------- numpy reference

def nearest(x, size):
    rows = (np.arange(size[0]) * x.shape[2] // size[0])
    cols = (np.arange(size[1]) * x.shape[3] // size[1])
    return x[:, :, rows][:, :, :, cols]


def hcl_reference(fs, ft):
    loss, weight, total = np.mean((fs - ft) ** 2), 1.0, 1.0
    for size in (4, 2, 1):
        if size < fs.shape[2]:
            weight /= 2
            loss += weight * np.mean((avg_pool(fs, size) - avg_pool(ft, size)) ** 2)
            total += weight
    return loss / total


def abf_reference(abf, x, residual, out_size):
    x = batchnorm(abf.conv1[1], conv1x1(abf.conv1[0], x))
    if abf.att_conv is not None:
        residual = nearest(residual, x.shape[2:])
        z = conv1x1(abf.att_conv[0], np.concatenate([x, residual], axis=1))
        w = 1 / (1 + np.exp(-z))
        x = x * w[:, 0:1] + residual * w[:, 1:2]
    if x.shape[2:] != tuple(out_size):
        x = nearest(x, out_size)
    return batchnorm(abf.conv2[1], conv3x3(abf.conv2[0], x)), x


def review_reference(distiller, s_maps, t_maps):
    """{level: HCL} by the formula, deepest level first."""
    results, residual = {}, None
    levels = distiller.levels
    for i in reversed(range(len(levels))):
        t = t_maps[i]
        out, residual = abf_reference(distiller.abfs[i], s_maps[i], residual, t.shape[2:])
        results[levels[i]] = hcl_reference(out, t)
    return results


# ----------------------------------------------------------------------------- tiny features

S_SHAPES = {'stem': (3, 8, 8), 'rb1': (3, 8, 8), 'rb2': (4, 4, 4), 'rb3': (5, 2, 2), 'feat': (5,),
            'out': (10,)}
T_SHAPES = {'stem': (4, 16, 16), 'rb1': (6, 16, 16), 'rb2': (7, 2, 2), 'rb3': (8, 4, 4),
            'feat': (9,), 'out': (10,)}


def features(shapes, batch, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    leaves = {k: torch.randn((batch, *shapes[k]), generator=g).requires_grad_(requires_grad)
              for k in ('stem', 'rb1', 'rb2', 'rb3', 'feat', 'out')}
    pair = {k: (leaves[k], torch.relu(leaves[k])) for k in ('stem', 'rb1', 'rb2', 'rb3')}
    return Features(pair['stem'], pair['rb1'], pair['rb2'], pair['rb3'], leaves['feat'],
                    leaves['out']), leaves


def tiny_distiller(warmup=20):
    torch.manual_seed(0)
    return ReviewKD(S_SHAPES, T_SHAPES, ('rb1', 'rb2', 'rb3'), warmup)


# ----------------------------------------------------------------------------- the loss

@pytest.mark.parametrize('h', [8, 5, 4, 2, 1])
def test_hcl_matches_formula(h):
    g = torch.Generator().manual_seed(h)
    fs, ft = torch.randn(3, 4, h, h, generator=g), torch.randn(3, 4, h, h, generator=g)
    assert HCL()(fs, ft).item() == pytest.approx(hcl_reference(np_(fs), np_(ft)), rel=1e-5)


def test_hcl_hand_case():
    # a constant difference d: every pooled level differs by d too, so HCL = d^2
    fs = torch.full((2, 3, 8, 8), 1.5)
    assert HCL()(fs, torch.zeros_like(fs)).item() == pytest.approx(2.25)
    # a zero-mean checkerboard difference vanishes at every pooled level (4x4 windows
    # of 2x2 cells): only the full-resolution term remains, weighted 1 / (1 + 1/2 + 1/4 + 1/8)
    board = torch.tensor([[(-1.0) ** (i + j) for j in range(8)] for i in range(8)])
    fs = board.expand(1, 1, 8, 8)
    assert HCL()(fs, torch.zeros_like(fs)).item() == pytest.approx(1 / 1.875)


def test_review_matches_reference_with_other_channels_and_sizes():
    distiller = tiny_distiller()
    s, _ = features(S_SHAPES, 4, seed=1)
    t, _ = features(T_SHAPES, 4, seed=2)
    got = distiller(s, t, None)
    assert tuple(got) == ('rb1', 'rb2', 'rb3', 'feat') == distiller.loss_terms
    s_maps = [np_(s.rb1[1]), np_(s.rb2[1]), np_(s.rb3[1]), np_(s.feat)[:, :, None, None]]
    t_maps = [np_(t.rb1[0]), np_(t.rb2[0]), np_(t.rb3[0]), np_(t.feat)[:, :, None, None]]
    expected = review_reference(distiller, s_maps, t_maps)
    for level, value in got.items():
        assert value.dim() == 0 and value.dtype == torch.float32
        assert value.item() == pytest.approx(expected[level], rel=1e-4), level


def test_gradients_reach_every_abf_and_the_student_not_the_teacher():
    distiller = tiny_distiller()
    s, s_leaves = features(S_SHAPES, 4, seed=1, requires_grad=True)
    t, t_leaves = features(T_SHAPES, 4, seed=2, requires_grad=True)
    sum(distiller(s, t, None).values()).backward()
    for name, p in distiller.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for key in ('rb1', 'rb2', 'rb3', 'feat'):
        assert s_leaves[key].grad.abs().sum() > 0, key
    assert all(leaf.grad is None for leaf in t_leaves.values())
    # the deepest level has no fusion, the others do
    assert distiller.abfs[-1].att_conv is None
    assert all(abf.att_conv is not None for abf in distiller.abfs[:-1])


def test_module_shapes():
    distiller = tiny_distiller()
    mid = 5  # min(512, student feat channels)
    for abf, (c_in, c_out) in zip(distiller.abfs, [(3, 6), (4, 7), (5, 8), (5, 9)]):
        assert abf.conv1[0].weight.shape == (mid, c_in, 1, 1)
        assert abf.conv2[0].weight.shape == (c_out, mid, 3, 3)
    big = ReviewKD({**S_SHAPES, 'feat': (600,)}, T_SHAPES, ('rb1', 'rb2', 'rb3'), 20)
    assert big.abfs[0].conv1[0].weight.shape[0] == 512


def test_warm_up_schedule():
    distiller = tiny_distiller(warmup=20)
    assert [distiller.kd_weight(e, 200) for e in (1, 2, 10, 20, 21, 200)] == \
        pytest.approx([0.05, 0.1, 0.5, 1.0, 1.0, 1.0])
    assert tiny_distiller(warmup=0).kd_weight(1, 200) == 1.0


def test_float32_under_bf16_autocast_and_channels_last():
    s, _ = features(S_SHAPES, 4, seed=1)
    t, _ = features(T_SHAPES, 4, seed=2)
    reference = tiny_distiller()(s, t, None)
    distiller = tiny_distiller().to(memory_format=torch.channels_last)
    last = {k: tuple(x.contiguous(memory_format=torch.channels_last) for x in getattr(s, k))
            for k in ('rb1', 'rb2', 'rb3')}
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = distiller(s._replace(**last), t, None)
    for level, value in got.items():
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert value.item() == pytest.approx(reference[level].item(), rel=0.1)


# ----------------------------------------------------------------------------- registry and networks

def test_registry_entry():
    method = METHODS[MODE]
    assert method.defaults == {'lambda_kd': 5.0, 'reviewkd_warmup': 20}
    assert method.flags['reviewkd_warmup'].type is int
    assert 'arxiv.org/abs/2104.09044' in method.paper


def network_context(s_name, t_name):
    s, t = build_network(s_name, 100), build_network(t_name, 100)
    ctx = make_context(MODE, num_class=100, student=s, teacher=t)
    ctx.student_shapes, ctx.teacher_shapes = s.feature_shapes, t.feature_shapes
    return ctx


@pytest.mark.parametrize('s_name, t_name', [('resnet20', 'resnet20'), ('resnet8x4', 'resnet32x4'),
                                            ('ShuffleV1', 'wrn_40_2'), ('MobileNetV2', 'vgg13')])
def test_network_pairs_forward_backward(s_name, t_name):
    ctx = network_context(s_name, t_name)
    distiller = METHODS[MODE].build(ctx)
    s, s_leaves = shaped_features(ctx.student_shapes, 2, seed=0, requires_grad=True)
    t, _ = shaped_features(ctx.teacher_shapes, 2, seed=1)
    terms = distiller(s, t, None)
    stages = tuple(k for k in ctx.student_shapes if k.startswith('rb'))
    assert tuple(terms) == stages + ('feat',)
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in distiller.learnable_parameters())
    assert all(s_leaves[k].grad.abs().sum() > 0 for k in stages + ('feat',))


def test_config_errors():
    with pytest.raises(ConfigError, match='stages'):  # 3 stages against 4
        METHODS[MODE].build(network_context('resnet20', 'vgg8'))
    with pytest.raises(ConfigError, match='--reviewkd_warmup'):
        METHODS[MODE].build(make_context(MODE, {'reviewkd_warmup': -1}))


# ----------------------------------------------------------------------------- train_kd

def kd_argv(base_run, root, note, epochs):
    return distill_argv(base_run, root, note, MODE, epochs, 50, ['--seed', '3', '--reviewkd_warmup', '2'])


def test_train_kd_trains_saves_and_resumes_the_abfs(base_run, tmp_path, monkeypatch):
    initial = run_capturing_distiller(monkeypatch, MODE, kd_argv(base_run, tmp_path, 'straight', 2))
    ckpt = torch.load(tmp_path / 'straight' / 'checkpoint.pth.tar', weights_only=True)
    saved = ckpt['distiller']
    assert set(saved) == set(initial) and any(k.startswith('abfs.0.') for k in saved)
    for name, value in initial.items():
        if name.endswith('weight') and 'conv' in name:
            assert not torch.equal(saved[name], value), f'{name} did not train'
    rows = metrics_rows(tmp_path / 'straight')
    assert [float(r['kd_weight']) for r in rows] == pytest.approx([2.5, 5.0])  # warm-up over 2 epochs
    for level in ('rb1', 'rb2', 'rb3', 'feat'):
        assert all(float(r[f'train_kd_{level}']) > 0 for r in rows)
    total = sum(float(rows[0][f'train_kd_{level}']) for level in ('rb1', 'rb2', 'rb3', 'feat'))
    assert total == pytest.approx(float(rows[0]['train_kd']), rel=1e-4)

    stop_after_first_epoch_then_resume(monkeypatch, kd_argv(base_run, tmp_path, 'resumed', 2))
    assert_same_run(tmp_path / 'straight', tmp_path / 'resumed')
