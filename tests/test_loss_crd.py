"""CRD: the NCE loss against explicit loops over the formula, the memory bank
update, the fixed normalisers Z, and the class-aware sampler of positives and
negatives."""
import math

import numpy as np
import pytest
import torch

from conftest import make_context, make_features
from dataset import Batch
from kd_losses import CRD, METHODS, ConfigError, Distiller


def np64(x):
    return x.detach().double().numpy()


def embed_reference(linear, feat):
    w, b = np64(linear.weight), np64(linear.bias)
    v = np64(feat) @ w.T + b
    return v / np.sqrt((v ** 2).sum(axis=1, keepdims=True))


def side_reference(v, bank, sample_idx, T, n_data, z=None, eps=1e-7):
    """One side's NCE loss by loops; returns (loss, Z used)."""
    B, K = sample_idx.shape
    scores = np.zeros((B, K))
    for i in range(B):
        for j in range(K):
            scores[i, j] = math.exp(sum(v[i, d] * bank[sample_idx[i, j], d]
                                        for d in range(v.shape[1])) / T)
    if z is None:
        z = scores.mean() * n_data
    c = (K - 1) / n_data
    total = 0.0
    for i in range(B):
        p_pos = scores[i, 0] / z
        total += math.log(p_pos / (p_pos + c + eps))
        for j in range(1, K):
            total += math.log(c / (scores[i, j] / z + c + eps))
    return -total / B, z


def tiny_crd(n_data, nce_n=3, seed=0):
    torch.manual_seed(seed)
    return CRD(s_dim=5, t_dim=6, feat_dim=4, nce_n=nce_n, nce_t=0.5, nce_mom=0.3, n_data=n_data)


def tiny_inputs(n_data, batch=4, nce_n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    feat_s, feat_t = torch.randn(batch, 5, generator=g), torch.randn(batch, 6, generator=g)
    idx = torch.randperm(n_data, generator=g)[:batch]
    sample_idx = torch.randint(0, n_data, (batch, nce_n + 1), generator=g)
    sample_idx[:, 0] = idx
    return feat_s, feat_t, idx, sample_idx


def crd_reference(crd, feat_s, feat_t, sample_idx, z_t=None, z_s=None):
    v_s, v_t = embed_reference(crd.embed_s, feat_s), embed_reference(crd.embed_t, feat_t)
    si = sample_idx.numpy()
    loss_t, z_t = side_reference(v_t, np64(crd.memory_s), si, crd.nce_t, crd.n_data, z_t)
    loss_s, z_s = side_reference(v_s, np64(crd.memory_t), si, crd.nce_t, crd.n_data, z_s)
    return loss_t + loss_s, z_t, z_s, v_s, v_t


# ----- formula -----

@pytest.mark.parametrize('n_data', [10, 100])  # 16 scored rows: whole-bank matmul, then row gather
def test_nce_loss_matches_loops(n_data):
    crd = tiny_crd(n_data)
    feat_s, feat_t, idx, sample_idx = tiny_inputs(n_data)
    expected, z_t, z_s, _, _ = crd_reference(crd, feat_s, feat_t, sample_idx)
    loss = crd(feat_s, feat_t, idx, sample_idx)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert crd.z_t.item() == pytest.approx(z_t, rel=1e-5)
    assert crd.z_s.item() == pytest.approx(z_s, rel=1e-5)


def test_z_is_fixed_after_first_batch_and_survives_a_resume():
    crd = tiny_crd(100)
    assert crd.z_t.item() < 0 and crd.z_s.item() < 0  # not set yet
    crd(*tiny_inputs(100, seed=1))
    z_t, z_s = crd.z_t.clone(), crd.z_s.clone()
    assert z_t > 0 and z_s > 0
    feat_s, feat_t, idx, sample_idx = tiny_inputs(100, seed=2)
    expected, _, _, _, _ = crd_reference(crd, 3 * feat_s, feat_t, sample_idx, z_t.item(), z_s.item())
    # a fresh module given the state dict scores the next batch the same way
    resumed = tiny_crd(100, seed=5)
    resumed.load_state_dict(crd.state_dict())
    loss = crd(3 * feat_s, feat_t, idx, sample_idx)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.equal(crd.z_t, z_t) and torch.equal(crd.z_s, z_s)
    assert resumed(3 * feat_s, feat_t, idx, sample_idx).item() == pytest.approx(loss.item(), rel=1e-6)


def test_bank_initialisation_and_buffers():
    crd = CRD(8, 8, feat_dim=12, nce_n=4, nce_t=0.1, nce_mom=0.5, n_data=500)
    bound = 1 / math.sqrt(12 / 3)
    for bank in (crd.memory_s, crd.memory_t):
        assert bank.shape == (500, 12)
        assert bank.abs().max() <= bound
        assert bank.min() < -0.95 * bound and bank.max() > 0.95 * bound
        assert abs(bank.mean().item()) < 0.02
    assert not torch.equal(crd.memory_s, crd.memory_t)
    assert {'memory_s', 'memory_t', 'z_s', 'z_t'} <= set(crd.state_dict())
    assert {n for n, _ in crd.named_parameters()} == {
        'embed_s.weight', 'embed_s.bias', 'embed_t.weight', 'embed_t.bias'}


def test_bank_update_after_scoring():
    crd = tiny_crd(100)
    feat_s, feat_t, idx, sample_idx = tiny_inputs(100)
    old_s, old_t = np64(crd.memory_s), np64(crd.memory_t)
    # scoring uses the banks before the update
    expected, _, _, v_s, v_t = crd_reference(crd, feat_s, feat_t, sample_idx)
    assert crd(feat_s, feat_t, idx, sample_idx).item() == pytest.approx(expected, rel=1e-5)
    others = np.setdiff1d(np.arange(100), idx.numpy())
    for bank, old, v in ((crd.memory_s, old_s, v_s), (crd.memory_t, old_t, v_t)):
        new = np64(bank)
        for row, i in enumerate(idx.tolist()):
            mixed = 0.3 * old[i] + 0.7 * v[row]
            np.testing.assert_allclose(new[i], mixed / np.linalg.norm(mixed), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(new[others], old[others])


def test_eval_mode_leaves_banks_alone():
    crd = tiny_crd(100).eval()
    before = crd.memory_s.clone(), crd.memory_t.clone()
    crd(*tiny_inputs(100))
    assert torch.equal(crd.memory_s, before[0]) and torch.equal(crd.memory_t, before[1])


def test_float32_under_bf16_autocast():
    crd = tiny_crd(100)
    crd.load_state_dict({**crd.state_dict(), 'z_t': torch.tensor(3.0), 'z_s': torch.tensor(2.0)})
    crd.eval()
    inputs = tiny_inputs(100)
    plain = crd(*inputs)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mixed = crd(*inputs)
    assert mixed.dtype == torch.float32 and mixed.item() == pytest.approx(plain.item(), rel=1e-6)


# ----- registry and distiller -----

def build(overrides=None, labels=None, num_class=10, n_data=100, data_name='cifar10'):
    ctx = make_context('crd', {'nce_n': 16, **(overrides or {})}, n_data=n_data,
                       num_class=num_class, data_name=data_name)
    if labels is not None:
        ctx.train_labels = labels
    torch.manual_seed(0)
    return METHODS['crd'].build(ctx)


def test_registry_entry():
    m = METHODS['crd']
    # lambda_kd's default: its effect on a run is checked in tests/test_train_kd.py (SEED_DEFAULTS);
    # the other defaults as the built module uses them (nce_n 16384: see the next test)
    labels = torch.arange(20000) % 10
    ctx = make_context('crd', {'nce_n': 16}, n_data=20000)
    ctx.train_labels = labels
    crd = m.build(ctx)
    assert crd.crd.embed_s.out_features == crd.crd.embed_t.out_features == 128
    assert crd.crd.memory_s.shape == (20000, 128)
    assert crd.crd.nce_t == 0.1 and crd.crd.nce_mom == 0.5 and crd.mode == 'exact'
    assert make_context('crd', data_name='cifar10').args.lambda_kd == 0.2
    assert m.flags['mode'].choices == ('exact', 'relax')
    assert [m.flags[k].type for k in ('feat_dim', 'nce_n', 'nce_t', 'nce_mom')] == [int, int, float, float]
    assert make_context('crd', data_name='cifar100').args.lambda_kd == 0.8


def test_too_many_negatives_is_a_config_error():
    with pytest.raises(ConfigError, match='nce_n'):
        METHODS['crd'].build(make_context('crd'))  # 16384 negatives, 100 samples
    build({'nce_n': 90})  # 10 classes of 10: exactly 90 negatives each
    with pytest.raises(ConfigError):
        build({'nce_n': 91})
    labels = torch.tensor([0] * 30 + [1] * 10 + [2] * 20)
    build({'nce_n': 30}, labels=labels, num_class=3, n_data=60)  # the largest class leaves 30
    with pytest.raises(ConfigError, match='class 0'):
        build({'nce_n': 31}, labels=labels, num_class=3, n_data=60)


def test_distiller_forward_and_gradients():
    d = build()
    assert isinstance(d, Distiller)
    d.train()
    s, s_leaves = make_features(8, seed=0, requires_grad=True)
    t, t_leaves = make_features(8, seed=1, requires_grad=True)
    batch = Batch(torch.zeros(8, 3, 32, 32), torch.arange(8) % 10, torch.arange(8) * 3)
    loss = d(s, t, batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert s_leaves['feat'].grad is not None and s_leaves['feat'].grad.abs().sum() > 0
    assert all(leaf.grad is None for leaf in t_leaves.values())
    for p in d.learnable_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert {id(p) for p in d.learnable_parameters()} == {id(p) for p in d.crd.parameters()}
    # the sampler's tables are derived from the data, not checkpointed
    assert set(d.state_dict()) == {f'crd.{k}' for k in d.crd.state_dict()}


def shuffled_labels(sizes, seed=0):
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize('mode', ['exact', 'relax'])
def test_sampler_positives_and_negatives(mode):
    labels = shuffled_labels([30, 10, 20, 0, 15])
    d = build({'nce_n': 40, 'mode': mode}, labels=labels, num_class=5, n_data=75)
    idx = torch.randperm(75)
    torch.manual_seed(3)
    sample_idx = d.sample_contrast_idx(idx)
    assert sample_idx.shape == (75, 41) and sample_idx.dtype == torch.int64
    assert sample_idx.min() >= 0 and sample_idx.max() < 75
    own = labels[idx].unsqueeze(1)
    assert (labels[sample_idx[:, 1:]] != own).all()  # never a same-class negative
    # without replacement, as the seed: a row's negatives are distinct samples
    assert (sample_idx[:, 1:].sort(dim=1).values.diff(dim=1) > 0).all()
    if mode == 'exact':
        assert torch.equal(sample_idx[:, 0], idx)
    else:
        assert torch.equal(labels[sample_idx[:, 0]], labels[idx])
        assert (sample_idx[:, 0] != idx).any()


def test_sampler_covers_other_classes_uniformly():
    labels = shuffled_labels([100] * 10, seed=1)
    d = build({'nce_n': 900}, labels=labels, n_data=1000)
    idx = torch.nonzero(labels == 4).squeeze(1)  # 100 samples of class 4
    torch.manual_seed(4)
    negatives = d.sample_contrast_idx(idx)[:, 1:].flatten()  # 90000 draws
    per_class = torch.bincount(labels[negatives], minlength=10).double() / len(negatives)
    assert per_class[4] == 0
    others = torch.cat([per_class[:4], per_class[5:]])
    assert torch.allclose(others, torch.full_like(others, 1 / 9), rtol=0.05)
    per_sample = torch.bincount(negatives, minlength=1000)
    assert (per_sample[labels != 4] > 0).all()  # every other-class sample can be drawn


def test_sampler_is_uniform_over_samples_with_unbalanced_classes():
    labels = shuffled_labels([50, 30, 20], seed=2)
    d = build({'nce_n': 50, 'mode': 'relax'}, labels=labels, num_class=3, n_data=100)
    idx = torch.nonzero(labels == 2).squeeze(1).repeat(50)  # 1000 rows of class 2
    torch.manual_seed(5)
    sample_idx = d.sample_contrast_idx(idx)
    counts = torch.bincount(labels[sample_idx[:, 1:].flatten()], minlength=3).double()
    # negatives come from the 80 samples of classes 0 and 1 with equal chance each
    assert counts[1] / counts.sum() == pytest.approx(30 / 80, rel=0.03)
    positives = torch.bincount(sample_idx[:, 0], minlength=100)[labels == 2].double()
    assert positives.min() > 0.5 * positives.mean()  # relax: the whole class, evenly
