"""tools/gpu_check.py: its verdict and exit status, the seconds of a real
epoch from per-step times, its deadline, the no-host-sync check failing on a
planted sync, and its summary files; end to end on the CPU (where graphs are
skipped, "needs CUDA", and every comparison is rehearsed eagerly)."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'tools', 'gpu_check.py')
# the smallest settings that still have a last batch (50,000 % 6 = 2) and a test pass
TINY = ['--device', 'cpu', '--nets', 'resnet8', 'resnet8', '--steps', '1', '--batch_size', '6',
        '--eval_batch_size', '10', '--n_test', '10']


def load_gpu_check():
    spec = importlib.util.spec_from_file_location('gpu_check', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load_gpu_check()


def run(out, *flags):
    # one thread: on a shared machine two spinning threads make these tiny steps many times slower
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.run([sys.executable, SCRIPT, '--out', str(out), *flags], capture_output=True,
                       text=True, cwd=ROOT, timeout=900, env=env)
    return p, p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ''


def test_an_epoch_is_every_full_batch_the_last_batch_and_the_test_pass():
    # batch 128: 390 full batches and a last one of 80; 10,000 test images in batches of 1000
    e = gpu_check.epoch_seconds(0.010, 0.007, 0.030, 128, 1000)
    assert (e['full_batches'], e['last_batch'], e['test_batches']) == (390, 80, 10)
    assert e['s_per_epoch'] == pytest.approx(390 * 0.010 + 0.007 + 10 * 0.030)
    # a batch that divides 50,000 has no last batch; a pre-training stage no test pass
    e = gpu_check.epoch_seconds(0.010, 0.007, 0.0, 100, 1000)
    assert (e['full_batches'], e['last_batch']) == (500, 0)
    assert e['s_per_epoch'] == pytest.approx(500 * 0.010)
    with pytest.raises(ValueError):
        gpu_check.epoch_seconds(0.01, 0.01, 0.01, 128, 3000)


def test_the_recorder_sees_a_step_read_its_result_back():
    x = torch.randn(4, 3)

    def clean(batch):
        return (batch * 2).sum(0)

    def careless(batch):
        sums = clean(batch)
        sums[0].item()
        return sums
    assert gpu_check.host_syncs(clean, x) == {}
    assert gpu_check.host_syncs(careless, x) == {'_local_scalar_dense': 1}
    planted = gpu_check.WithHostSync(clean)
    assert gpu_check.host_syncs(planted.current(), x) == {'_local_scalar_dense': 1}
    assert planted.current() is planted.current()  # one callable per variant: one graph each


def test_loss_curves_agree_through_a_spike_but_not_when_a_step_stops_learning():
    g = torch.Generator().manual_seed(0)
    eager = [2.3 * 0.9 ** i + 0.05 * float(torch.rand((), generator=g)) for i in range(40)]
    jittered = [v * (1 + 0.03 * float(torch.randn((), generator=g))) for v in eager]
    jittered[12] = 4.4  # one jumpy step of many at random weights
    assert gpu_check.curves_agree(eager, jittered)[0]
    assert not gpu_check.curves_agree(eager, [2.3] * 40)[0]  # the replayed step does not learn
    assert not gpu_check.curves_agree(eager, [v / 3 for v in eager])[0]  # e.g. one batch over and over
    assert not gpu_check.curves_agree(eager, eager[:-1])[0]  # a step missing


def test_a_failure_outranks_a_skip_and_sets_the_exit_status():
    configs = {'a': {'verdict': 'PASS'}, 'b': {'verdict': 'SKIP', 'why': 'out of time'},
               'c': {'verdict': 'FAIL', 'why': 'main: curves_agree'}}
    verdict, failed, skipped = gpu_check.overall(configs, None)
    assert (verdict, failed, skipped) == ('FAIL', ['c: main: curves_agree'], ['b: out of time'])
    assert gpu_check.EXIT_STATUS[verdict] == 1
    assert gpu_check.verdict_line(verdict, failed, skipped).startswith('gpu_check: FAIL (1 failed: c; 1 skipped: b')
    assert gpu_check.overall({'b': configs['b']}, None)[0] == 'INCOMPLETE'
    accuracy = {'within_0.5': gpu_check.check('fail', 'top-1 90.1 vs 91.0')}
    assert gpu_check.overall({'a': configs['a']}, accuracy)[0] == 'FAIL'
    assert gpu_check.overall({'a': configs['a']}, None) == ('PASS', [], [])


class ClockOfChecks(gpu_check.Clock):
    """A deadline that passes after `n` checks."""

    def __init__(self, n):
        super().__init__(float('inf'))
        self.n = n

    def check(self):
        self.n -= 1
        if self.n < 0:
            raise gpu_check.OutOfTime()


def test_the_deadline_stops_a_configuration_between_two_steps(monkeypatch):
    args = gpu_check.parse_args(TINY + ['--configs', 'kd-st'])
    ctx = gpu_check.make_context(args)
    steps = []

    class CountingRunner(gpu_check.StepRunner):
        def __call__(self, batch):
            steps.append(batch[0].shape[0])
            return super().__call__(batch)
    monkeypatch.setattr(gpu_check, 'StepRunner', CountingRunner)
    result = gpu_check.check_config('kd-st', ctx, ClockOfChecks(2), 60.0)
    assert result['verdict'] == 'SKIP' and result['why'] == 'out of time during the eager trial'
    assert steps == [6, 6]  # two steps, then the deadline; nothing more
    result = gpu_check.check_config('kd-st', ctx, gpu_check.Clock(time.time()), 60.0)
    assert result['verdict'] == 'SKIP' and result['why'] == 'out of time during the eager trial'


def test_a_tiny_deadline_lists_every_part_as_skipped(tmp_path):
    p, last = run(tmp_path, *TINY, '--minutes', '0.0001', '--configs', 'base-r20', 'kd-st',
                  '--img_root', str(tmp_path))
    assert p.returncode == 3, p.stderr[-2000:]
    assert last.startswith('gpu_check: INCOMPLETE (3 skipped: base-r20, kd-st, accuracy)'), last
    summary = json.load(open(tmp_path / 'summary.json'))
    assert summary['verdict'] == 'INCOMPLETE' and not summary['failed']
    assert summary['skipped'] == ['base-r20: out of time (not started)', 'kd-st: out of time (not started)',
                                  'accuracy: out of time (not started)']


def test_the_rehearsal_runs_every_stage_and_fails_on_a_planted_sync(cifar10_root, tmp_path):
    """kd-ab (its init phase, then CE only), DML with a planted .item() in its
    step, and the accuracy part, on the CPU."""
    out = tmp_path / 'out'
    p, last = run(out, *TINY, '--configs', 'kd-ab', 'dml', '--plant_host_sync', 'dml', '--epochs', '1',
                  '--img_root', cifar10_root)
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-2000:]
    assert last.startswith('gpu_check: FAIL (1 failed: dml; ') and 'kd-ab' in last, last

    assert sorted(os.listdir(out)) == ['gpu_check.log', 'summary.json', 'summary.md']
    assert all(os.path.getsize(out / f) < 100_000 for f in os.listdir(out))
    summary = json.load(open(out / 'summary.json'))
    assert summary['verdict'] == 'FAIL' and summary['exit_status'] == 1 and summary['line'] == last

    dml = summary['configs']['dml']
    assert dml['verdict'] == 'FAIL'
    sync = dml['stages']['main']['checks']['no_host_sync']
    assert sync['status'] == 'fail' and '_local_scalar_dense' in sync['detail']

    ab = summary['configs']['kd-ab']
    assert ab['verdict'] == 'SKIP' and ab['why'] == 'needs CUDA' and ab['main_stage'] == 'ce-only'
    assert list(ab['stages']) == ['init', 'ce-only']
    for stage in ab['stages'].values():
        checks = stage['checks']
        # both trials eager on the CPU: the same curve, exactly
        assert checks['curves_agree'] == {'status': 'pass', 'detail': 'worst 10-step median differs by 0.0%'}
        assert checks['lr_write']['status'] == checks['no_host_sync']['status'] == 'pass'
        assert checks['captured'] == checks['not_slower'] == {'status': 'skip', 'detail': 'needs CUDA'}
        assert stage['eager']['timed_steps'] == 1 and stage['eager']['last_batch_repeats'] == 1
    assert ab['test']['checks']['test_agrees']['status'] == 'pass'

    # s/epoch: 8333 full batches of 6, the last batch of 2, 1000 test batches of 10 (main schedule only)
    assert (summary['epoch']['full_batches'], summary['epoch']['last_batch']) == (8333, 2)
    for config in (ab, dml):
        for label, stage in config['stages'].items():
            for path in ('eager', 'graphs'):
                t = stage[path]
                test_ms = config['test'][f'{path}_test_batch_ms'] if label != 'init' else 0.0
                expected = (8333 * t['step_ms'] + t['last_batch_ms'] + 1000 * test_ms) / 1000
                assert t['epoch']['s_per_epoch'] == pytest.approx(expected), (config['config'], label, path)

    accuracy = summary['accuracy']
    assert accuracy['fast+graphs']['exit'] == accuracy['fp32 eager']['exit'] == 0
    assert accuracy['fast+graphs']['epochs_done'] == accuracy['fp32 eager']['epochs_done'] == 1
    assert accuracy['within_0.5']['status'] == 'skip' and 'needs CUDA' in accuracy['within_0.5']['detail']

    md = (out / 'summary.md').read_text().splitlines()
    assert '| config | eager s/epoch | graphs s/epoch | speed-up | peak MiB (eager / graphs) | verdict |' in md
    rows = [line.split(' | ')[0] for line in md if line.startswith('| ') and 's/epoch' not in line]
    assert rows == ['| kd-ab (init)', '| kd-ab', '| dml']
    assert any(line.startswith('| dml |') and 'FAIL: no_host_sync' in line for line in md)
    assert md[-1] == last
    assert (out / 'gpu_check.log').read_text().splitlines()[-1] == last


@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_without_a_gpu_the_check_says_so(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, '--out', str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 2 and 'needs a CUDA GPU' in p.stderr and len(p.stderr.strip().splitlines()) == 1
