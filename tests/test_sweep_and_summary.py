"""The sweep script (dry run, subsets, a real tiny sweep) and the summary command:
what a run's status is (complete.json, a failed run's log, a run killed in a
pre-training phase), malformed run directories, and the CIFAR-100 benchmark's
layout. (The sweep's checks, its bookkeeping and its benchmark table have
their own files: tests/test_sweep_*.py.)"""
import csv
import json
import os
import shlex
import subprocess
import sys

import pytest

import published
import train_kd
import summarize
from kd_losses import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'example_train_script.sh')


def sweep(env, check=True):
    """Run the sweep script with `env` over the environment; asserts it succeeded unless check=False."""
    # one process per KD run (tests/test_sweep_shared.py covers SHARE_TEACHER=1)
    p = subprocess.run(['bash', SCRIPT], env={**os.environ, 'SHARE_TEACHER': '0', **env},
                       capture_output=True, text=True, timeout=900)
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
    assert scripts.count('train_kd.py') == len(METHODS) * 3 * 2  # every registered mode, 3 pairs, 2 datasets
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
    # another length than the schedule's 200 epochs: its runs are named apart
    assert [flag(c, '--note') for c in cmds] == ['base-c10-r110-s2-e7', 'base-c10-r20-s2-e7',
                                                 'st-c10-r110-r20-s2-e7', 'at-c10-r110-r20-s2-e7']
    assert len(dry_run(RESULTS=str(tmp_path), SEEDS='1 2 3', MODES='', DML_PAIRS='',
                       DATASETS='cifar100', PAIRS='resnet20:resnet20')) == 3


def test_a_real_tiny_sweep_resumes_skips_and_summarises(cifar10_root, tmp_path):
    env = {'RESULTS': str(tmp_path / 'res'), 'DATA_ROOT': cifar10_root, 'DATASETS': 'cifar10',
           'PAIRS': 'resnet20:resnet20', 'MODES': 'st', 'EPOCHS': '1', 'PYTHON': sys.executable,
           'EXTRA_ARGS': '--device cpu --no_download --batch_size 50', 'JOBS_PER_GPU': '2'}
    out = sweep(env).stdout
    assert out.count('[cpu] ') == 3 and '[gpu' not in out  # baseline, st, dml: all on the CPU
    runs = ('base/base-c10-r20-s2-e1', 'st/st-c10-r20-r20-s2-e1', 'dml/dml-c10-r20-r20-s2-e1')
    for run in runs:
        assert os.path.isfile(tmp_path / 'res' / run / 'model_best.pth.tar' if 'dml' not in run
                              else tmp_path / 'res' / run / 'model_best_net1.pth.tar'), run
        assert os.path.isfile(tmp_path / 'res' / run / 'complete.json'), run
    # Finished means complete.json, not a full metrics.csv: a run whose last
    # epoch is logged but not marked complete (killed while saving) is resumed.
    base_dir = tmp_path / 'res' / 'base' / 'base-c10-r20-s2-e1'
    marker = (base_dir / 'complete.json').read_text()
    (base_dir / 'complete.json').unlink()
    again = dry_run(**env)
    assert [c[2] for c in again] == ['train_base.py'] and '--resume' in again[0]
    (base_dir / 'complete.json').write_text(marker)
    # Another EPOCHS: new runs beside the finished ones (no --resume that would
    # fail on "--epochs 2 (was 1)", no log overwritten).
    longer = dry_run(**{**env, 'EPOCHS': '2'})
    assert len(longer) == 3 and all('--resume' not in c and '--overwrite' not in c for c in longer)
    assert [flag(c, '--note') for c in longer] == [r.split('/')[1][:-3] + '-e2' for r in runs]
    # A second sweep skips what is done and restarts a run killed before its first checkpoint.
    st_dir = tmp_path / 'res' / 'st' / 'st-c10-r20-r20-s2-e1'
    header = (st_dir / 'metrics.csv').read_text().splitlines()[0]
    for name in ('checkpoint.pth.tar', 'model_best.pth.tar', 'complete.json'):
        (st_dir / name).unlink()
    (st_dir / 'metrics.csv').write_text(header + '\n')
    out = sweep(env).stdout
    assert out.count('done, skipped') == 2 and out.count('[cpu] ') == 1 and '--overwrite' in out
    assert len((st_dir / 'metrics.csv').read_text().splitlines()) == 2
    history = (tmp_path / 'res' / 'logs' / 'failed.txt').read_text().splitlines()
    assert len(history) == 2 and all(line.startswith('=== sweep started ') and line.endswith('no run failed')
                                     for line in history)
    # the summary of this root
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'summarize.py'), env['RESULTS']],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert '| Teacher | Student | Name | Epochs | CIFAR10 |' in p.stdout
    assert '| resnet20 | resnet20 | ST |' in p.stdout and '| - | resnet20 | Baseline |' in p.stdout
    assert '| resnet20 | resnet20 | DML | net2 (resnet20) |' in p.stdout
    assert os.path.isfile(os.path.join(env['RESULTS'], 'summary.csv'))


def fake_run(root, kind, note, args, top1s, script=None, dml=False, complete=None, log=None):
    """A run directory as the scripts write it; complete.json once every epoch
    is done (or as `complete` says), log.txt with the lines `log` if given."""
    d = os.path.join(root, kind, note)
    os.makedirs(d)
    if complete if complete is not None else len(top1s) == args['epochs']:
        with open(os.path.join(d, 'complete.json'), 'w') as f:
            json.dump({'epochs': args['epochs']}, f)
    if log is not None:
        with open(os.path.join(d, 'log.txt'), 'w') as f:
            f.write('\n'.join(log) + '\n')
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
    assert '| - | resnet20 | Baseline | 3 | 59.00 ± 1.41 / 56.00 ± 1.41 (n=2) | 41.00 / 41.00 |' in lines
    assert '| - | resnet110 | Baseline | 3 | 80.00 / 75.00 |  |' in lines
    assert '| resnet110 | resnet20 | ST | 3 | 70.00 / 69.00 |  |' in lines
    assert '| resnet110 | resnet20 | AT | 3 | 20.00 / 20.00 * |  |' in lines  # unfinished
    st_row, at_row = lines.index('| resnet110 | resnet20 | ST | 3 | 70.00 / 69.00 |  |'), \
        lines.index('| resnet110 | resnet20 | AT | 3 | 20.00 / 20.00 * |  |')
    assert st_row < at_row  # the seed's order: ST before AT
    assert '| resnet110 | resnet20 | DML | net1 (resnet110) | 3 | 5.00 / 5.00 |  |' in lines
    assert '| resnet110 | resnet20 | DML | net2 (resnet20) | 3 | 4.00 / 3.00 |  |' in lines
    assert '| - | resnet110 | Baseline | resnet110 | 3 | 80.00 / 75.00 |  |' in lines  # DML's own table
    rows = list(csv.DictReader(open(tmp_path / 'summary.csv')))
    base = [r for r in rows if r['name'] == 'Baseline' and r['student'] == 'resnet20' and r['dataset'] == 'cifar10']
    assert len(base) == 1 and base[0]['n'] == '2' and float(base[0]['best_mean']) == 59.0


def test_summary_of_an_empty_root_is_a_message(tmp_path):
    with pytest.raises(summarize.UserError, match='no runs'):
        summarize.summary([str(tmp_path)])


# ----------------------------------------------------------------------------- a run's status

KD = {'data_name': 'cifar10', 'epochs': 3, 'lr': 0.1, 't_name': 'resnet110', 's_name': 'resnet20',
      'kd_mode': 'st', 'lambda_kd': 0.1, 'seed': 1}


def summary_of(root, capsys, *extra):
    summarize.summary([root, *extra])
    captured = capsys.readouterr()
    with open(os.path.join(root, 'summary.csv')) as f:
        return captured.out.splitlines(), list(csv.DictReader(f)), captured.err


def test_finished_means_complete_json_not_the_last_metrics_row(tmp_path, capsys):
    root = str(tmp_path)
    # every epoch logged, but killed before complete.json (while saving the last checkpoint)
    fake_run(root, 'st', 'st-s1', KD, [61, 70, 69], complete=False)
    lines, rows, _ = summary_of(root, capsys)
    assert '| resnet110 | resnet20 | ST | 3 | 70.00 / 69.00 * |' in lines
    assert rows[0]['complete'] == 'False' and rows[0]['status'] == 'unfinished'
    assert summarize.read_run(os.path.join(root, 'st', 'st-s1'))['complete'] is False


def test_a_run_killed_before_its_main_schedule_is_listed_as_unfinished(tmp_path, capsys):
    root = str(tmp_path)
    fake_run(root, 'st', 'st-s1', KD, [61, 70, 69])
    d = fake_run(root, 'ab', 'ab-s1', {**KD, 'kd_mode': 'ab'}, [])  # killed in its init phase
    with open(os.path.join(d, 'metrics.csv'), 'a', newline='') as f:
        csv.writer(f).writerow(['init', 0, 1, ''])
    d = os.path.join(root, 'at', 'at-s1')  # killed before its first epoch: args.json only
    os.makedirs(d)
    with open(os.path.join(d, 'args.json'), 'w') as f:
        json.dump({'script': 'train_kd.py', 'args': {**KD, 'kd_mode': 'at'}}, f)
    lines, rows, _ = summary_of(root, capsys)
    assert '| resnet110 | resnet20 | AB | 3 | - * |' in lines
    assert '| resnet110 | resnet20 | AT | 3 | - * |' in lines
    status = {r['name']: (r['status'], r['n'], r['best_mean']) for r in rows}
    assert status['AB'] == status['AT'] == ('unfinished', '0', '')


def test_a_failed_run_is_listed_as_failed(tmp_path, capsys):
    root = str(tmp_path)
    fake_run(root, 'st', 'st-s1', KD, [61, 70], log=['command: ...', 'error: loss is NaN at epoch 2'])
    fake_run(root, 'at', 'at-s1', {**KD, 'kd_mode': 'at'}, [50], log=['command: ...', 'epoch 1 ...'])
    fake_run(root, 'crd', 'crd-s1', {**KD, 'kd_mode': 'crd'}, [],
             log=['error: --nce_n 16384 exceeds the 90 negatives available'])
    lines, rows, _ = summary_of(root, capsys)
    assert '| resnet110 | resnet20 | ST | 3 | failed |' in lines
    assert '| resnet110 | resnet20 | AT | 3 | 50.00 / 50.00 * |' in lines  # no error line: unfinished
    assert '| resnet110 | resnet20 | CRD | 3 | failed |' in lines
    status = {r['name']: r['status'] for r in rows}
    assert status == {'ST': 'failed', 'AT': 'unfinished', 'CRD': 'failed'}
    run = summarize.read_run(os.path.join(root, 'st', 'st-s1'))
    assert run['status'] == 'failed' and run['error'] == 'error: loss is NaN at epoch 2'


def test_a_malformed_run_directory_is_skipped_with_a_warning(tmp_path, capsys):
    root = str(tmp_path)
    fake_run(root, 'st', 'st-s1', KD, [61, 70, 69])
    garbage = fake_run(root, 'at', 'at-s1', {**KD, 'kd_mode': 'at'}, [1, 2, 3])
    with open(os.path.join(garbage, 'args.json'), 'w') as f:
        f.write('{"script": "train_kd.py", "args": {')
    no_column = fake_run(root, 'sp', 'sp-s1', {**KD, 'kd_mode': 'sp'}, [1, 2, 3])
    with open(os.path.join(no_column, 'metrics.csv'), 'w') as f:
        f.write('phase,phase_index,epoch,test_loss\nmain,0,1,2.0\n')
    no_phase = fake_run(root, 'pkt', 'pkt-s1', {**KD, 'kd_mode': 'pkt'}, [1, 2, 3])
    with open(os.path.join(no_phase, 'metrics.csv'), 'w') as f:
        f.write('epoch,test_top1\n1,50\n')
    not_a_number = fake_run(root, 'nst', 'nst-s1', {**KD, 'kd_mode': 'nst'}, [1, 2, 3])
    with open(os.path.join(not_a_number, 'metrics.csv'), 'w') as f:
        f.write('phase,phase_index,epoch,test_top1\nmain,0,1,abc\n')
    not_an_object = fake_run(root, 'cc', 'cc-s1', {**KD, 'kd_mode': 'cc'}, [1, 2, 3])
    with open(os.path.join(not_an_object, 'args.json'), 'w') as f:
        json.dump([1, 2], f)
    lines, rows, err = summary_of(root, capsys)
    assert '| resnet110 | resnet20 | ST | 3 | 70.00 / 69.00 |' in lines  # the summary goes on
    assert [r['name'] for r in rows] == ['ST']
    warnings = err.splitlines()
    assert len(warnings) == 5 and all(w.startswith('warning: skipped ') for w in warnings)
    for d in (garbage, no_column, no_phase, not_a_number, not_an_object):
        assert sum(d + ':' in w for w in warnings) == 1, d


# ----------------------------------------------------------------------------- the benchmark's layout

CRD_COMMON = {'data_name': 'cifar100', 'protocol': 'crd', 'epochs': 2, 'lr': 0.05, 'batch_size': 64}


def crd_runs(root):
    """Two seeds of the baselines, KD and CRD for two benchmark pairs, one unfinished AT run."""
    for seed, bump in ((1, 0.0), (2, 2.0)):
        for net, top1 in (('resnet56', 72.0), ('resnet20', 69.0), ('wrn_40_2', 75.0), ('ShuffleV1', 70.0)):
            fake_run(root, 'base', f'base-{net}-s{seed}', {**CRD_COMMON, 'net_name': net, 'seed': seed},
                     [top1 - 10, top1 + bump])
        for mode, gain in (('st', 1.0), ('crd', 2.0)):
            for t, s, top1 in (('resnet56', 'resnet20', 69.0), ('wrn_40_2', 'ShuffleV1', 70.0)):
                fake_run(root, mode, f'{mode}-{t}-{s}-s{seed}',
                         {**CRD_COMMON, 't_name': t, 's_name': s, 'kd_mode': mode, 'seed': seed},
                         [top1 + gain + bump, top1 + gain + bump - 1])
    fake_run(root, 'at', 'at-resnet56-resnet20-s1',
             {**CRD_COMMON, 't_name': 'resnet56', 's_name': 'resnet20', 'kd_mode': 'at', 'seed': 1}, [60])
    # a seed-protocol CIFAR-100 run stays in the seed's layout
    fake_run(root, 'base', 'base-seed-r20', {'data_name': 'cifar100', 'epochs': 1, 'net_name': 'resnet20',
                                             'seed': 1}, [40])


def test_the_benchmark_runs_get_its_layout(tmp_path, capsys):
    root = str(tmp_path)
    crd_runs(root)
    # a benchmark-protocol baseline of a network in no pair with runs: listed below the table
    fake_run(root, 'base', 'base-resnet44-s1', {**CRD_COMMON, 'net_name': 'resnet44', 'seed': 1}, [50])
    lines, rows, _ = summary_of(root, capsys)
    start = lines.index('| Method | Epochs | resnet56→resnet20 | wrn_40_2→ShuffleV1 |')
    assert lines.index('| resnet44 | 2 | 50.00 / 50.00 * |') > start
    table = lines[start + 2:start + 7]
    # best over the two seeds: (72, 74) -> 73 ± 1.41, last the same epoch here
    assert table == [
        '| Teacher | 2 | 73.00 ± 1.41 / 73.00 ± 1.41 (n=2) | 76.00 ± 1.41 / 76.00 ± 1.41 (n=2) |',
        '| Student | 2 | 70.00 ± 1.41 / 70.00 ± 1.41 (n=2) | 71.00 ± 1.41 / 71.00 ± 1.41 (n=2) |',
        '| KD | 2 | 71.00 ± 1.41 / 70.00 ± 1.41 (n=2) | 72.00 ± 1.41 / 71.00 ± 1.41 (n=2) |',
        '| AT | 2 | 60.00 / 60.00 * |  |',   # the benchmark's order: KD, then FitNet, AT, ..., CRD
        '| CRD | 2 | 72.00 ± 1.41 / 71.00 ± 1.41 (n=2) | 73.00 ± 1.41 / 72.00 ± 1.41 (n=2) |']
    assert 'CIFAR-100 benchmark' in '\n'.join(lines[:start])
    assert '| - | resnet20 | Baseline | 1 | 40.00 / 40.00 |' in lines  # the seed-protocol run
    assert not any('resnet56' in line for line in lines[:start])  # benchmark runs: its table only
    crd_rows = [r for r in rows if r['table'] == 'crd']
    assert {(r['kind'], r['teacher'], r['student']) for r in crd_rows} >= {
        ('Baseline', '-', 'resnet56'), ('KD', 'resnet56', 'resnet20'), ('CRD', 'wrn_40_2', 'ShuffleV1')}
    kd = next(r for r in crd_rows if r['name'] == 'KD' and r['teacher'] == 'resnet56')
    assert kd['n'] == '2' and float(kd['best_mean']) == 71.0 and float(kd['published']) == 70.66
    assert [r['table'] for r in rows if r['student'] == 'resnet20' and r['kind'] == 'Baseline'] \
        .count('seed') == 1


def test_published_numbers_come_first(tmp_path, capsys):
    root = str(tmp_path)
    crd_runs(root)
    lines, _, _ = summary_of(root, capsys, '--published')
    start = lines.index('| Method | Epochs | resnet56→resnet20 | wrn_40_2→ShuffleV1 |')
    ours = lines.index('| Teacher | 2 | 73.00 ± 1.41 / 73.00 ± 1.41 (n=2) | 76.00 ± 1.41 / 76.00 ± 1.41 (n=2) |')
    assert lines[start + 2:start + 5] == [
        '| Teacher (published) | 240 | 72.34 | 75.61 |', '| Student (published) | 240 | 69.06 | 70.50 |',
        '| KD (published) | 240 | 70.66 | 74.83 |']
    published = lines[start + 2:ours]
    assert all(line.split(' | ')[0].endswith('(published)') for line in published)
    # every row any source gives for these pairs: RepDistiller's, then the newer methods' own
    assert '| CRD (published) | 240 | 71.16 | 76.05 |' in published
    assert '| FSP (published) | 240 | 69.95 |  |' in published         # no FSP for a cross-architecture pair
    assert '| DKD (published) | 240 | 71.97 | 76.70 |' in published     # mdistiller's README
    # DIST's own README (epochs not stated) where it gives the pair, else WTTM's README (240)
    assert '| DIST (published) | ? (resnet56→resnet20), 240 (wrn_40_2→ShuffleV1) | 71.75 ± 0.30 | 76.40 |' \
        in published
    assert 'Tian et al., ICLR 2020, RepDistiller README' in lines[start - 2]


def test_the_published_table_is_the_benchmark_readme():
    # 13 pairs, the README's numbers (a few spot checks against the transcription)
    assert len(summarize.CRD_PAIRS) == 13
    assert published.top1('crd', 'resnet32x4', 'resnet8x4') == 75.51
    assert published.top1('st', 'ResNet50', 'MobileNetV2') == 67.35
    assert published.top1('', '-', 'MobileNetV2') == 64.60   # as a student
    assert published.top1('', '-', 'ResNet50') == 79.34      # as a teacher
    assert published.top1('at', 'resnet56', 'resnet20') == 70.55
    assert published.top1('fsp', 'wrn_40_2', 'wrn_40_1') is None   # N/A in the README
