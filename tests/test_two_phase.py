"""The two-phase schedule AB and FSP share (kd_losses/_two_phase.py): a
KD-only initialisation of the student, then cross-entropy only, both on one
optimiser; against a float64 transcription of the seed's two stages."""
import copy

import pytest
import torch
import torch.nn.functional as F

import train_kd
from conftest import assert_same_run, distill_argv, make_context, make_features, StopRun
from dataset import Batch
from kd_losses import METHODS
from network import resnet20
from utils import fit

MODES = ['ab', 'fsp']


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('init_epochs, expected', [
    (50, [0.1] * 30 + [0.01] * 10 + [0.001] * 10),   # the seed's schedule
    (20, [0.1] * 12 + [0.01] * 4 + [0.001] * 4),
    (10, [0.1] * 6 + [0.01] * 2 + [0.001] * 2),
    (5, [0.1] * 3 + [0.01] + [0.001]),
    (2, [0.1, 0.01]),
    (1, [0.1]),
])
def test_init_stage_epochs_and_lr(mode, init_epochs, expected):
    ctx = make_context(mode, {'init_epochs': init_epochs}, student=resnet20())
    stages = METHODS[mode].build(ctx).pretrain_phases(ctx)
    assert [st.name for st in stages] == ['init']
    assert stages[0].epochs == init_epochs and stages[0].needs_student
    assert [stages[0].lr_scale(e) for e in range(1, init_epochs + 1)] == pytest.approx(expected)


@pytest.mark.parametrize('mode', MODES)
def test_init_stage_trains_exactly_the_student(mode):
    student, teacher = resnet20(), resnet20()
    ctx = make_context(mode, student=student, teacher=teacher)
    distiller = METHODS[mode].build(ctx)
    stage = distiller.pretrain_phases(ctx)[0]
    assert [id(p) for p in stage.params] == [id(p) for p in student.parameters()]
    assert student in list(stage.train_modules)
    assert list(distiller.parameters()) == []  # nothing of its own to learn

    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = Batch(img, torch.tensor([0, 1]), torch.tensor([0, 1]))
    with torch.no_grad():
        t = teacher(img)
    loss = stage.loss(student(img), t, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert student.conv1.weight.grad.abs().sum() > 0
    assert student.res1[0].conv1.weight.grad.abs().sum() > 0
    assert student.fc.weight.grad is None  # no cross-entropy (the step gives fc a zero gradient)


@pytest.mark.parametrize('mode', MODES)
def test_init_stage_loss_is_lambda_times_kd(mode):
    ctx = make_context(mode, {'lambda_kd': 2.5}, student=resnet20())
    distiller = METHODS[mode].build(ctx)
    s, _ = make_features(batch=2, seed=3)
    t, _ = make_features(batch=2, seed=4)
    stage = distiller.pretrain_phases(ctx)[0]
    assert stage.loss(s, t, None).item() == pytest.approx(2.5 * distiller(s, t, None).item(),
                                                          rel=1e-6)


@pytest.mark.parametrize('mode', MODES)
def test_main_stage_is_ce_only(mode):
    distiller = METHODS[mode].build(make_context(mode))
    assert all(distiller.kd_weight(e, 200) == 0 for e in range(1, 201))
    assert all(distiller.kd_weight(e, 3) == 0 for e in range(1, 4))


@pytest.mark.parametrize('mode', MODES)
def test_init_stage_needs_the_student(mode):
    ctx = make_context(mode)
    with pytest.raises(ValueError, match='student'):
        METHODS[mode].build(ctx).pretrain_phases(ctx)


# ----------------------------------------------------------------------------- against the seed's steps

@pytest.fixture
def float64(monkeypatch):
    """Networks, optimiser and losses in float64, so a step can be compared
    with the reference to rounding: the losses' `.float()` (float32 under
    bf16 autocast) is made to keep a float64 tensor as it is."""
    to_float = torch.Tensor.float
    monkeypatch.setattr(torch.Tensor, 'float',
                        lambda self, *a, **k: self if self.dtype == torch.float64 else to_float(self, *a, **k))
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


class Batches(list):
    """The same few batches every epoch, as utils.fit reads a loader."""
    device = torch.device('cpu')


def tiny_batches(n_batches=2, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batches(Batch(torch.randn(batch, 3, 32, 32, generator=g),
                         torch.randint(0, 10, (batch,), generator=g),
                         torch.arange(batch) + i * batch) for i in range(n_batches))


def built(mode, epochs=2, extra=(), t_name='resnet8'):
    """train_kd's phases for `mode`, `t_name` -> resnet8 with random weights, on the CPU."""
    argv = ['--data_name', 'cifar10', '--kd_mode', mode, '--t_name', t_name, '--s_name', 'resnet8',
            '--t_model', 'random', '--s_init', 'random', '--device', 'cpu', '--batch_size', '4',
            '--epochs', str(epochs), *extra]
    args, _, _ = train_kd.parse_args(argv)
    torch.manual_seed(0)
    model, teacher, distiller, pretrain, main, _ = train_kd.build_distillation(
        args, torch.device('cpu'), 8, torch.arange(8) % 10, load_weights=False)
    return args, model, teacher, distiller, [*pretrain, main]


def run(phases, args, batches, start=0, stop=None):
    """utils.fit over phases[start:stop] (epochs as built), without checkpoints."""
    def no_checkpoint(*_):
        pass
    no_checkpoint.describe_last_save = lambda: ''
    fit(phases[:stop], batches, args, no_checkpoint, start=(start, 0))


def seed_ab(s, t, m):
    """The seed's AB (kd_losses/ab.py) on rb1..3 pre-activations, averaged."""
    def ab(fs, ft):
        return ((fs + m).pow(2) * ((fs > -m) & (ft <= 0)) + (fs - m).pow(2) * ((fs <= m) & (ft > 0))).mean()
    return sum(ab(getattr(s, k)[0], getattr(t, k)[0].detach()) for k in ('rb1', 'rb2', 'rb3')) / 3.0


def seed_fsp(s, t):
    """The seed's FSP (kd_losses/fsp.py) on (stem, rb1), (rb1, rb2), (rb2, rb3) post-activations, averaged."""
    def matrix(a, b):
        if a.shape[2] > b.shape[2]:  # the seed pools the first map to the second's size (2x here)
            n, c, h, w = a.shape
            a = a.reshape(n, c, b.shape[2], h // b.shape[2], b.shape[3], w // b.shape[3]).mean(dim=(3, 5))
        return torch.bmm(a.flatten(2), b.flatten(2).transpose(1, 2)) / (a.shape[2] * a.shape[3])

    keys = ('stem', 'rb1', 'rb2', 'rb3')
    return sum(((matrix(getattr(s, a)[1], getattr(s, b)[1])
                 - matrix(getattr(t, a)[1].detach(), getattr(t, b)[1].detach())) ** 2).mean()
               for a, b in zip(keys[:-1], keys[1:])) / 3.0


def seed_two_stages(mode, student, teacher, batches, args, init_lrs, main_lrs):
    """The seed's train_kd.py for AB/FSP, step by step: ONE torch.optim.SGD over
    the student (Nesterov), train_init's epochs on 0 * CE + lambda_kd * KD at
    its lrs, then train()'s epochs on CE + 0 * KD (lambda_kd set to 0) at the
    main lrs. Returns the student's state after each stage."""
    kd = (lambda s, t: seed_ab(s, t, args.m)) if mode == 'ab' else seed_fsp
    optimizer = torch.optim.SGD(student.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay, nesterov=True)
    states = []
    for lrs, ce_weight, kd_weight in ((init_lrs, 0.0, args.lambda_kd), (main_lrs, 1.0, 0.0)):
        student.train()
        for lr in lrs:
            for group in optimizer.param_groups:
                group['lr'] = lr
            for img, target, _ in batches:
                s, t = student(img), teacher(img)
                loss = F.cross_entropy(s.out, target) * ce_weight + kd(s, t) * kd_weight
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        states.append(copy.deepcopy(student.state_dict()))
    return states


def assert_states_equal(got, expected, what, atol=1e-13):
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=atol,
                                   msg=lambda m: f'{what}, {name}: {m}')


@pytest.mark.parametrize('mode', MODES)
def test_init_and_main_stages_step_as_the_seed(float64, mode):
    """Two init epochs (0.1, 0.01 of lr) and two main epochs (lr, lr/10) on the
    same batches give the seed's weights to rounding: the classifier decays
    through the init stage (zero gradient, weight decay and momentum), and
    the main stage starts from the init stage's momentum."""
    args, model, teacher, distiller, phases = built(mode, extra=['--init_epochs', '2'])
    assert [p.name for p in phases] == ['init', 'main'] and phases[0].optimizer is phases[1].optimizer
    batches = tiny_batches()
    reference = copy.deepcopy(model)
    fc_before = model.fc.weight.detach().clone()
    after_init, after_main = seed_two_stages(mode, reference, teacher, batches, args,
                                             init_lrs=[0.01, 0.001], main_lrs=[0.1, 0.01])
    run(phases, args, batches, stop=1)
    assert not torch.equal(model.fc.weight, fc_before)  # moved by weight decay and momentum alone
    assert_states_equal(model.state_dict(), after_init, f'{mode} after the init stage')
    run(phases, args, batches, start=1)
    assert_states_equal(model.state_dict(), after_main, f'{mode} after the main stage')


def test_ab_connectors_share_the_optimiser_and_rest_in_the_main_stage():
    """Between maps of different shapes AB trains connectors in the init stage,
    in the one optimiser with the student; the main stage (CE alone) gives
    them no gradient, so neither they nor their momentum move."""
    args, model, teacher, distiller, phases = built('ab', epochs=1, extra=['--init_epochs', '1'],
                                                    t_name='resnet8x4')
    connectors = list(distiller.parameters())
    optimizer = phases[1].optimizer
    assert connectors and phases[0].optimizer is optimizer
    held = {id(p) for p in optimizer.params}
    assert held == {id(p) for p in [*model.parameters(), *connectors]}
    before = [p.detach().clone() for p in connectors]
    run(phases, args, tiny_batches(), stop=1)
    assert all(not torch.equal(p, b) for p, b in zip(connectors, before))
    trained = [p.detach().clone() for p in connectors]
    momentum = [optimizer.state[p]['momentum_buffer'].clone() for p in connectors]
    fc = model.fc.weight.detach().clone()
    run(phases, args, tiny_batches(), start=1)
    assert not torch.equal(model.fc.weight, fc)
    assert all(torch.equal(p, b) for p, b in zip(connectors, trained))
    assert all(torch.equal(optimizer.state[p]['momentum_buffer'], b) for p, b in zip(connectors, momentum))


def test_stopped_after_the_init_stage_resumes_with_its_momentum(base_run, tmp_path, monkeypatch):
    """Stopped right after the last init epoch's checkpoint and resumed, a run
    enters the main stage with the shared optimiser's momentum restored: it
    ends exactly as the uninterrupted run. (Stopped inside the init stage:
    tests/test_resume.py.)"""
    def argv(note):
        return distill_argv(base_run, tmp_path, note, 'ab', 1, 50, ['--init_epochs', '1', '--seed', '3'])

    train_kd.main(argv('straight'))
    import records
    save = records.Checkpointer.__call__

    def save_then_stop(self, *a, **k):
        save(self, *a, **k)
        raise StopRun
    monkeypatch.setattr(records.Checkpointer, '__call__', save_then_stop)
    with pytest.raises(StopRun):
        train_kd.main(argv('resumed'))
    monkeypatch.setattr(records.Checkpointer, '__call__', save)
    stopped = torch.load(tmp_path / 'resumed' / 'checkpoint.pth.tar', weights_only=True)
    assert (stopped['phase_index'], stopped['phase_epoch']) == (0, 1)  # the init stage's end
    train_kd.main(argv('resumed') + ['--resume'])
    assert_same_run(str(tmp_path / 'straight'), str(tmp_path / 'resumed'))
