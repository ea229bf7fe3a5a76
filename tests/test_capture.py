"""The static training step (capture.py): every configuration traces as one
graph, schedule changes never recompile, the captured/compiled step equals
the eager one, no step syncs with the host, and the capturable SGD is
torch's SGD."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import train_base
import train_dml
import train_kd
from capture import SGD, StepRunner, configure_dynamo
from dataset import DATASETS, Batch, DeviceLoader, TwoViewBatch
from kd_losses import METHODS

# Small settings that keep every method's step tiny (where the method has the flag).
TINY = {'nce_n': 16, 'feat_dim': 8, 'attack_size': 4}
NET = 'resnet8'  # the smallest CIFAR ResNet: tracing cost grows with the modules


def kd_setup(mode, batch_size=8, n_data=64, extra=()):
    argv = ['--data_name', 'cifar10', '--kd_mode', mode, '--t_name', NET, '--s_name', NET,
            '--t_model', 'random', '--s_init', 'random', '--device', 'cpu',
            '--batch_size', str(batch_size), *extra]
    for flag, value in TINY.items():
        if flag in METHODS[mode].flags:
            argv += [f'--{flag}', str(value)]
    args, _, _ = train_kd.parse_args(argv)
    labels = torch.arange(n_data) % 10
    torch.manual_seed(0)
    model, teacher, distiller, pretrain, main, step = train_kd.build_distillation(
        args, torch.device('cpu'), n_data, labels, load_weights=False)
    model.train()
    distiller.train()
    step.set_kd_scale(args.lambda_kd)
    return args, model, distiller, pretrain, step


def batch_of(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g),
                 torch.randperm(64, generator=g)[:n])


def step_batch(mode, n, seed=0):
    """batch_of(n), with a strong view for a two-view mode (a TwoViewBatch)."""
    batch = batch_of(n, seed)
    if len(METHODS[mode].views) == 1:
        return batch
    g = torch.Generator().manual_seed(seed + 1)
    return TwoViewBatch(*batch, torch.randn(n, 3, 32, 32, generator=g))


class CountingBackend:
    """A torch.compile backend that runs the traced graph as it is and counts compilations."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


@pytest.fixture(autouse=True)
def fresh_dynamo():
    configure_dynamo()
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- one graph per step

@pytest.mark.parametrize('mode', sorted(METHODS))
def test_every_kd_mode_traces_as_one_graph(mode):
    args, model, distiller, pretrain, step = kd_setup(mode)
    if not distiller.capturable:
        pytest.skip(f'{mode} runs eagerly under --compile (it declares capturable = False)')
    backend = CountingBackend()
    torch.compile(step.distill, fullgraph=True, dynamic=False, backend=backend)(step_batch(mode, 8))
    for phase in pretrain:  # AB/FSP initialisation, FT's paraphraser
        torch.compile(phase.step, fullgraph=True, dynamic=False, backend=backend)(batch_of(8))
    assert backend.graphs == 1 + len(pretrain)


def test_the_other_steps_trace_as_one_graph():
    backend = CountingBackend()
    args, model, distiller, pretrain, step = kd_setup('st')
    torch.compile(step.cross_entropy, fullgraph=True, backend=backend)(batch_of(8))  # KD weight 0
    base_args = train_base.parse_args(['--data_name', 'cifar10', '--net_name', NET, '--device', 'cpu'])
    net, phase = train_base.build_baseline(base_args, torch.device('cpu'))
    torch.compile(phase.step, fullgraph=True, backend=backend)(batch_of(8))
    dml_args = train_dml.parse_args(['--data_name', 'cifar10', '--net1_name', NET, '--net2_name', NET,
                                     '--net1_init', 'random', '--net2_init', 'random', '--device', 'cpu'])
    nets, phase = train_dml.build_mutual(dml_args, torch.device('cpu'))
    torch.compile(phase.step, fullgraph=True, backend=backend)(batch_of(8))
    from utils import Evaluator
    loader = DeviceLoader(torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.arange(8), DATASETS['cifar10'],
                          8, 'cpu', train=False)
    evaluator = Evaluator(net, loader)
    torch.compile(evaluator.step, fullgraph=True, backend=backend)(batch_of(8))
    assert backend.graphs == 4


# ----------------------------------------------------------------------------- no recompilation

def test_schedule_changes_and_the_last_batch_compile_nothing_new():
    """Two epochs of 64 images in batches of 24 (a last batch of 16), an lr
    drop and new KD weights between them, and a switch to the CE-only variant:
    after the first epoch of each variant, nothing is compiled again."""
    args, model, distiller, pretrain, step = kd_setup('crd', batch_size=24)
    backend = CountingBackend()
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    loader = DeviceLoader(images, torch.arange(64) % 10, DATASETS['cifar10'], 24, 'cpu', train=True)
    runner = StepRunner(step, 'inductor', 'cpu', backend=backend)

    def epoch(lr, kd_scale):
        step.optimizer.set_lr(lr)
        step.set_kd_scale(kd_scale)
        for batch in loader:
            runner(batch)

    epoch(0.1, 0.2)
    assert backend.graphs == 2  # full and last batch
    epoch(0.01, 0.05)           # lr drop, new KD weight
    epoch(0.001, 0.8)
    assert backend.graphs == 2
    epoch(0.001, 0.0)           # KD weight 0: the CE-only variant, compiled once
    assert backend.graphs == 4
    epoch(0.001, 0.3)
    epoch(0.001, 0.0)
    assert backend.graphs == 4
    assert step.optimizer.lr_tensor.item() == pytest.approx(0.001) and step.kd_scale.item() == 0.0


# ----------------------------------------------------------------------------- same numbers

def snapshot(*modules):
    return [t.detach().clone() for m in modules for t in m.state_dict().values()]


@pytest.mark.parametrize('mode', ['st', 'crd', 'vid', 'sobolev'])
def test_the_traced_step_equals_the_eager_step_bitwise(mode):
    """Same ops in the same order: the step run through dynamo (eager backend)
    gives bitwise the eager step's weights, buffers and statistics, over
    steps with an lr change between them."""
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        args, model, distiller, pretrain, step = kd_setup(mode)
        fn = torch.compile(step.distill, fullgraph=True, dynamic=False, backend='eager') \
            if compiled else step.distill
        torch.manual_seed(1)  # CRD's negatives are drawn inside the step
        for i in range(3):
            step.optimizer.set_lr(0.1 if i < 2 else 0.01)
            fn(batch_of(8, seed=i))
        results.append(snapshot(model, distiller) + [step.stats.total.clone()] + step.optimizer.buffers)
    for eager, traced in zip(*results):
        assert torch.equal(eager, traced)


def test_inductor_compiles_a_step_that_matches_eager():
    """One baseline step compiled by inductor from the same state as an eager
    one: equal within float32 rounding (fused kernels sum in another order)."""
    args = train_base.parse_args(['--data_name', 'cifar10', '--net_name', NET, '--device', 'cpu'])
    torch.manual_seed(0)
    net, phase = train_base.build_baseline(args, torch.device('cpu'))
    start = copy.deepcopy(net.state_dict())
    phase.step(batch_of(16))
    eager = snapshot(net)
    net.load_state_dict(start)
    phase.optimizer.load_state_dict(SGD(list(net.parameters()), lr=0.1).state_dict())
    phase.stats.reset()
    torch.compile(phase.step, fullgraph=True, dynamic=False)(batch_of(16))
    for a, b in zip(eager, snapshot(net)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- no host sync

SYNCING_OPS = ('_local_scalar_dense', 'nonzero', 'masked_select', 'item', 'is_nonzero', 'equal',
               '_assert_async')


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('mode', sorted(METHODS))
def test_no_step_syncs_with_the_host(mode):
    """No op of a KD step (either variant) or its pre-training phases reads a
    value back to the host: `.item()`, data-dependent shapes, asserts."""
    args, model, distiller, pretrain, step = kd_setup(mode)
    if not distiller.capturable:
        pytest.skip(f'{mode} declares capturable = False')
    recorder = OpRecorder()
    with recorder:
        step.distill(step_batch(mode, 8))
        step.cross_entropy(step_batch(mode, 8))
        for phase in pretrain:
            phase.step(batch_of(8))
    assert not recorder.ops & set(SYNCING_OPS), sorted(recorder.ops & set(SYNCING_OPS))


def test_the_recorder_sees_a_sync():
    recorder = OpRecorder()
    with recorder:
        torch.ones(3).sum().item()
        torch.ones(3)[torch.ones(3) > 0]
    assert {'_local_scalar_dense', 'nonzero'} <= recorder.ops or 'index' in recorder.ops


# ----------------------------------------------------------------------------- the optimiser

@pytest.mark.parametrize('nesterov, weight_decay, momentum', [(True, 1e-4, 0.9), (False, 5e-4, 0.9),
                                                              (False, 0.0, 0.0)])
def test_sgd_is_torch_sgd(nesterov, weight_decay, momentum):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    ours_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = torch.optim.SGD(params, lr=0.1, momentum=momentum, nesterov=nesterov,
                                weight_decay=weight_decay, foreach=True)
    ours = SGD(ours_params, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    for i in range(4):
        lr = 0.1 if i < 2 else 0.01
        for group in reference.param_groups:
            group['lr'] = lr
        ours.set_lr(lr)
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        reference.step()
        ours.update([g.clone() for g in grads])
        for a, b in zip(params, ours_params):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # a resumed optimiser continues exactly: torch's state dict format, copied into our buffers
    again = SGD([torch.nn.Parameter(p.detach().clone()) for p in ours_params], lr=0.5,
                momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    buffers = [b for b in again.buffers]
    again.load_state_dict(reference.state_dict())
    assert all(b is c for b, c in zip(buffers, again.buffers))
    assert again.param_groups[0]['lr'] == 0.01 and again.lr_tensor.item() == pytest.approx(0.01)
    if momentum:
        for b, p in zip(again.buffers, params):
            assert torch.equal(b, reference.state[p]['momentum_buffer'])


def test_sgd_skips_parameters_the_loss_did_not_use():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = SGD([a, b], lr=0.1, momentum=0.9, weight_decay=0.1)
    opt.update([torch.ones(2), None])
    assert torch.equal(b, torch.ones(2)) and torch.equal(opt.buffers[1], torch.zeros(2))
    assert not torch.equal(a, torch.ones(2))


def test_a_frozen_teachers_weights_cast_once_give_the_same_outputs():
    """With --amp the teacher's convolution weights are stored in bf16 once;
    autocast would cast them to bf16 for every forward: the outputs are equal."""
    import argparse
    from network import build_network
    from utils import cast_frozen_weights
    torch.manual_seed(0)
    net = build_network(NET, 10).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        before = net(x)
    cast_frozen_weights(net, argparse.Namespace(amp=True))
    assert {m.weight.dtype for m in net.modules() if isinstance(m, torch.nn.Conv2d)} == {torch.bfloat16}
    assert net.head.weight.dtype == torch.float32
    with torch.autocast('cpu', dtype=torch.bfloat16):
        after = net(x)
    for a, b in zip(before, after):
        for u, v in (zip(a, b) if isinstance(a, tuple) else [(a, b)]):
            assert torch.equal(u, v)


# ----------------------------------------------------------------------------- whole runs

def test_a_run_with_the_compiled_step_equals_the_eager_run_and_resumes_exactly(base_run, tmp_path,
                                                                               monkeypatch):
    """train_kd.py with --compile inductor (traced with the eager backend here:
    the same ops) gives bitwise the eager run, CRD's random negatives drawn
    inside the step included; stopped after its first epoch and resumed, it
    still does."""
    import capture
    import csv
    import records
    real_init = capture.StepRunner.__init__

    def eager_backend(self, *args, **kwargs):
        kwargs['backend'] = 'eager'
        real_init(self, *args, **kwargs)
    monkeypatch.setattr(capture.StepRunner, '__init__', eager_backend)

    def run(note, compile_mode, *extra):
        train_kd.main(['--data_name', 'cifar10', '--img_root', base_run['img_root'],
                       '--save_root', str(tmp_path), '--note', note, '--s_name', 'resnet20',
                       '--t_name', 'resnet20', '--s_init', base_run['initial'], '--t_model',
                       base_run['best'], '--kd_mode', 'crd', '--nce_n', '16', '--feat_dim', '8',
                       '--epochs', '2', '--batch_size', '50', '--device', 'cpu', '--no_download',
                       '--compile', compile_mode, *extra])

    def result(note):
        ckpt = torch.load(tmp_path / note / 'checkpoint.pth.tar', weights_only=True)
        rows = list(csv.DictReader(open(tmp_path / note / 'metrics.csv')))
        assert {r['step_path'] for r in rows} == {'eager' if note == 'eager' else 'inductor'}, note
        rows = [{k: v for k, v in r.items() if k not in ('seconds', 'img_per_s', 'step_path')}
                for r in rows]
        return ckpt, rows

    run('eager', 'off')
    run('compiled', 'inductor')
    real_call = records.Checkpointer.__call__

    def stop_after_the_first_epoch(self, *args):
        real_call(self, *args)
        raise KeyboardInterrupt
    monkeypatch.setattr(records.Checkpointer, '__call__', stop_after_the_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run('resumed', 'inductor')
    monkeypatch.setattr(records.Checkpointer, '__call__', real_call)
    run('resumed', 'inductor', '--resume')
    eager, eager_rows = result('eager')
    for note in ('compiled', 'resumed'):
        ckpt, rows = result(note)
        assert rows == eager_rows, note
        for key in ('net', 'distiller'):
            for name, value in eager[key].items():
                assert torch.equal(ckpt[key][name], value), (note, key, name)
