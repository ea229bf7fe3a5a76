"""Factor transfer: the L1 loss between normalised factors against a direct
numpy computation, the paraphraser stage, the frozen paraphraser in the
main stage, and both stages' steps against the seed's train_ft.py."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import make_context, make_features
from dataset import Batch
from kd_losses import FT, METHODS, ConfigError, Distiller, PretrainPhase
from test_two_phase import assert_states_equal, built, float64, run, tiny_batches  # noqa: F401 (a fixture)


def ft_reference(factor_s, factor_t):
    """Per sample: flatten, divide by the L2 norm; mean |difference| over all entries."""
    s, t = factor_s.detach().double().numpy(), factor_t.detach().double().numpy()
    diffs = []
    for a, b in zip(s, t):
        a, b = a.ravel(), b.ravel()
        diffs.extend(np.abs(a / np.sqrt(np.sum(a ** 2)) - b / np.sqrt(np.sum(b ** 2))))
    return float(np.mean(diffs))


def batch_of(n):
    return Batch(torch.zeros(n, 3, 32, 32), torch.arange(n) % 10, torch.arange(n))


def build(overrides=None, data_name='cifar10'):
    torch.manual_seed(0)
    return METHODS['ft'].build(make_context('ft', overrides, data_name=data_name))


def ids(params):
    return {id(p) for p in params}


# ----- formula -----

def test_ft_matches_reference():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    assert FT()(s, t).item() == pytest.approx(ft_reference(s, t), rel=1e-5)


def test_ft_hand_cases():
    s = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    t = torch.tensor([0.0, 3.0]).view(1, 2, 1, 1)
    assert FT()(s, t).item() == pytest.approx(1.0)  # |1 - 0| + |0 - 1| over 2 entries
    x = torch.randn(3, 4, 2, 2)
    assert FT()(x, x).item() == pytest.approx(0.0, abs=1e-7)
    assert FT()(2.5 * x, x).item() == pytest.approx(0.0, abs=1e-6)  # per-sample scale is removed


# ----- registry -----

def test_registry_entry():
    m = METHODS['ft']
    # lambda_kd's default: its effect on a run is checked in tests/test_train_kd.py (SEED_DEFAULTS)
    # k's default (0.5): rb3's 64 channels become 32 factor channels; para_epochs':
    # test_paraphraser_stage
    t, _ = make_features(2, seed=1)
    factor, _ = build().paraphraser(t.rb3[1])
    assert factor.shape[1] == 32
    assert m.flags['k'].type is float and m.flags['para_epochs'].type is int


def test_shapes_and_batchnorm_on_cifar10_only():
    d = build()
    assert isinstance(d, Distiller)
    t, _ = make_features(2, seed=1)
    factor, reconstruction = d.paraphraser(t.rb3[1])
    assert factor.shape == (2, 32, 8, 8) and reconstruction.shape == (2, 64, 8, 8)
    assert d.translator(t.rb3[1]).shape == (2, 32, 8, 8)
    assert any(isinstance(m, nn.BatchNorm2d) for m in d.modules())
    assert all(m.bias is None for m in d.modules() if isinstance(m, nn.Conv2d))
    d100 = build(data_name='cifar100')
    assert not any(isinstance(m, nn.BatchNorm2d) for m in d100.modules())
    assert all(m.bias is not None for m in d100.modules() if isinstance(m, nn.Conv2d))
    assert build({'k': 0.25}).translator(t.rb3[1]).shape[1] == 16


def test_k_without_factor_channels_is_a_config_error():
    with pytest.raises(ConfigError):
        build({'k': 0.01})


# ----- paraphraser stage -----

def test_paraphraser_stage():
    d = build({'para_epochs': 7})
    stages = d.pretrain_phases(make_context('ft', {'para_epochs': 7}))
    assert len(stages) == 1
    stage = stages[0]
    assert isinstance(stage, PretrainPhase)
    assert stage.name == 'paraphraser' and stage.epochs == 7 and not stage.needs_student
    assert stage.nesterov is False and not stage.shares_main_optimizer  # the seed's own SGD
    assert all(stage.lr_scale(e) == pytest.approx(0.1) for e in range(1, 8))
    assert ids(stage.params) == ids(d.paraphraser.parameters())
    assert list(stage.train_modules) == [d.paraphraser]
    assert build().pretrain_phases(make_context('ft'))[0].epochs == 30


def test_paraphraser_loss_is_reconstruction_mse():
    d = build()
    stage = d.pretrain_phases(make_context('ft'))[0]
    d.eval()
    d.paraphraser.train()  # what the loop does for the stage
    t, _ = make_features(4, seed=2)
    loss = stage.loss(None, t, batch_of(4))
    with torch.no_grad():
        _, reconstruction = d.paraphraser(t.rb3[1])
    target = t.rb3[1].double().numpy()
    expected = np.mean((reconstruction.double().numpy() - target) ** 2)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    grads = [p.grad for p in d.paraphraser.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in d.translator.parameters())


# ----- main stage -----

def test_main_learnable_parameters_exclude_paraphraser():
    d = build()
    learnable = ids(d.learnable_parameters())
    assert learnable == ids(d.translator.parameters())
    assert not learnable & ids(d.paraphraser.parameters())


def test_paraphraser_stays_in_eval_mode():
    d = build()
    d.eval()
    d.paraphraser.train()  # its stage
    assert all(m.training for m in d.paraphraser.modules())
    d.train()  # the main stage
    assert all(m.training for m in d.translator.modules())
    assert not any(m.training for m in d.paraphraser.modules())
    bn = next(m for m in d.paraphraser.modules() if isinstance(m, nn.BatchNorm2d))
    before = bn.running_mean.clone()
    s, _ = make_features(4, seed=0)
    t, _ = make_features(4, seed=1, scale=3.0)
    d(s, t, batch_of(4))
    assert torch.equal(bn.running_mean, before)


def test_forward_matches_reference_and_gradients():
    d = build()
    d.train()
    s, s_leaves = make_features(4, seed=0, requires_grad=True)
    t, t_leaves = make_features(4, seed=1, requires_grad=True)
    loss = d(s, t, batch_of(4))
    assert loss.dim() == 0 and torch.isfinite(loss)
    with torch.no_grad():  # train-mode BN gives the same output on the same batch
        factor_t = d.paraphraser.encoder(t.rb3[1])
        factor_s = d.translator(s.rb3[1])
    assert loss.item() == pytest.approx(ft_reference(factor_s, factor_t), rel=1e-5)
    loss.backward()
    assert s_leaves['rb3'].grad is not None and s_leaves['rb3'].grad.abs().sum() > 0
    assert all(leaf.grad is None for leaf in t_leaves.values())
    assert all(p.grad is not None for p in d.translator.parameters())
    assert sum(p.grad.abs().sum() for p in d.translator.parameters()) > 0
    assert all(p.grad is None for p in d.paraphraser.parameters())


# ----- across shapes -----

def test_ft_pools_the_larger_factor_map():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    pooled = s.view(3, 4, 4, 2, 4, 2).mean(dim=(3, 5))
    assert FT()(s, t).item() == pytest.approx(ft_reference(pooled, t), rel=1e-5)
    assert FT()(t, s).item() == pytest.approx(ft_reference(t, pooled), rel=1e-5)


def test_translator_to_the_teachers_factors_across_shapes():
    """Student last stage (24, 4, 4), teacher (64, 8, 8): the translator maps 24
    channels to the teacher's 32 factor channels; the teacher's factor map is pooled."""
    ctx = make_context('ft', data_name='cifar100')
    ctx.student_shapes = {**ctx.student_shapes, 'rb3': (24, 4, 4)}
    torch.manual_seed(0)
    d = METHODS['ft'].build(ctx)
    assert d.key == 'rb3' and d.translator[0].in_channels == 24
    d.train()
    g = torch.Generator().manual_seed(6)
    fm_s = torch.relu(torch.randn(2, 24, 4, 4, generator=g)).requires_grad_()
    fm_t = torch.relu(torch.randn(2, 64, 8, 8, generator=g))
    s, _ = make_features(2, seed=0)
    t, _ = make_features(2, seed=1)
    s = s._replace(rb3=(fm_s, fm_s))
    t = t._replace(rb3=(fm_t, fm_t))
    loss = d(s, t, batch_of(2))
    with torch.no_grad():
        factor_s, factor_t = d.translator(fm_s), d.paraphraser.encoder(fm_t)
    assert factor_s.shape == (2, 32, 4, 4) and factor_t.shape == (2, 32, 8, 8)
    pooled_t = factor_t.view(2, 32, 4, 2, 4, 2).mean(dim=(3, 5))
    assert loss.item() == pytest.approx(ft_reference(factor_s, pooled_t), rel=1e-5)
    loss.backward()
    assert fm_s.grad.abs().sum() > 0
    assert all(p.grad is not None for p in d.translator.parameters())


# ----- against the seed's steps -----

def test_paraphraser_and_main_stages_step_as_the_seed(float64):
    """One paraphraser epoch and one main epoch on the same batches give the
    seed's train_ft.py weights to rounding: its paraphraser optimiser has
    momentum and weight decay but no Nesterov (the main one has Nesterov)."""
    args, model, teacher, distiller, phases = built('ft', epochs=1, extra=['--para_epochs', '1'])
    assert args.nesterov and [p.name for p in phases] == ['paraphraser', 'main']
    batches = tiny_batches()
    student, paraphraser, translator = (copy.deepcopy(m) for m in
                                        (model, distiller.paraphraser, distiller.translator))

    # the seed's train_para: its own SGD at 0.1 * lr, without Nesterov
    optimizer_para = torch.optim.SGD(paraphraser.parameters(), lr=args.lr * 0.1,
                                     momentum=args.momentum, weight_decay=args.weight_decay)
    paraphraser.train()
    for img, _, _ in batches:
        target = teacher(img).rb3[1].detach()
        _, reconstruction = paraphraser(target)
        loss = ((reconstruction - target) ** 2).mean()
        optimizer_para.zero_grad()
        loss.backward()
        optimizer_para.step()
    run(phases, args, batches, stop=1)
    assert_states_equal(distiller.paraphraser.state_dict(), paraphraser.state_dict(), 'paraphraser')

    # the seed's train: student and translator on a fresh SGD with Nesterov, the paraphraser frozen
    paraphraser.eval().requires_grad_(False)
    optimizer = torch.optim.SGD([*student.parameters(), *translator.parameters()], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.weight_decay, nesterov=True)
    student.train()
    translator.train()

    def normalised(factor):
        flat = factor.reshape(factor.shape[0], -1)
        return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)

    for img, target, _ in batches:
        s, t = student(img), teacher(img)
        factor_s, (factor_t, _) = translator(s.rb3[1]), paraphraser(t.rb3[1])
        kd = (normalised(factor_s) - normalised(factor_t.detach())).abs().mean()
        loss = F.cross_entropy(s.out, target) + kd * args.lambda_kd
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    run(phases, args, batches, start=1)
    assert_states_equal(model.state_dict(), student.state_dict(), 'student')
    assert_states_equal(distiller.translator.state_dict(), translator.state_dict(), 'translator')
    assert_states_equal(distiller.paraphraser.state_dict(), paraphraser.state_dict(), 'frozen paraphraser')
