"""The sweep script (dry run, subsets, a real tiny sweep) and the summary command."""
import csv
import json
import os
import shlex
import subprocess
import sys

import pytest

import train_kd
import summarize
from kd_losses import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'example_train_script.sh')


def sweep(env, check=True):
    p = subprocess.run(['bash', SCRIPT], env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=900)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def dry_run(**env):
    out = sweep({'DRY_RUN': '1', **env}).stdout
    return [shlex.split(l) for l in out.splitlines() if l and not l.startswith('#')]


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_bash_syntax():
    assert subprocess.run(['bash', '-n', SCRIPT]).returncode == 0


def test_dry_run_lists_the_seed_table_once_with_the_right_flags(tmp_path):
    cmds = dry_run(RESULTS=str(tmp_path))
    scripts = [c[2] for c in cmds]
    assert scripts.count('train_base.py') == 4
    assert scripts.count('train_kd.py') == len(METHODS) * 3 * 2 == 120
    assert scripts.count('train_dml.py') == 6
    notes = [flag(c, '--note') for c in cmds]
    assert len(set(notes)) == len(notes)  # every run exactly once
    kd = [c for c in cmds if c[2] == 'train_kd.py']
    assert {flag(c, '--kd_mode') for c in kd} == set(METHODS)
    assert {(flag(c, '--t_name'), flag(c, '--s_name')) for c in kd} == {
        ('resnet20', 'resnet20'), ('resnet110', 'resnet20'), ('resnet110', 'resnet110')}
    for c in kd:
        data, t, s = flag(c, '--data_name'), flag(c, '--t_name'), flag(c, '--s_name')
        d = {'cifar10': 'c10', 'cifar100': 'c100'}[data]
        # students start from their baseline's initial weights; teachers are trained baselines
        assert flag(c, '--s_init').endswith(f'base/base-{d}-r{s[6:]}-s2/initial_r{s[6:]}.pth.tar')
        assert flag(c, '--t_model').endswith(f'base/base-{d}-r{t[6:]}-s2/model_best.pth.tar')
        assert flag(c, '--epochs') == '200'
        # the seed's hyperparameters, as train_kd.py resolves them (CRD: 0.2 / 0.8)
        args, _, _ = train_kd.parse_args(c[3:] + ['--device', 'cpu'])
        expected = METHODS[args.kd_mode].defaults_for(data)
        assert {k: getattr(args, k) for k in expected} == expected
        if args.kd_mode == 'crd':
            assert args.lambda_kd == (0.2 if data == 'cifar10' else 0.8)
    dml = [c for c in cmds if c[2] == 'train_dml.py']
    assert {(flag(c, '--net1_name'), flag(c, '--net2_name')) for c in dml} == {
        ('resnet20', 'resnet20'), ('resnet110', 'resnet20'), ('resnet110', 'resnet110')}
    same = [c for c in dml if flag(c, '--net1_name') == flag(c, '--net2_name')]
    assert all(flag(c, '--net2_init') == 'random' for c in same)


def test_subsets(tmp_path):
    cmds = dry_run(RESULTS=str(tmp_path), MODES='st at', DATASETS='cifar10', DML_PAIRS='',
                   PAIRS='resnet110:resnet20', EPOCHS='7')
    assert [c[2] for c in cmds] == ['train_base.py'] * 2 + ['train_kd.py'] * 2
    assert {flag(c, '--data_name') for c in cmds} == {'cifar10'}
    assert [flag(c, '--kd_mode') for c in cmds[2:]] == ['st', 'at']
    assert {flag(c, '--epochs') for c in cmds} == {'7'}
    assert len(dry_run(RESULTS=str(tmp_path), SEEDS='1 2 3', MODES='', DML_PAIRS='',
                       DATASETS='cifar100', PAIRS='resnet20:resnet20')) == 3


def test_a_real_tiny_sweep_resumes_skips_and_summarises(cifar10_root, tmp_path):
    env = {'RESULTS': str(tmp_path / 'res'), 'DATA_ROOT': cifar10_root, 'DATASETS': 'cifar10',
           'PAIRS': 'resnet20:resnet20', 'MODES': 'st', 'EPOCHS': '1', 'PYTHON': sys.executable,
           'EXTRA_ARGS': '--device cpu --no_download --batch_size 50', 'JOBS_PER_GPU': '2'}
    out = sweep(env).stdout
    assert out.count('[gpu 0]') == 3  # baseline, st, dml
    for run in ('base/base-c10-r20-s2', 'st/st-c10-r20-r20-s2', 'dml/dml-c10-r20-r20-s2'):
        assert os.path.isfile(tmp_path / 'res' / run / 'model_best.pth.tar' if 'dml' not in run
                              else tmp_path / 'res' / run / 'model_best_net1.pth.tar'), run
    # A second sweep skips what is done, resumes a run with a checkpoint that
    # did not reach its last epoch, and restarts one killed before its first.
    base_metrics = tmp_path / 'res' / 'base' / 'base-c10-r20-s2' / 'metrics.csv'
    kept = base_metrics.read_text()
    base_metrics.write_text(kept.splitlines()[0] + '\n')
    again = dry_run(**env)
    assert [c[2] for c in again] == ['train_base.py'] and '--resume' in again[0]
    base_metrics.write_text(kept)
    st_dir = tmp_path / 'res' / 'st' / 'st-c10-r20-r20-s2'
    for name in ('checkpoint.pth.tar', 'model_best.pth.tar'):
        (st_dir / name).unlink()
    (st_dir / 'metrics.csv').write_text(kept.splitlines()[0] + '\n')
    out = sweep(env).stdout
    assert out.count('done, skipped') == 2 and out.count('[gpu 0]') == 1 and '--overwrite' in out
    assert len((st_dir / 'metrics.csv').read_text().splitlines()) == 2
    # the summary of this root
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'summarize.py'), env['RESULTS']],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert '| Teacher | Student | Name | CIFAR10 |' in p.stdout
    assert '| resnet20 | resnet20 | ST |' in p.stdout and '| - | resnet20 | Baseline |' in p.stdout
    assert '| resnet20 | resnet20 | DML | net2 (resnet20) |' in p.stdout
    assert os.path.isfile(os.path.join(env['RESULTS'], 'summary.csv'))


def fake_run(root, kind, note, args, top1s, script=None, dml=False):
    d = os.path.join(root, kind, note)
    os.makedirs(d)
    script = script or {'base': 'train_base.py', 'dml': 'train_dml.py'}.get(kind, 'train_kd.py')
    with open(os.path.join(d, 'args.json'), 'w') as f:
        json.dump({'script': script, 'args': args}, f)
    with open(os.path.join(d, 'metrics.csv'), 'w', newline='') as f:
        cols = ['test_net1_top1', 'test_net2_top1'] if dml else ['test_top1']
        w = csv.writer(f)
        w.writerow(['phase', 'phase_index', 'epoch'] + cols)
        for e, v in enumerate(top1s, start=1):
            w.writerow(['main', 0, e] + (list(v) if dml else [v]))
    return d


def test_summary_tables_follow_the_reporting_rule(tmp_path, capsys):
    root = str(tmp_path)
    common = {'data_name': 'cifar10', 'epochs': 3, 'lr': 0.1}
    fake_run(root, 'base', 'base-c10-r20-s1', {**common, 'net_name': 'resnet20', 'seed': 1}, [50, 60, 55])
    fake_run(root, 'base', 'base-c10-r20-s2', {**common, 'net_name': 'resnet20', 'seed': 2}, [52, 58, 57])
    fake_run(root, 'base', 'base-c100-r20-s1', {**common, 'data_name': 'cifar100', 'net_name': 'resnet20',
                                                'seed': 1}, [30, 40, 41])
    kd = {**common, 't_name': 'resnet110', 's_name': 'resnet20', 'lambda_kd': 0.1}
    fake_run(root, 'st', 'st-s1', {**kd, 'kd_mode': 'st', 'seed': 1}, [61, 70, 69])
    fake_run(root, 'at', 'at-s1', {**kd, 'kd_mode': 'at', 'seed': 1}, [10, 20])  # 2 of 3 epochs
    fake_run(root, 'base', 'base-c10-r110-s1', {**common, 'net_name': 'resnet110', 'seed': 1}, [70, 80, 75])
    fake_run(root, 'dml', 'dml-s1', {**common, 'net1_name': 'resnet110', 'net2_name': 'resnet20', 'seed': 1},
             [(1, 2), (3, 4), (5, 3)], dml=True)
    summarize.summary([root])
    out = capsys.readouterr().out
    assert 'best epoch and the last epoch' in out and 'mean ± sample standard deviation' in out
    lines = out.splitlines()
    # two seeds: mean ± std of best (60, 58) and last (55, 57), n=2
    assert '| - | resnet20 | Baseline | 59.00 ± 1.41 / 56.00 ± 1.41 (n=2) | 41.00 / 41.00 |' in lines
    assert '| - | resnet110 | Baseline | 80.00 / 75.00 |  |' in lines
    assert '| resnet110 | resnet20 | ST | 70.00 / 69.00 |  |' in lines
    assert '| resnet110 | resnet20 | AT | 20.00 / 20.00 * |  |' in lines  # unfinished
    st_row, at_row = lines.index('| resnet110 | resnet20 | ST | 70.00 / 69.00 |  |'), \
        lines.index('| resnet110 | resnet20 | AT | 20.00 / 20.00 * |  |')
    assert st_row < at_row  # the seed's order: ST before AT
    assert '| resnet110 | resnet20 | DML | net1 (resnet110) | 5.00 / 5.00 |  |' in lines
    assert '| resnet110 | resnet20 | DML | net2 (resnet20) | 4.00 / 3.00 |  |' in lines
    assert '| - | resnet110 | Baseline | resnet110 | 80.00 / 75.00 |  |' in lines  # DML's own table
    rows = list(csv.DictReader(open(tmp_path / 'summary.csv')))
    base = [r for r in rows if r['name'] == 'Baseline' and r['student'] == 'resnet20' and r['dataset'] == 'cifar10']
    assert len(base) == 1 and base[0]['n'] == '2' and float(base[0]['best_mean']) == 59.0


def test_summary_of_an_empty_root_is_a_message(tmp_path):
    with pytest.raises(summarize.UserError, match='no runs'):
        summarize.summary([str(tmp_path)])
