"""Machine-readable records, progress output, the evaluation entry point and
curves."""
import csv
import json
import os
import subprocess
import sys

import pytest

import train_base
import summarize
import train_kd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KD_COLUMNS = ['phase', 'phase_index', 'epoch', 'lr', 'kd_weight', 'train_ce', 'train_kd', 'train_top1',
              'train_top5', 'train_loss', 'test_loss', 'test_top1', 'test_top5', 'seconds', 'img_per_s',
              'step_path', 'step_fallback']


def kd(base_run, save_root, note, mode, *extra):
    return ['--data_name', 'cifar10', '--img_root', base_run['img_root'], '--save_root', str(save_root),
            '--note', note, '--s_name', 'resnet20', '--t_name', 'resnet20', '--s_init', base_run['initial'],
            '--t_model', base_run['best'], '--kd_mode', mode, '--batch_size', '50', '--device', 'cpu',
            '--no_download', *extra]


def test_args_json_and_metrics_csv(base_run, tmp_path):
    train_kd.main(kd(base_run, tmp_path, 'ab', 'ab', '--epochs', '2', '--init_epochs', '1'))
    record = json.load(open(tmp_path / 'ab' / 'args.json'))
    assert record['script'] == 'train_kd.py' and 'train_kd.py' in record['command']
    args = record['args']
    assert args['lambda_kd'] == 10.0 and args['m'] == 2.0 and args['init_epochs'] == 1  # filled in
    assert args['num_class'] == 10 and args['device'] == 'cpu'
    assert {'python', 'torch', 'numpy'} <= set(record['versions'])
    assert record['device'].startswith('cpu') and 'git_commit' in record
    with open(tmp_path / 'ab' / 'metrics.csv') as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == KD_COLUMNS
    assert [(r['phase'], r['epoch']) for r in rows] == [('init', '1'), ('main', '1'), ('main', '2')]
    assert all(float(r['seconds']) > 0 and float(r['img_per_s']) > 0 for r in rows)
    log = (tmp_path / 'ab' / 'log.txt').read_text()
    assert log.count('[main] epoch') == 2 and '--- phase 1/2: init' in log


def test_a_resumed_run_appends_rows(base_run, tmp_path):
    train_kd.main(kd(base_run, tmp_path, 'st', 'st', '--epochs', '2'))
    with open(tmp_path / 'st' / 'metrics.csv') as f:
        before = list(csv.DictReader(f))
    os.remove(tmp_path / 'st' / 'complete.json')  # killed after the last checkpoint, before this
    train_kd.main(kd(base_run, tmp_path, 'st', 'st', '--epochs', '2', '--resume'))  # no epoch left
    with open(tmp_path / 'st' / 'metrics.csv') as f:
        after = list(csv.DictReader(f))
    assert after == before and [r['epoch'] for r in after] == ['1', '2']
    log = (tmp_path / 'st' / 'log.txt').read_text()
    assert log.count('[main] epoch 2/2 |') == 1 and 'resumed from' in log


def test_no_progress_bar_noise_when_stdout_is_not_a_terminal(cifar10_root, tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'train_base.py'), '--data_name', 'cifar10',
                        '--net_name', 'resnet20', '--img_root', cifar10_root, '--save_root', str(tmp_path),
                        '--epochs', '1', '--batch_size', '25', '--print_freq', '2', '--device', 'cpu'],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    out = p.stdout + p.stderr
    assert '\r' not in out and '\x1b' not in out
    assert '[main] epoch 1/1 [2/4]' in p.stdout  # plain running averages instead of a bar


def test_progress_bars_on_a_terminal(cifar10_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys.stdout, 'isatty', lambda: True, raising=False)
    train_base.main(['--data_name', 'cifar10', '--net_name', 'resnet20', '--img_root', cifar10_root,
                     '--save_root', str(tmp_path), '--epochs', '1', '--batch_size', '25',
                     '--device', 'cpu', '--print_freq', '1'])
    out = capsys.readouterr().out
    assert '\r' in out and '[main] epoch 1/1' in out and 'img/s' in out
    assert '[main] epoch 1/1 [1/4]' not in out  # the bar replaces the running lines


def test_evaluate_reproduces_the_logged_accuracy(base_run, capsys):
    result = train_base.main(['--data_name', 'cifar10', '--net_name', 'resnet20', '--img_root',
                              base_run['img_root'], '--evaluate', base_run['best'], '--device', 'cpu'])
    with open(os.path.join(base_run['dir'], 'metrics.csv')) as f:
        last = list(csv.DictReader(f))[-1]
    assert result['top1'] == pytest.approx(float(last['test_top1']), abs=1e-3)
    assert result['top5'] == pytest.approx(float(last['test_top5']), abs=1e-3)
    assert f"top-1 {float(last['test_top1']):.2f}" in capsys.readouterr().out


def test_evaluate_reads_an_original_zoo_checkpoint(base_run, tmp_path):
    import torch
    ours = torch.load(base_run['best'], weights_only=True)
    torch.save({'epoch': 1, 'snet': ours['net'], 'tnet': ours['net']}, tmp_path / 'zoo_kd.pth.tar')
    a = train_base.main(['--data_name', 'cifar10', '--net_name', 'resnet20', '--img_root',
                         base_run['img_root'], '--evaluate', base_run['best'], '--device', 'cpu'])
    b = train_base.main(['--data_name', 'cifar10', '--net_name', 'resnet20', '--img_root',
                         base_run['img_root'], '--evaluate', str(tmp_path / 'zoo_kd.pth.tar'),
                         '--device', 'cpu'])
    assert a == b


def tensorboard_args(cifar10_root, tmp_path, epochs=1):
    return ['--data_name', 'cifar10', '--net_name', 'resnet20', '--img_root', cifar10_root,
            '--save_root', str(tmp_path), '--epochs', str(epochs), '--batch_size', '50',
            '--device', 'cpu', '--tensorboard']


def test_tensorboard_without_the_package_is_a_message_before_anything_is_written(
        cifar10_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # as if not installed
    with pytest.raises(SystemExit) as e:
        train_base.main(tensorboard_args(cifar10_root, tmp_path))
    assert e.value.code == 2
    assert 'pip install tensorboard' in capsys.readouterr().err
    assert not (tmp_path / 'try').exists()


def test_tensorboard_scalars_are_the_metrics_rows(cifar10_root, tmp_path):
    pytest.importorskip('torch.utils.tensorboard')  # skipped, not passed, without tensorboard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train_base.main(tensorboard_args(cifar10_root, tmp_path, epochs=2))
    run = tmp_path / 'try'
    assert any(f.startswith('events') for f in os.listdir(run / 'tensorboard'))
    events = EventAccumulator(str(run / 'tensorboard'))
    events.Reload()
    with open(run / 'metrics.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for key in ('lr', 'test_loss', 'test_top1'):
        scalars = events.Scalars(f'main/{key}')
        assert [s.step for s in scalars] == [1, 2]
        assert [s.value for s in scalars] == pytest.approx([float(r[key]) for r in rows], rel=1e-5)


def test_plot_without_matplotlib_is_a_message_after_the_tables(base_run, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)  # as if not installed
    root = os.path.dirname(base_run['dir'])
    png = tmp_path / 'curves.png'
    with pytest.raises(summarize.UserError, match='needs matplotlib'):
        summarize.summary([root, '--csv', str(tmp_path / 's.csv'), '--plot', str(png)])
    assert '| - | resnet20 | Baseline |' in capsys.readouterr().out  # the tables still print
    assert not png.exists()


def test_plot_draws_the_chosen_runs_curves(base_run, tmp_path, capsys):
    pytest.importorskip('matplotlib')  # skipped, not passed, without matplotlib
    root = os.path.dirname(base_run['dir'])
    png = tmp_path / 'curves.png'
    summarize.summary([root, '--csv', str(tmp_path / 's.csv'), '--plot', str(png), '--runs', 'r20'])
    data = png.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n'
    width, height = int.from_bytes(data[16:20], 'big'), int.from_bytes(data[20:24], 'big')
    assert width > 100 and height > 100
    assert 'curves of 1 runs written' in capsys.readouterr().out
    with pytest.raises(summarize.UserError, match='no run matches'):
        summarize.summary([root, '--csv', str(tmp_path / 's.csv'), '--plot', str(tmp_path / 'x.png'),
                           '--runs', 'no-such-run*'])


def test_plot_has_whole_epoch_ticks_and_a_title_naming_the_run(tmp_path, monkeypatch):
    pytest.importorskip('matplotlib')  # skipped, not passed, without matplotlib
    import matplotlib.figure
    run = tmp_path / 'st-c10-r110-r20-s2'
    run.mkdir()
    (run / 'args.json').write_text(json.dumps({'script': 'train_kd.py', 'args': {
        'data_name': 'cifar10', 'epochs': 3, 't_name': 'resnet110', 's_name': 'resnet20', 'kd_mode': 'st'}}))
    (run / 'metrics.csv').write_text('phase,phase_index,epoch,test_top1\nmain,0,1,40\nmain,0,2,50\nmain,0,3,45\n')
    drawn = []
    monkeypatch.setattr(matplotlib.figure.Figure, 'savefig', lambda fig, *a, **k: drawn.append(fig))
    summarize.summary([str(tmp_path), '--plot', str(tmp_path / 'c.png')])
    (ax,) = drawn[0].axes
    assert 'st-c10-r110-r20-s2' in ax.get_title()
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]  # three epochs: no tick at 1.5
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
