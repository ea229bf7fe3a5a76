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
