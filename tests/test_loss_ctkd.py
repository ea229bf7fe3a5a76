"""CTKD: the gradient-reversal layer, the learned temperature's range, the
cosine curriculum of the reversal strength, the loss against float64 loops,
the registry entry, and, through train_kd.py on the tiny data, that the
temperature trains, is checkpointed and is restored by --resume (a 2-epoch
run equals the same run killed after epoch 1 and resumed, bitwise).

T = t_min + t_range * sigmoid(theta); loss = T^2 KL(softmax(t/T) || softmax(s/T)),
batch mean; theta's gradient reversed and scaled by lambda(epoch).
"""
import csv
import math

import numpy as np
import pytest
import torch

import records
import train_kd
from conftest import distill_argv, make_context, make_features
from kd_losses import CTKD, METHODS, ConfigError, Distiller, GradientReversal, SoftTarget
from kd_losses.ctkd import curriculum


def softmax_np(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def kd_reference(out_s, out_t, T):
    s, t = out_s.detach().double().numpy(), out_t.detach().double().numpy()
    total = 0.0
    for i in range(len(s)):
        p_s, p_t = softmax_np(s[i] / T), softmax_np(t[i] / T)
        total += sum(a * math.log(a / b) for a, b in zip(p_t, p_s))
    return T * T * total / len(s)


def random_case(batch=6, classes=10, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, classes, generator=g) * scale, torch.randn(batch, classes, generator=g) * scale


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ----------------------------------------------------------------------------- reversal layer

def test_gradient_reversal_is_identity_forward_and_minus_lambda_backward():
    x = torch.tensor([0.5, -2.0, 3.0], requires_grad=True)
    strength = torch.tensor(0.3)
    y = GradientReversal.apply(x, strength)
    assert torch.equal(y, x.detach())
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert x.grad.tolist() == pytest.approx([-0.3, -0.6, -0.9])
    # the strength is read when backward runs: a later fill_ (the next epoch) is seen
    x.grad = None
    y = GradientReversal.apply(x, strength)
    y.sum().backward()
    assert x.grad.tolist() == pytest.approx([-0.3] * 3)


def test_initial_temperature_and_loss():
    # theta starts at 1: T = 1 + 20 sigmoid(1) = 15.62...
    loss = CTKD(1.0, 20.0)
    T = 1 + 20 * sigmoid(1.0)
    assert loss.temperature().item() == pytest.approx(T, rel=1e-6)
    out_s, out_t = random_case(5, 10, seed=1)
    got = loss(out_s, out_t)
    assert got.dim() == 0 and got.item() == pytest.approx(kd_reference(out_s, out_t, T), rel=1e-5)
    assert got.item() == pytest.approx(SoftTarget(T)(out_s, out_t).item(), rel=1e-5)
    # the range: any theta gives T in (t_min, t_min + t_range)
    with torch.no_grad():
        loss.theta.fill_(-30.0)
    assert loss.temperature().item() == pytest.approx(1.0, abs=1e-6)
    with torch.no_grad():
        loss.theta.fill_(30.0)
    assert loss.temperature().item() == pytest.approx(21.0, rel=1e-6)


@pytest.mark.parametrize('strength', [0.0, 0.3, 1.0])
def test_theta_gradient_is_reversed_and_scaled(strength):
    out_s, out_t = random_case(5, 10, seed=2)
    loss = CTKD(1.0, 20.0)
    with torch.no_grad():
        loss.theta.fill_(-0.5)
    loss.grl_strength.fill_(strength)
    x = out_s.clone().requires_grad_(True)
    loss(x, out_t).backward()
    # reference: dL/dtheta without reversal, in float64, through T(theta)
    theta = torch.tensor(-0.5, dtype=torch.float64, requires_grad=True)
    T = 1 + 20 * torch.sigmoid(theta)
    ref_s = out_s.double().clone().requires_grad_(True)
    p_t = torch.softmax(out_t.double() / T, 1)
    ref = T * T * (p_t * (torch.log(p_t) - torch.log_softmax(ref_s / T, 1))).sum(1).mean()
    ref.backward()
    assert loss.theta.grad.item() == pytest.approx(-strength * theta.grad.item(), rel=1e-4, abs=1e-9)
    # the student's gradient is plain KD at that temperature, whatever the strength
    torch.testing.assert_close(x.grad.double(), ref_s.grad, rtol=1e-4, atol=1e-8)


def test_one_sgd_step_raises_the_loss_through_the_temperature():
    # adversarial: descending the reversed gradient moves T towards a larger KD loss
    out_s, out_t = random_case(6, 10, seed=3)
    loss = CTKD(1.0, 20.0)
    loss.grl_strength.fill_(1.0)
    before = loss(out_s, out_t)
    before.backward()
    with torch.no_grad():
        loss.theta -= 0.5 * loss.theta.grad
        assert loss(out_s, out_t).item() > before.item()


def test_curriculum_is_the_papers_cosine_ramp():
    # lambda(e) = (1 - cos(pi min(e, 10) / 10)) / 2, from epoch 1
    want = [0.024471741852423, 0.095491502812526, 0.206107373853763, 0.345491502812526, 0.5,
            0.654508497187474, 0.793892626146237, 0.904508497187474, 0.975528258147577, 1.0, 1.0, 1.0]
    assert [curriculum(e, 10, 1.0) for e in range(1, 13)] == pytest.approx(want, rel=1e-9)
    assert curriculum(3, 4, 0.5) == pytest.approx(0.5 * (1 - math.cos(math.pi * 3 / 4)) / 2)
    assert curriculum(1, 0, 0.7) == 0.7


def test_begin_epoch_fills_the_buffer_in_place():
    distiller = METHODS['ctkd'].build(make_context('ctkd'))
    buffer = distiller.ctkd.grl_strength
    ptr = buffer.data_ptr()
    for epoch in (1, 5, 10, 40):
        distiller.begin_epoch(epoch, 200)
        assert distiller.ctkd.grl_strength is buffer and buffer.data_ptr() == ptr
        assert buffer.item() == pytest.approx(curriculum(epoch, 10, 1.0))
    assert 'ctkd.grl_strength' not in distiller.state_dict()  # derived from the epoch


def test_logits_are_float32_under_bf16_autocast():
    out_s, out_t = random_case(4, 10, seed=4)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mixed = CTKD(1.0, 20.0)(out_s.bfloat16(), out_t.bfloat16())
    assert mixed.dtype == torch.float32 and torch.isfinite(mixed)


# ----------------------------------------------------------------------------- registry

def test_registry_defaults_are_the_official_cifar100_script():
    for data in ('cifar10', 'cifar100'):
        a = make_context('ctkd', data_name=data, num_class=100).args
        assert (a.lambda_kd, a.ce_weight, a.ctkd_t_min, a.ctkd_t_range, a.ctkd_ramp_epochs,
                a.ctkd_lambda_max, a.logit_stand) == (0.9, 0.1, 1.0, 20.0, 10, 1.0, False)
    with pytest.raises(ConfigError, match='ctkd_t_min'):
        METHODS['ctkd'].build(make_context('ctkd', {'ctkd_t_min': 0.0}))
    with pytest.raises(ConfigError, match='ctkd_ramp_epochs'):
        METHODS['ctkd'].build(make_context('ctkd', {'ctkd_ramp_epochs': -1}))


def test_distiller_learns_the_temperature_and_detaches_the_teacher():
    distiller = METHODS['ctkd'].build(make_context('ctkd'))
    assert isinstance(distiller, Distiller)
    params = list(distiller.learnable_parameters())
    assert len(params) == 1 and params[0] is distiller.ctkd.theta
    assert set(distiller.state_dict()) == {'ctkd.theta'}
    distiller.begin_epoch(3, 200)
    s, s_leaves = make_features(batch=5, seed=0, requires_grad=True)
    t, t_leaves = make_features(batch=5, seed=1, requires_grad=True)
    loss = distiller(s, t, None)
    assert loss.item() == pytest.approx(kd_reference(s.out, t.out, 1 + 20 * sigmoid(1.0)), rel=1e-5)
    loss.backward()
    assert s_leaves['out'].grad.abs().sum() > 0 and t_leaves['out'].grad is None
    assert distiller.ctkd.theta.grad is not None and distiller.ctkd.theta.grad.item() != 0


# ----------------------------------------------------------------------------- through train_kd.py

def kd_args(base_run, save_root, note, epochs=2):
    return distill_argv(base_run, save_root, note, 'ctkd', epochs, 50,
                        ['--seed', '3', '--ctkd_ramp_epochs', '2', '--print_freq', '100'])


def metric_rows(run_dir):
    with open(run_dir / 'metrics.csv') as f:
        return [{k: v for k, v in r.items() if k not in ('seconds', 'img_per_s')} for r in csv.DictReader(f)]


class Killed(Exception):
    pass


def test_temperature_trains_is_checkpointed_and_resumes_bitwise(base_run, tmp_path, monkeypatch):
    train_kd.main(kd_args(base_run, tmp_path, 'straight'))
    straight = torch.load(tmp_path / 'straight' / 'checkpoint.pth.tar', weights_only=True)
    theta = straight['distiller']['ctkd.theta']
    # it trained: weight decay alone would move it by ~1e-4 over the 4 steps
    assert abs(theta.item() - 1.0) > 1e-3

    # the same run, killed right after its first epoch's checkpoint, then resumed
    real_save = records.Checkpointer.__call__

    def save_then_die(self, phase_index, epoch, row):
        real_save(self, phase_index, epoch, row)
        raise Killed
    monkeypatch.setattr(records.Checkpointer, '__call__', save_then_die)
    with pytest.raises(Killed):
        train_kd.main(kd_args(base_run, tmp_path, 'resumed'))
    monkeypatch.setattr(records.Checkpointer, '__call__', real_save)
    killed = torch.load(tmp_path / 'resumed' / 'checkpoint.pth.tar', weights_only=True)
    assert killed['epoch'] == 1 and killed['distiller']['ctkd.theta'].item() != theta.item()
    train_kd.main(kd_args(base_run, tmp_path, 'resumed') + ['--resume'])

    resumed = torch.load(tmp_path / 'resumed' / 'checkpoint.pth.tar', weights_only=True)
    assert resumed['epoch'] == 2
    for key in ('net', 'distiller'):
        assert set(resumed[key]) == set(straight[key])
        for name, value in straight[key].items():
            assert torch.equal(value, resumed[key][name]), f'{key}.{name} differs after resume'
    assert metric_rows(tmp_path / 'straight') == metric_rows(tmp_path / 'resumed')
