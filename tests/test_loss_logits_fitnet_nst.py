"""Logits (MSE on logits), FitNets hints (MSE on rb3 post) and NST (MMD with
a polynomial kernel on rb3 post), each against a direct numpy computation."""
import numpy as np
import pytest
import torch

from conftest import make_context, make_features
from kd_losses import METHODS, NST, ConfigError, Distiller, Hint, Logits


def as_np(x):
    return x.detach().double().numpy()


def mse_reference(a, b):
    a, b = as_np(a), as_np(b)
    return ((a - b) ** 2).sum() / a.size


def nst_reference(fm_s, fm_t):
    """Per sample: normalise each channel's spatial vector, then
    mean_cc' (t_c.t_c')^2 + mean (s_c.s_c')^2 - 2 mean (s_c.t_c')^2; batch mean."""
    s, t = as_np(fm_s), as_np(fm_t)
    total = 0.0
    for b in range(len(s)):
        # a channel that is zero everywhere (after a ReLU) stays zero, as F.normalize leaves it
        sv = [c.ravel() / max(np.linalg.norm(c.ravel()), 1e-12) for c in s[b]]
        tv = [c.ravel() / max(np.linalg.norm(c.ravel()), 1e-12) for c in t[b]]

        def kernel_mean(xs, ys):
            return np.mean([np.dot(x, y) ** 2 for x in xs for y in ys])

        total += kernel_mean(tv, tv) + kernel_mean(sv, sv) - 2 * kernel_mean(sv, tv)
    return total / len(s)


# ----- formulas -----

def test_logits_matches_reference_and_hand_case():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    assert Logits()(s, t).item() == pytest.approx(mse_reference(s, t), rel=1e-5)
    assert Logits()(s, s).item() == 0.0
    # (1^2 + 2^2) / 2 entries
    assert Logits()(torch.tensor([[1.0, 2.0]]), torch.zeros(1, 2)).item() == pytest.approx(2.5)


def test_hint_matches_reference_and_hand_case():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 8, 3, 3, generator=g), torch.randn(4, 8, 3, 3, generator=g)
    assert Hint()(s, t).item() == pytest.approx(mse_reference(s, t), rel=1e-5)
    assert Hint()(t, t).item() == 0.0
    s = torch.zeros(1, 1, 2, 2)
    t = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    assert Hint()(s, t).item() == pytest.approx(1.0)  # 4 / 4 entries


def test_nst_matches_reference():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(3, 6, 4, 4, generator=g), torch.randn(3, 5, 4, 4, generator=g)
    assert NST()(s, t).item() == pytest.approx(nst_reference(s, t), rel=1e-5)


def test_nst_hand_case_and_invariances():
    # one channel each, orthogonal unit vectors: k(t,t)=1, k(s,s)=1, k(s,t)=0 -> 2
    s = torch.tensor([[[[1.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 1.0]]]])
    assert NST()(s, t).item() == pytest.approx(2.0)
    g = torch.Generator().manual_seed(4)
    s, t = torch.rand(2, 4, 3, 3, generator=g), torch.rand(2, 4, 3, 3, generator=g)
    assert NST()(t, t).item() == pytest.approx(0.0, abs=1e-6)
    # each channel is normalised: scaling a channel changes nothing
    scale = torch.tensor([1.0, 3.0, 0.5, 7.0]).view(1, 4, 1, 1)
    assert NST()(s * scale, t).item() == pytest.approx(NST()(s, t).item(), rel=1e-5)


def test_nst_pools_the_larger_map():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    s_pooled = s.view(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))  # 2x2 block means
    assert NST()(s, t).item() == pytest.approx(nst_reference(s_pooled, t), rel=1e-5)


@pytest.mark.parametrize('loss', [Logits(), Hint(), NST()])
def test_float32_result_for_low_precision_inputs(loss):
    g = torch.Generator().manual_seed(6)
    s, t = torch.randn(4, 8, 4, 4, generator=g), torch.randn(4, 8, 4, 4, generator=g)
    if isinstance(loss, Logits):
        s, t = s.flatten(1), t.flatten(1)
    out = loss(s.bfloat16(), t.bfloat16())
    assert out.dtype == torch.float32 and torch.isfinite(out)


# ----- registry level -----

FEATURE = {'logits': lambda f: f.out, 'fitnet': lambda f: f.rb3[1], 'nst': lambda f: f.rb3[1]}
REFERENCE = {'logits': mse_reference, 'fitnet': mse_reference, 'nst': nst_reference}


@pytest.mark.parametrize('mode', ['logits', 'fitnet', 'nst'])
def test_no_method_flags(mode):
    # lambda_kd's default: its effect on a run is checked in tests/test_train_kd.py (SEED_DEFAULTS)
    assert dict(METHODS[mode].flags) == {}


@pytest.mark.parametrize('mode', ['logits', 'fitnet', 'nst'])
def test_distiller_reads_its_feature_and_detaches_the_teacher(mode):
    distiller = METHODS[mode].build(make_context(mode))
    assert isinstance(distiller, Distiller)
    assert distiller.pretrain_phases(make_context(mode)) == [] and distiller.kd_weight(1, 200) == 1.0
    assert list(distiller.learnable_parameters()) == [] and not distiller.teacher_grad
    s, s_leaves = make_features(batch=6, seed=0, requires_grad=True)
    t, t_leaves = make_features(batch=6, seed=1, requires_grad=True)
    loss = distiller(s, t, None)
    assert loss.dim() == 0 and torch.isfinite(loss)
    expected = REFERENCE[mode](FEATURE[mode](s), FEATURE[mode](t))
    assert loss.item() == pytest.approx(expected, rel=1e-4)
    loss.backward()
    used = 'out' if mode == 'logits' else 'rb3'
    assert s_leaves[used].grad is not None and s_leaves[used].grad.abs().sum() > 0
    for name, leaf in s_leaves.items():
        if name != used:
            assert leaf.grad is None
    assert all(leaf.grad is None for leaf in t_leaves.values())


# ----- across networks: FitNet's hint regressor, the last stage -----
# (the benchmark's pairs as a whole: tests/test_methods_across_pairs.py)

def conv2d_reference(x, w, b, stride, pad):
    """Cross-correlation with explicit loops over output positions; x [B, C, H, W], w [O, C, kh, kw]."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    ho, wo = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
    y = np.zeros((x.shape[0], w.shape[0], ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = x[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw]
            y[:, :, i, j] = np.einsum('bchw,ochw->bo', patch, w)
    return y + b.reshape(1, -1, 1, 1)


def conv_transpose2d_reference(x, w, b, stride, pad):
    """Each input position scatters w [C, O, kh, kw] into the output; then `pad` cropped per side."""
    kh, kw = w.shape[2:]
    full = np.zeros((x.shape[0], w.shape[1], (x.shape[2] - 1) * stride + kh,
                     (x.shape[3] - 1) * stride + kw))
    for i in range(x.shape[2]):
        for j in range(x.shape[3]):
            full[:, :, i * stride:i * stride + kh, j * stride:j * stride + kw] += \
                np.einsum('bc,cohw->bohw', x[:, :, i, j], w)
    return full[:, :, pad:full.shape[2] - pad, pad:full.shape[3] - pad] + b.reshape(1, -1, 1, 1)


def batchnorm_train_reference(y, bn):
    """BatchNorm in train mode: the batch's mean and biased variance per channel."""
    gamma, beta = as_np(bn.weight).reshape(1, -1, 1, 1), as_np(bn.bias).reshape(1, -1, 1, 1)
    mean, var = y.mean(axis=(0, 2, 3), keepdims=True), y.var(axis=(0, 2, 3), keepdims=True)
    return (y - mean) / np.sqrt(var + bn.eps) * gamma + beta


def regressor_reference(regressor, x):
    """The hint regressor (train mode) on x, in float64: conv (or transposed conv), BN, ReLU if any."""
    conv = regressor[0]
    w, b, x = as_np(conv.weight), as_np(conv.bias), as_np(x)
    if isinstance(conv, torch.nn.ConvTranspose2d):
        y = conv_transpose2d_reference(x, w, b, conv.stride[0], conv.padding[0])
    else:
        y = conv2d_reference(x, w, b, conv.stride[0], conv.padding[0])
    y = batchnorm_train_reference(y, regressor[1])
    return np.maximum(y, 0) if len(regressor) == 3 else y


def features_with(shapes, batch, seed, requires_grad=False):
    """network.Features (or Features4, with rb4) of the given per-sample shapes:
    pre-activations normal, post = relu(pre); returns (features, {name: leaf})."""
    from network import Features, Features4
    g = torch.Generator().manual_seed(seed)
    values, leaves = [], {}
    for key, shape in shapes.items():
        x = torch.randn((batch, *shape), generator=g).requires_grad_(requires_grad)
        leaves[key] = x
        values.append(x if key in ('feat', 'out') else (x, torch.relu(x)))
    return (Features4 if 'rb4' in shapes else Features)(*values), leaves


def with_shapes(ctx, student=None, teacher=None):
    """ctx with some feature shapes replaced (or rb4 added), in the networks' order."""
    order = ('stem', 'rb1', 'rb2', 'rb3', 'rb4', 'feat', 'out')
    for side, new in (('student_shapes', student), ('teacher_shapes', teacher)):
        shapes = {**getattr(ctx, side), **(new or {})}
        setattr(ctx, side, {k: shapes[k] for k in order if k in shapes})
    return ctx


FOUR_STAGES = {'stem': (4, 8, 8), 'rb1': (4, 8, 8), 'rb2': (6, 4, 4), 'rb3': (8, 2, 2),
               'rb4': (8, 2, 2), 'feat': (8,), 'out': (10,)}


@pytest.mark.parametrize('s_shape, t_shape, kind, kernel, stride', [
    ((6, 8, 8), (10, 4, 4), torch.nn.Conv2d, (3, 3), 2),           # student twice as large
    ((6, 4, 4), (10, 8, 8), torch.nn.ConvTranspose2d, (4, 4), 2),  # student half as large
    ((6, 6, 6), (10, 4, 4), torch.nn.Conv2d, (3, 3), 1),           # valid conv of 1 + 6 - 4
    ((6, 8, 8), (10, 8, 8), torch.nn.Conv2d, (1, 1), 1),           # channels only
])
def test_fitnet_regressor_where_the_last_stage_differs(s_shape, t_shape, kind, kernel, stride):
    ctx = with_shapes(make_context('fitnet'), {'rb3': s_shape}, {'rb3': t_shape})
    distiller = METHODS['fitnet'].build(ctx)
    regressor = distiller.per_key[0].connector
    assert type(regressor[0]) is kind and regressor[0].kernel_size == kernel
    assert regressor[0].stride == (stride, stride) and isinstance(regressor[-1], torch.nn.ReLU)
    distiller.train()
    s, s_leaves = features_with(ctx.student_shapes, batch=3, seed=0, requires_grad=True)
    t, t_leaves = features_with(ctx.teacher_shapes, batch=3, seed=1, requires_grad=True)
    loss = distiller(s, t, None)
    hint = regressor_reference(regressor, s.rb3[1])
    assert hint.shape == (3, *t_shape)
    assert loss.item() == pytest.approx(np.mean((hint - as_np(t.rb3[1])) ** 2), rel=1e-5)
    loss.backward()
    assert s_leaves['rb3'].grad.abs().sum() > 0 and all(x.grad is None for x in t_leaves.values())
    params = distiller.learnable_parameters()
    assert len(params) == 4  # conv weight and bias, BN weight and bias
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert set(distiller.state_dict()) >= {'per_key.0.connector.0.weight',
                                           'per_key.0.connector.1.running_mean'}  # checkpointed


def test_fitnet_refuses_a_student_map_too_small_naming_both_shapes():
    ctx = with_shapes(make_context('fitnet'), {'rb3': (64, 2, 2)}, {'rb3': (64, 8, 8)})
    with pytest.raises(ConfigError, match=r'fitnet: .*rb3 \(64, 2, 2\).*rb3 \(64, 8, 8\)'):
        METHODS['fitnet'].build(ctx)


@pytest.mark.parametrize('mode', ['fitnet', 'nst'])
def test_the_last_stage_of_four(mode):
    ctx = with_shapes(make_context(mode), FOUR_STAGES, {**FOUR_STAGES, 'rb4': (12, 2, 2)})
    distiller = METHODS[mode].build(ctx)
    assert distiller.keys == ('rb4',)
    s, s_leaves = features_with(ctx.student_shapes, batch=3, seed=2, requires_grad=True)
    t, _ = features_with(ctx.teacher_shapes, batch=3, seed=3)
    distiller.train()
    loss = distiller(s, t, None)
    if mode == 'nst':  # channel counts may differ: no connector
        assert loss.item() == pytest.approx(nst_reference(s.rb4[1], t.rb4[1]), rel=1e-5)
    loss.backward()
    assert s_leaves['rb4'].grad.abs().sum() > 0 and s_leaves['rb3'].grad is None
