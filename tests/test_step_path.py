"""Every run records the step path that really ran (eager, graphs, inductor)
and, for a fallback, its reason: in metrics.csv (per epoch), complete.json (per
phase) and log.txt; `--compile graphs` off CUDA is refused before anything is
written, `--compile auto` falls back to eager there and says why."""
import csv
import json

import pytest
import torch

import records
import train_base
import train_dml
import train_kd
import utils
from capture import StepRunner
from conftest import StopRun, distill_argv

NO_CUDA = 'CUDA graphs need a CUDA device, this step runs on cpu'


def base_argv(root, save_root, note, *extra, epochs=1):
    return ['--data_name', 'cifar10', '--net_name', 'resnet8', '--img_root', root, '--save_root',
            str(save_root), '--note', note, '--epochs', str(epochs), '--batch_size', '50', '--device', 'cpu',
            '--no_download', *extra]


def recorded(run_dir):
    """(metrics rows, complete.json, log.txt) of a run."""
    with open(run_dir / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((run_dir / 'complete.json').read_text()), (run_dir / 'log.txt').read_text()


def test_an_eager_cpu_run_records_its_path_everywhere(cifar10_root, tmp_path):
    train_base.main(base_argv(cifar10_root, tmp_path, 'eager', epochs=2))
    rows, complete, log = recorded(tmp_path / 'eager')
    assert [(r['step_path'], r['step_fallback']) for r in rows] == [('eager', ''), ('eager', '')]
    assert complete['step_paths'] == {'main': {'path': 'eager', 'fallback': None}}
    assert log.count('[main] step path: eager\n') == 1  # said once per phase, not every epoch


def test_graphs_on_the_cpu_is_refused_before_anything_is_written(cifar10_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        train_base.main(base_argv(cifar10_root, tmp_path, 'graphs', '--compile', 'graphs'))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('error: --compile graphs needs CUDA')
    assert '--compile auto' in err
    assert not (tmp_path / 'graphs').exists()


def test_auto_on_the_cpu_runs_eagerly_and_records_why(cifar10_root, tmp_path):
    train_base.main(base_argv(cifar10_root, tmp_path, 'auto', '--compile', 'auto'))
    rows, complete, log = recorded(tmp_path / 'auto')
    why = f'--compile auto: {NO_CUDA}'
    assert [(r['step_path'], r['step_fallback']) for r in rows] == [('eager', why)]  # the test step's same reason once
    assert complete['step_paths'] == {'main': {'path': 'eager', 'fallback': why}}
    assert f'[main] step path: eager ({why})' in log


def test_dml_records_its_path(cifar10_root, tmp_path):
    train_dml.main(['--data_name', 'cifar10', '--img_root', cifar10_root, '--save_root', str(tmp_path),
                    '--note', 'dml', '--net1_name', 'resnet8', '--net2_name', 'resnet8', '--net1_init',
                    'random', '--net2_init', 'random', '--epochs', '1', '--batch_size', '50', '--device',
                    'cpu', '--no_download', '--compile', 'auto'])
    rows, complete, log = recorded(tmp_path / 'dml')
    assert [(r['step_path'], r['step_fallback']) for r in rows] == [('eager', f'--compile auto: {NO_CUDA}')]
    assert complete['step_paths']['main']['path'] == 'eager'


def test_a_step_that_is_not_capturable_records_its_fallback(base_run, tmp_path):
    """KDSVD's step needs the host (an SVD): under --compile it runs eagerly,
    and the record says so; the test step's own reason (no CUDA) comes after."""
    train_kd.main(distill_argv(base_run, tmp_path, 'kdsvd', 'kdsvd', extra=['--compile', 'auto']))
    rows, complete, log = recorded(tmp_path / 'kdsvd')
    train_why = '--compile auto: the step needs the host inside it (--kd_mode kdsvd synchronises with the host)'
    expected = f'{train_why}; test step: --compile auto: {NO_CUDA}'
    assert [(r['step_path'], r['step_fallback']) for r in rows] == [('eager', expected)]
    assert complete['step_paths'] == {'main': {'path': 'eager', 'fallback': expected}}
    assert f'[main] step path: eager ({expected})' in log


def test_each_row_keeps_the_path_of_its_own_epoch_across_a_resume(cifar10_root, tmp_path, monkeypatch):
    """Epoch 1 ran (as far as its record says) as graphs, then the run was
    killed and resumed where steps run eagerly: row 1 keeps 'graphs', row 2
    says 'eager', and complete.json lists both, in order."""
    argv = base_argv(cifar10_root, tmp_path, 'resumed', epochs=2)
    real_record, real_save = StepRunner.record, records.Checkpointer.__call__

    def save_then_stop(self, *args):
        real_save(self, *args)
        raise StopRun
    monkeypatch.setattr(StepRunner, 'record', lambda self: ('graphs', ''))
    monkeypatch.setattr(records.Checkpointer, '__call__', save_then_stop)
    with pytest.raises(StopRun):
        train_base.main(argv)
    monkeypatch.setattr(StepRunner, 'record', real_record)
    monkeypatch.setattr(records.Checkpointer, '__call__', real_save)
    train_base.main(argv + ['--resume'])
    rows, complete, log = recorded(tmp_path / 'resumed')
    assert [(r['epoch'], r['step_path']) for r in rows] == [('1', 'graphs'), ('2', 'eager')]
    assert complete['step_paths'] == {'main': {'path': 'graphs, eager', 'fallback': None}}
    assert log.index('[main] step path: graphs') < log.index('=== resumed') < log.index('[main] step path: eager')


# ----------------------------------------------------------------------------- the runner's record

class Step:
    """A step that counts its calls; `capturable` as given."""

    def __init__(self, capturable=True):
        self.capturable, self.calls = capturable, 0
        self.why_not_capturable = 'an SVD on the host'

    def __call__(self, batch):
        self.calls += 1


BATCH = (torch.zeros(2, 3), torch.zeros(2))


@pytest.mark.parametrize('mode, capturable, path, why', [
    ('off', True, 'eager', ''),
    ('off', False, 'eager', ''),  # nothing else was asked for
    ('auto', True, 'eager', f'--compile auto: {NO_CUDA}'),
    ('graphs', True, 'eager', f'--compile graphs: {NO_CUDA}'),
    ('graphs', False, 'eager', '--compile graphs: the step needs the host inside it (an SVD on the host)'),
    ('inductor', False, 'eager', '--compile inductor: the step needs the host inside it (an SVD on the host)'),
])
def test_the_runner_records_what_ran_and_why(mode, capturable, path, why):
    step = Step(capturable)
    runner = StepRunner(step, mode, 'cpu', log=pytest.fail)  # a fallback decided up front logs nothing
    runner.begin_epoch()
    runner(BATCH)
    runner(BATCH)
    assert step.calls == 2 and runner.record() == (path, why)
    assert runner.ran == {'eager': 2}


def test_inductor_on_the_cpu_records_inductor():
    step = Step()
    runner = StepRunner(step, 'inductor', 'cpu', backend='eager')
    runner.begin_epoch()
    runner(BATCH)
    assert step.calls == 1 and runner.record() == ('inductor', '')
    runner.begin_epoch()
    assert runner.ran == {}


def test_an_epoch_of_warm_up_steps_only_is_recorded_as_eager():
    """On CUDA the first steps of each batch size run eagerly before the
    capture: an epoch made only of those did not run graphs, and says so."""
    runner = StepRunner(Step(), 'graphs', 'cpu')
    runner.mode, runner.path, runner.fallback = 'graphs', 'graphs', None  # as on CUDA
    runner.ran = {'warm-up': 2}
    path, why = runner.record()
    assert path == 'eager' and 'warm-up' in why
    runner.ran = {'warm-up': 3, 'graphs': 380}
    assert runner.record() == ('graphs', '')


def test_a_failed_capture_is_recorded_for_the_epochs_it_ran_in():
    runner = StepRunner(Step(), 'graphs', 'cpu')
    runner.mode, runner.path, runner.fallback = 'graphs', 'graphs', None  # as on CUDA
    key = (object(), 16)
    runner.capture_failures[key] = '--compile graphs: the step (batch of 16) could not be captured (X)'
    runner.ran = {'graphs': 390, key: 1}  # the last partial batch ran eagerly
    assert runner.record() == ('graphs', runner.capture_failures[key])
    runner.ran = {key: 3}
    assert runner.record() == ('eager', runner.capture_failures[key])


def test_step_paths_of_rows_without_the_columns():
    """A run resumed from a metrics.csv written before the columns existed."""
    rows = [{'phase': 'init', 'epoch': '1'}, {'phase': 'main', 'step_path': 'eager', 'step_fallback': ''}]
    assert utils.step_paths_of(rows) == {'init': {'path': None, 'fallback': None},
                                         'main': {'path': 'eager', 'fallback': None}}



class FakeCuda:
    """The torch.cuda calls of StepRunner's graph path, without a GPU: streams
    that do nothing, a capture that runs the step once (`capturing` is True
    meanwhile) and graphs whose replay only counts itself."""

    def __init__(self, monkeypatch):
        import contextlib
        self.capturing, self.replays = False, 0
        fake = self

        class Stream:
            def wait_stream(self, other):
                pass

        class Graph:
            def replay(self):
                fake.replays += 1

        @contextlib.contextmanager
        def graph(g, pool=None):
            fake.capturing = True
            try:
                yield
            finally:
                fake.capturing = False

        monkeypatch.setattr(torch.cuda, 'Stream', lambda device: Stream())
        monkeypatch.setattr(torch.cuda, 'current_stream', lambda device: Stream())
        monkeypatch.setattr(torch.cuda, 'stream', lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, 'CUDAGraph', Graph)
        monkeypatch.setattr(torch.cuda, 'graph', graph)
        monkeypatch.setattr(torch.cuda, 'graph_pool_handle', lambda: None)
        monkeypatch.setattr(torch.cuda, 'synchronize', lambda device=None: None)


def test_the_graph_path_counts_warm_up_replays_and_failed_captures(monkeypatch):
    """StepRunner's CUDA path with torch.cuda faked: warm-up steps, then a
    capture and replays (recorded as graphs); a batch size whose capture fails
    runs eagerly from then on, logged once and recorded with its reason."""
    from dataset import Batch
    cuda = FakeCuda(monkeypatch)

    def step(batch):
        if cuda.capturing and batch.img.shape[0] == 2:
            raise RuntimeError('operation not permitted when stream is capturing')
    logged = []
    runner = StepRunner(step, 'graphs', 'cpu', warmup=2, log=logged.append)
    runner.use_graphs, runner.mode, runner.path, runner.fallback = True, 'graphs', 'graphs', None  # as on CUDA
    full, last = (Batch(torch.zeros(n, 3), torch.zeros(n), torch.zeros(n)) for n in (4, 2))
    runner.begin_epoch()
    runner(full)
    assert runner.record()[0] == 'eager' and 'warm-up' in runner.record()[1]  # nothing replayed yet
    for _ in range(3):
        runner(full)  # the second warm-up step, the capture (then its replay), one replay
    assert runner.ran == {'warm-up': 2, 'graphs': 2} and cuda.replays == 2
    assert runner.record() == ('graphs', '')
    for _ in range(4):
        runner(last)  # two warm-up steps, a failed capture, then eager for good
    why = ('--compile graphs: the step (batch of 2) could not be captured '
           '(RuntimeError: operation not permitted when stream is capturing)')
    assert logged == [f'{why}; it runs eagerly'] and cuda.replays == 2
    assert runner.record() == ('graphs', why)
    runner.begin_epoch()
    runner(last)
    assert runner.record() == ('eager', why)
    runner(full)
    assert runner.record() == ('graphs', why) and cuda.replays == 3


# ----------------------------------------------------------------------------- the summary shows it

def test_the_summary_shows_the_step_path_beside_each_result(tmp_path, capsys):
    """Three baselines, one per dataset/network cell: eager as asked (no note),
    graphs, and eager where --compile auto asked for graphs (a fallback)."""
    import os
    import summarize
    cells = {'eager': ('resnet20', 'cifar10', 'off', 'eager', ''),
             'graphs': ('resnet20', 'cifar100', 'graphs', 'graphs', ''),
             'fell-back': ('resnet8', 'cifar10', 'auto', 'eager', f'--compile auto: {NO_CUDA}')}
    for note, (net, data, mode, path, why) in cells.items():
        d = tmp_path / note
        d.mkdir()
        (d / 'args.json').write_text(json.dumps({'script': 'train_base.py', 'args': {
            'net_name': net, 'data_name': data, 'compile': mode, 'epochs': 1, 'seed': 2, 'note': note}}))
        (d / 'complete.json').write_text('{}')
        with open(d / 'metrics.csv', 'w', newline='') as f:
            w = csv.writer(f)
            w.writerow(['phase', 'phase_index', 'epoch', 'lr', 'test_top1', 'step_path', 'step_fallback'])
            w.writerow(['main', 0, 1, 0.1, 50.0, path, why])
    summarize.summary([str(tmp_path), '--csv', str(tmp_path / 'summary.csv')])
    out = capsys.readouterr().out
    lines = {net: line for net in ('resnet20', 'resnet8') for line in out.splitlines()
             if line.startswith(f'| - | {net} |')}
    assert '| 50.00 / 50.00 | 50.00 / 50.00 [graphs] |' in lines['resnet20']  # CIFAR10, CIFAR100
    assert lines['resnet8'].endswith('| 50.00 / 50.00 [eager: fallback] |  |')
    with open(os.path.join(tmp_path, 'summary.csv')) as f:
        rows = {(r['student'], r['dataset']): r for r in csv.DictReader(f)}
    assert rows[('resnet20', 'cifar100')]['step_path'] == 'graphs'
    assert rows[('resnet8', 'cifar10')]['step_path'] == 'eager'
    assert rows[('resnet8', 'cifar10')]['step_fallback'] == 'True'
