"""DOT (--optimizer dot, capture.DOT): plain SGD when its two momenta are
equal, each step equal to a float64 transcription of mdistiller's
two-momentum update, both momenta saved and restored, the step traced as one
graph without host syncs like the default optimiser's, its flags checked
before anything is written, and a train_kd run that resumes bitwise."""
import io

import pytest
import torch

import records
import train_kd
from capture import DOT, SGD, configure_dynamo
from checkpoints import save_checkpoint
from conftest import StopRun, assert_same_run, distill_argv, stop_after_first_epoch_then_resume
from test_capture import SYNCING_OPS, CountingBackend, OpRecorder, batch_of, kd_setup, snapshot


def parameters(seed, shapes=((4, 3), (5,), (2, 2))):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]


def gradients(params, seed, used):
    """Random float64 gradients for the parameters whose index is in `used`, None elsewhere."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) if i in used else None
            for i, p in enumerate(params)]


def copies(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


# ----------------------------------------------------------------------------- the update

@pytest.mark.parametrize('weight_decay, kd_only', [(5e-4, False), (0.0, True)])
def test_equal_momenta_give_plain_sgd_on_the_summed_gradient(weight_decay, kd_only):
    """delta 0: the two buffers sum to SGD's. (A parameter only the distillation
    reaches skips weight decay in its first step, as in mdistiller: it is
    included where there is no weight decay.)"""
    params = parameters(0)
    ours, plain = copies(params), copies(params)
    dot = DOT(ours, lr=0.1, momentum=0.9, delta=0.0, weight_decay=weight_decay)
    sgd = SGD(plain, lr=0.1, momentum=0.9, weight_decay=weight_decay)
    for step in range(4):
        lr = 0.1 if step < 2 else 0.01
        dot.set_lr(lr), sgd.set_lr(lr)
        task = gradients(params, 10 + step, {0, 1})                        # 1: the task's alone
        kd = gradients(params, 20 + step, {0, 2} if kd_only else {0})      # 2: the distillation's alone
        dot.update_both(task, kd)
        sgd.update([k if t is None else t if k is None else t + k for t, k in zip(task, kd)])
        for a, b in zip(ours, plain):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not torch.equal(ours[0], params[0])


def reference_dot(params, task, kd, bufs, kd_bufs, lr, momentum, delta, weight_decay):
    """mdistiller engine/dot.py's step_kd() then step(), in float64: buffers
    start as None and are set to the first gradient; every parameter in place."""
    m_task, m_kd = momentum - delta, momentum + delta
    has_task = {i for i, g in enumerate(task) if g is not None}
    has_kd = {i for i, g in enumerate(kd) if g is not None}
    with torch.no_grad():
        for i in sorted(has_task):
            d = task[i] + weight_decay * params[i]
            if bufs[i] is None:
                bufs[i] = d.clone()
            else:
                bufs[i] = (m_task if i in has_kd else (m_kd + m_task) / 2) * bufs[i] + d
            params[i] -= lr * bufs[i]
        for i in sorted(has_kd):
            d = kd[i]
            if kd_bufs[i] is None:
                kd_bufs[i] = d.clone()
            elif i in has_task:
                kd_bufs[i] = m_kd * kd_bufs[i] + d
            else:
                kd_bufs[i] = (m_kd + m_task) / 2 * kd_bufs[i] + (d + weight_decay * params[i])
            params[i] -= lr * kd_bufs[i]


def test_each_step_equals_mdistillers_two_momentum_update():
    params = parameters(1)
    ours, ref = copies(params), copies(params)
    dot = DOT(ours, lr=0.05, momentum=0.9, delta=0.075, weight_decay=5e-4)
    bufs, kd_bufs = [None] * 3, [None] * 3
    # parameter 0: both gradients; 1: the task's alone; 2: the distillation's alone.
    # Step 2 is cross-entropy alone (a warm-up epoch): no distillation gradient at all.
    plan = [({0, 1}, {0, 2}), ({0, 1}, {0, 2}), ({0, 1, 2}, set()), ({0, 1}, {0, 2})]
    for step, (task_used, kd_used) in enumerate(plan):
        lr = 0.05 if step < 3 else 0.005
        dot.set_lr(lr)
        task, kd = gradients(params, 30 + step, task_used), gradients(params, 40 + step, kd_used)
        if kd_used:
            dot.update_both(task, kd)
        else:
            dot.update(task)
        lr = dot.lr_tensor.item()  # the learning rate as the optimiser holds it (float32)
        reference_dot(ref, task, kd, bufs, kd_bufs, lr, 0.9, 0.075, 5e-4)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        for mine, theirs in zip(dot.buffers + dot.kd_buffers, bufs + kd_bufs):
            torch.testing.assert_close(mine, torch.zeros_like(mine) if theirs is None else theirs,
                                       rtol=1e-12, atol=1e-14)


def test_a_saved_dot_resumes_both_momenta_exactly():
    params = parameters(2)
    dot = DOT(params, lr=0.1, momentum=0.9, delta=0.075, weight_decay=5e-4)
    for step in range(2):
        dot.update_both(gradients(params, 50 + step, {0, 1}), gradients(params, 60 + step, {0, 2}))
    saved = io.BytesIO()
    torch.save(dot.state_dict(), saved)
    saved.seek(0)
    again_params = copies(params)
    again = DOT(again_params, lr=0.7, momentum=0.9, delta=0.075, weight_decay=5e-4)
    buffers = again.buffers + again.kd_buffers
    again.load_state_dict(torch.load(saved, weights_only=True))
    assert all(a is b for a, b in zip(buffers, again.buffers + again.kd_buffers))  # copied in place
    assert again.lr_tensor.item() == pytest.approx(0.1) and again.kd_started.item() == 1.0
    for opt in (dot, again):
        opt.update_both(gradients(params, 70, {0, 1}), gradients(params, 80, {0, 2}))
    for a, b in zip(params, again_params):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match='not DOT'):
        again.load_state_dict(SGD(copies(params), lr=0.1, momentum=0.9).state_dict())


# ----------------------------------------------------------------------------- the captured step

def test_the_dot_step_traces_as_one_graph_equal_to_eager_without_host_syncs():
    configure_dynamo()
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        args, model, distiller, pretrain, step = kd_setup('st', extra=['--optimizer', 'dot'])
        assert isinstance(step.optimizer, DOT) and step.two_momenta
        backend = CountingBackend()
        distill, ce_only = ((torch.compile(f, fullgraph=True, dynamic=False, backend=backend)
                             for f in (step.distill, step.cross_entropy)) if compiled
                            else (step.distill, step.cross_entropy))
        for i in range(3):
            step.optimizer.set_lr(0.1 if i < 2 else 0.01)
            (distill if i != 1 else ce_only)(batch_of(8, seed=i))
        if compiled:
            assert backend.graphs == 2  # one graph per variant, none again for the lr change
        results.append(snapshot(model) + step.optimizer.buffers + step.optimizer.kd_buffers)
    for eager, traced in zip(*results):
        assert torch.equal(eager, traced)
    assert any(b.abs().sum() > 0 for b in step.optimizer.kd_buffers)
    recorder = OpRecorder()
    with recorder:
        step.distill(batch_of(8))
        step.cross_entropy(batch_of(8))
    assert not recorder.ops & set(SYNCING_OPS), sorted(recorder.ops & set(SYNCING_OPS))
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- train_kd

def kd_argv(base_run, root, note, extra=()):
    return distill_argv(base_run, root, note, 'st', 2, 50, ['--seed', '3', '--optimizer', 'dot', *extra])


def test_train_kd_with_dot_logs_it_and_resumes_bitwise(base_run, tmp_path, monkeypatch):
    train_kd.main(kd_argv(base_run, tmp_path, 'straight'))
    log = (tmp_path / 'straight' / 'log.txt').read_text()
    assert ('optimizer = dot (command line): cross-entropy gradient momentum 0.825, distillation '
            'gradient momentum 0.975' in log and 'dot_delta = 0.075 (default for --optimizer dot)' in log)
    assert 'nesterov = False (off: --optimizer dot has none (seed default: on))' in log
    state = torch.load(tmp_path / 'straight' / 'checkpoint.pth.tar', weights_only=True)['optimizer']
    assert all('momentum_kd_buffer' in s for s in state['state'].values())
    assert any(s['momentum_kd_buffer'].abs().sum() > 0 for s in state['state'].values())
    stop_after_first_epoch_then_resume(monkeypatch, kd_argv(base_run, tmp_path, 'resumed'))
    assert_same_run(tmp_path / 'straight', tmp_path / 'resumed')


@pytest.mark.parametrize('extra, message', [
    (['--dot_delta', '0.1'], '--dot_delta goes with --optimizer dot'),
    (['--optimizer', 'dot', '--momentum', '0.05'], 'must both lie in [0, 1)'),
    (['--optimizer', 'dot', '--dot_delta', '0.2'], 'must both lie in [0, 1)'),
    (['--optimizer', 'dot', '--nesterov'], 'no Nesterov form'),
])
def test_bad_dot_settings_stop_before_anything_is_written(base_run, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        train_kd.main(distill_argv(base_run, tmp_path / 'runs', 'bad', 'st', 1, 50, extra))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err
    assert not (tmp_path / 'runs').exists()


def test_a_run_saved_before_the_optimizer_flag_cannot_resume_with_dot(base_run, tmp_path, monkeypatch,
                                                                       capsys):
    """A checkpoint whose flags lack --optimizer (written before it existed)
    trained with SGD: resuming it with --optimizer dot is refused in one line."""
    argv = distill_argv(base_run, tmp_path, 'old', 'st', 2, 50, ['--seed', '3'])
    save = records.Checkpointer.__call__

    def save_then_stop(self, *a, **k):
        save(self, *a, **k)
        raise StopRun
    monkeypatch.setattr(records.Checkpointer, '__call__', save_then_stop)
    with pytest.raises(StopRun):  # stopped after its first epoch's checkpoint
        train_kd.main(argv)
    monkeypatch.setattr(records.Checkpointer, '__call__', save)
    path = tmp_path / 'old' / 'checkpoint.pth.tar'
    ckpt = torch.load(path, weights_only=False)
    del ckpt['args']['optimizer'], ckpt['args']['dot_delta'], ckpt['digest']
    save_checkpoint(ckpt, path)  # as an older zoo wrote it: the same, without the new flags
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_kd.main(argv + ['--resume', '--optimizer', 'dot'])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert '--optimizer dot (was sgd)' in err and 'Traceback' not in err
