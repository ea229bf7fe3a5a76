"""AB (activation-boundary loss on pre-activations) against an element-by-element
computation, and its two-stage schedule: a KD-only 'init' stage over the
student's parameters, then cross-entropy only."""
import numpy as np
import pytest
import torch

from conftest import make_context, make_features
from test_loss_logits_fitnet_nst import features_with, regressor_reference
from kd_losses import AB, METHODS, ConfigError, Distiller
from network import resnet20

STAGES = ('rb1', 'rb2', 'rb3')


def ab_reference_loop(s, t, m):
    """Direct transcription of the definition in kd_losses/ab.py, one entry at a time (small tensors only)."""
    s, t = s.detach().double().numpy().ravel(), t.detach().double().numpy().ravel()
    total = 0.0
    for sv, tv in zip(s, t):
        if tv <= 0 and sv > -m:
            total += (sv + m) ** 2
        if tv > 0 and sv <= m:
            total += (sv - m) ** 2
    return total / len(s)


def ab_reference(s, t, m):
    """Same formula with numpy masks, for full-size maps."""
    s, t = s.detach().double().numpy(), t.detach().double().numpy()
    return np.mean(np.where((t <= 0) & (s > -m), (s + m) ** 2, 0.0)
                   + np.where((t > 0) & (s <= m), (s - m) ** 2, 0.0))


def test_hand_cases():
    ab = AB(2.0)
    # teacher on, student already beyond +m / teacher off, student beyond -m: nothing to do
    assert ab(torch.tensor([3.0, -5.0]), torch.tensor([1.0, -1.0])).item() == 0.0
    # student at 0 is inside the margin on both sides: each entry costs m^2 = 4
    assert ab(torch.zeros(2), torch.tensor([1.0, -1.0])).item() == pytest.approx(4.0)
    # t = 0 counts as "off"; s = -1 with t > 0 costs (-1 - 2)^2 = 9, s = 1 with t = 0 costs 9
    assert ab(torch.tensor([-1.0, 1.0]), torch.tensor([0.5, 0.0])).item() == pytest.approx(9.0)
    # the margin scales the cost: m = 1, s = 0, t > 0 -> 1
    assert AB(1.0)(torch.zeros(3), torch.ones(3)).item() == pytest.approx(1.0)


@pytest.mark.parametrize('m', [0.0, 0.5, 2.0])
def test_matches_loop_reference(m):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 4, 4, generator=g) * 2, torch.randn(2, 3, 4, 4, generator=g)
    assert AB(m)(s, t).item() == pytest.approx(ab_reference_loop(s, t, m), rel=1e-6)


def test_registry_defaults_and_flags():
    method = METHODS['ab']
    # lambda_kd's default: its effect on a run is checked in tests/test_train_kd.py (SEED_DEFAULTS)
    # the seed's 50 epochs of initialisation; m's default (2.0) is the margin of
    # test_distiller_forward_matches_reference_and_gradients
    ctx = make_context('ab', student=resnet20())
    assert [p.epochs for p in method.build(ctx).pretrain_phases(ctx)] == [50]
    assert method.flags['m'].type is float and method.flags['init_epochs'].type is int


def test_distiller_forward_matches_reference_and_gradients():
    distiller = METHODS['ab'].build(make_context('ab'))
    assert isinstance(distiller, Distiller)
    s, s_leaves = make_features(batch=4, seed=0, requires_grad=True)
    t, t_leaves = make_features(batch=4, seed=1, requires_grad=True)
    loss = distiller(s, t, None)
    assert loss.dim() == 0 and torch.isfinite(loss)
    expected = np.mean([ab_reference(getattr(s, k)[0], getattr(t, k)[0], 2.0) for k in STAGES])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    for key in STAGES:  # pre-activations are the leaves: AB reads them directly
        assert s_leaves[key].grad.abs().sum() > 0
    assert s_leaves['stem'].grad is None  # stem is not transferred
    assert all(leaf.grad is None for leaf in t_leaves.values())


def test_config_errors():
    with pytest.raises(ConfigError, match='--m'):
        METHODS['ab'].build(make_context('ab', {'m': -1.0}))
    # a student map a quarter of the teacher's size: no connector maps it (RepDistiller's neither)
    ctx = make_context('ab')
    ctx.student_shapes = {**ctx.student_shapes, 'rb2': (32, 4, 4)}
    with pytest.raises(ConfigError, match=r'ab: .*rb2 \(32, 4, 4\).*rb2 \(32, 16, 16\)'):
        METHODS['ab'].build(ctx)


# ----------------------------------------------------------------------------- across shapes

def test_equal_shapes_have_no_connector():
    distiller = METHODS['ab'].build(make_context('ab'))
    assert list(distiller.parameters()) == [] and distiller.state_dict() == {}
    assert all(isinstance(m.connector, torch.nn.Identity) for m in distiller.kd.per_key)


@pytest.mark.parametrize('s_rb2, kind', [((16, 16, 16), torch.nn.Conv2d),           # channels only
                                         ((32, 8, 8), torch.nn.ConvTranspose2d)])  # half the size
def test_connector_where_a_stage_differs(s_rb2, kind):
    """rb2 passes a connector (conv, BN, no ReLU: the targets are pre-activations);
    rb1 and rb3 are compared as they are. The connector trains in the init phase."""
    student = resnet20()
    ctx = make_context('ab', student=student)
    ctx.student_shapes = {**ctx.student_shapes, 'rb2': s_rb2}
    distiller = METHODS['ab'].build(ctx)
    connectors = [m.connector for m in distiller.kd.per_key]
    assert isinstance(connectors[0], torch.nn.Identity) and isinstance(connectors[2], torch.nn.Identity)
    connector = connectors[1]
    assert type(connector[0]) is kind and len(connector) == 2  # conv, BN
    distiller.train()
    s, s_leaves = features_with(ctx.student_shapes, batch=3, seed=0, requires_grad=True)
    t, _ = features_with(ctx.teacher_shapes, batch=3, seed=1)
    loss = distiller(s, t, None)
    rb2 = regressor_reference(connector, s.rb2[0])  # the pre-activation, connected
    assert rb2.shape == (3, 32, 16, 16)
    expected = np.mean([ab_reference(s.rb1[0], t.rb1[0], 2.0),
                        ab_reference(torch.from_numpy(rb2), t.rb2[0], 2.0),
                        ab_reference(s.rb3[0], t.rb3[0], 2.0)])
    assert loss.item() == pytest.approx(expected, rel=1e-5)

    # trained with the student in the init phase, saved with the distiller, idle afterwards
    phase = distiller.pretrain_phases(ctx)[0]
    params = list(connector.parameters())
    assert [id(p) for p in phase.params] == [id(p) for p in [*student.parameters(), *params]]
    assert distiller.kd in list(phase.train_modules)
    phase.loss(s, t, None).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert s_leaves['rb2'].grad.abs().sum() > 0
    assert distiller.learnable_parameters() == []
    assert 'kd.per_key.1.connector.0.weight' in distiller.state_dict()


# ----------------------------------------------------------------------------- two phases
# (the schedule itself: tests/test_two_phase.py)

def test_init_stage_loss_is_lambda_times_kd_without_ce():
    ctx = make_context('ab', {'lambda_kd': 3.0}, student=resnet20())
    distiller = METHODS['ab'].build(ctx)
    stage = distiller.pretrain_phases(ctx)[0]
    s, s_leaves = make_features(batch=2, seed=0, requires_grad=True)
    t, _ = make_features(batch=2, seed=1)
    loss = stage.loss(s, t, None)
    expected = 3.0 * np.mean([ab_reference(getattr(s, k)[0], getattr(t, k)[0], 2.0) for k in STAGES])
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert s_leaves['out'].grad is None
