"""bench.py runs the scripts' real steps and reports what it measured."""
import json
import os
import subprocess
import sys

import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ['--device', 'cpu', '--batch_size', '16', '--warmup', '1', '--steps', '2',
         '--n_train', '64', '--n_test', '32']


def test_configurations_cover_every_method():
    names = bench.config_names()
    assert {'base-r20', 'base-r110', 'dml'} <= set(names)
    assert {f'kd-{m}' for m in bench.METHODS} <= set(names)


def test_paths_write_json_and_a_table(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    bench.main(['--configs', 'base-r20', 'kd-sp', '--paths', 'eager', 'fp32', '--json', str(out)]
               + SMALL)
    record = json.load(open(out))
    results = record['results']
    assert [(r['config'], r['path']) for r in results] == [
        ('base-r20', 'eager'), ('base-r20', 'fp32'), ('kd-sp', 'eager'), ('kd-sp', 'fp32')]
    for r in results:
        assert r['img_per_s'] > 0 and r['timed_steps'] == 2 and r['device'].startswith('cpu')
        assert abs(r['s_per_epoch'] - (64 / r['img_per_s'] + r['eval_s'])) < 1e-6
        assert r['finite']
    assert record['command'].startswith('python bench.py --configs base-r20 kd-sp')
    table = capsys.readouterr().out
    assert '| base-r20 |' in table and 'eager vs fp32' in table


def test_the_kd_step_is_the_training_scripts_step():
    args = bench.script_args('kd-at', 'cpu', 'fp32', 16)
    assert args.lambda_kd == 1000.0 and args.p == 2.0 and args.amp is False
    import torch
    step, stats, model = bench.build('kd-at', args, torch.randint(0, 10, (64,)))
    assert isinstance(step, bench.train_kd.KDStep) and step.kd_scale.item() == 1000.0 and step.kd_on
    assert stats is step.stats


def test_concurrent_runs_are_summed(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'bench.py'), '--configs', 'base-r20',
                        '--concurrent', '2', '--paths', 'fp32', '--start_delay', '15'] + SMALL,
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    row = [l for l in p.stdout.splitlines() if l.startswith('| base-r20 | fp32 | 2 |')]
    assert len(row) == 1
    total, per_run = row[0].split('|')[4:6]
    assert abs(float(total) - sum(float(x) for x in per_run.split(','))) <= 2  # rounding


def fake_measure(calls):
    def measure(name, device, path, batch_size, warmup, steps, start_at=None, n_train=50000,
                n_test=10000):
        calls.append((name, path, batch_size, warmup, steps))
        return {'config': name, 'path': path, 'img_per_s': 100.0, 's_per_epoch': 5.0,
                'gpu_ms_per_step': None, 'wall_ms_per_step': 10.0, 'peak_mem_mb': None}
    return measure


def test_on_the_cpu_it_says_what_it_times_then_shows_each_run(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench, 'measure', fake_measure(calls))
    bench.main(['--device', 'cpu'])
    # the CPU's defaults: a baseline and a KD step, a few steps each (about a minute)
    assert calls == [('base-r20', 'fp32', 128, 2, 5), ('kd-st', 'fp32', 128, 2, 5)]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('bench.py on cpu')
    for text in ('timing 2 run(s), base-r20 kd-st on the fp32 path(s)',
                 '2 untimed and 5 timed training steps of batch 128',
                 'a test pass over 1000 images (scaled to --n_test 10000)'):
        assert text in lines[0]
    assert lines[1:5] == ['[1/2] base-r20 fp32 ...', 'base-r20 fp32: 100 img/s, 5.00 s/epoch',
                          '[2/2] kd-st fp32 ...', 'kd-st fp32: 100 img/s, 5.00 s/epoch']


def test_the_cpu_times_a_share_of_the_test_images(monkeypatch):
    monkeypatch.setattr(bench, 'CPU_TEST_IMAGES', 16)
    r = bench.measure('base-r20', 'cpu', 'fp32', 16, 1, 1, n_train=64, n_test=48)
    assert r['eval_timed_images'] == 16 and r['n_test'] == 48
