"""A run's files survive a kill at any instant: a rewritten file (metrics.csv
on resume, args.json, complete.json) is the old one or the new one, never
empty or partial; a metrics row cut off mid-write is left out by the resume
instead of stopping it or turning into a bogus row; a row is on disk before
the epoch's checkpoint refers to it."""
import argparse
import builtins
import csv
import os
import subprocess
import sys

import pytest

import records
import train_base
from conftest import assert_same_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ['phase', 'phase_index', 'epoch', 'lr', 'test_top1']


class Killed(BaseException):
    """Stands for SIGKILL: nothing of the program's own error handling catches it."""


def history(epochs):
    """metrics.csv's text for main-phase epochs 1..epochs, as the training scripts write it."""
    rows = [['phase', 'phase_index', 'epoch', 'lr', 'test_top1']]
    rows += [['main', 0, e, 0.1, 50 + e] for e in range(1, epochs + 1)]
    return ''.join(','.join(map(str, r)) + '\r\n' for r in rows)


def resumable_run(tmp_path, metrics_text):
    """A run directory to resume: a checkpoint file (unread here), args.json and metrics.csv."""
    run_dir = tmp_path / 'run'
    run_dir.mkdir(parents=True)
    (run_dir / 'checkpoint.pth.tar').write_bytes(b'stand-in')
    (run_dir / 'args.json').write_text('{"script": "train_base.py", "args": {}}')
    (run_dir / 'metrics.csv').write_bytes(metrics_text.encode())
    return run_dir


def open_run(run_dir):
    args = argparse.Namespace(save_root=str(run_dir.parent), note=run_dir.name, resume=True,
                              overwrite=False, tensorboard=False)
    run = records.Run(args, 'train_base.py')
    run.columns = list(COLUMNS)
    return run


def rows_of(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- a kill while rewriting

def kill_at(point, run_dir, monkeypatch):
    """Make the first write into run_dir, its flush to disk, or the rename raise Killed."""
    def die(*args, **kwargs):
        raise Killed(point)
    if point == 'write':
        real_open = builtins.open

        class DiesOnWrite:
            def __init__(self, f):
                self.f = f

            def write(self, text):
                raise Killed(point)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def __getattr__(self, name):
                return getattr(self.f, name)

        def opening(path, mode='r', *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            inside = os.path.dirname(os.path.abspath(str(path))) == str(run_dir)
            return DiesOnWrite(f) if inside and ('w' in mode or 'a' in mode) else f
        monkeypatch.setattr(builtins, 'open', opening)
    elif point == 'fsync':
        monkeypatch.setattr(os, 'fsync', die)
    else:
        monkeypatch.setattr(os, 'replace', die)


@pytest.mark.parametrize('point', ['write', 'fsync', 'replace'])
def test_a_kill_while_resume_rewrites_metrics_leaves_the_old_or_the_new_history(
        tmp_path, monkeypatch, point):
    old = history(3)
    run_dir = resumable_run(tmp_path, old)
    run = open_run(run_dir)
    kill_at(point, run_dir, monkeypatch)
    try:
        run.start_metrics(keep_upto=(0, 2))  # the checkpoint holds epoch 2: row 3 goes
    except Killed:
        pass
    monkeypatch.undo()
    text = (run_dir / 'metrics.csv').read_bytes().decode()
    assert text in (old, history(2)), repr(text)  # never empty, never partial
    # and a resume from what the kill left works and gives the new history
    open_run(run_dir).start_metrics(keep_upto=(0, 2))
    assert (run_dir / 'metrics.csv').read_bytes().decode() == history(2)


@pytest.mark.parametrize('point', ['write', 'fsync', 'replace'])
def test_a_kill_while_args_json_or_complete_json_is_written_keeps_the_old_file(
        tmp_path, monkeypatch, point):
    run_dir = resumable_run(tmp_path, history(2))
    run = open_run(run_dir)
    before = (run_dir / 'args.json').read_text()
    (run_dir / 'complete.json').write_text('{"epochs": 2}')
    kill_at(point, run_dir, monkeypatch)
    for write in (lambda: run.write_args('cpu', resumed=True), lambda: run.mark_complete({'epochs': 3})):
        with pytest.raises(Killed):
            write()
    monkeypatch.undo()
    assert (run_dir / 'args.json').read_text() == before
    assert (run_dir / 'complete.json').read_text() == '{"epochs": 2}'


KILL_DURING_WRITE = r'''
import argparse, builtins, os, sys
sys.path.insert(0, sys.argv[2])
import records
run_dir = sys.argv[1]
run = records.Run(argparse.Namespace(save_root=os.path.dirname(run_dir), note=os.path.basename(run_dir),
                                     resume=True, overwrite=False, tensorboard=False), 'train_base.py')
run.columns = ['phase', 'phase_index', 'epoch', 'lr', 'test_top1']
real_open = builtins.open
class DiesOnWrite:
    def __init__(self, f): self.f = f
    def write(self, text): os._exit(9)  # the process ends here, as under kill -9
    def __enter__(self): return self
    def __exit__(self, *exc): self.f.close()
    def __getattr__(self, name): return getattr(self.f, name)
def opening(path, mode='r', *args, **kwargs):
    f = real_open(path, mode, *args, **kwargs)
    return DiesOnWrite(f) if str(path).startswith(run_dir) and ('w' in mode or 'a' in mode) else f
builtins.open = opening
run.start_metrics(keep_upto=(0, 2))
'''


def test_a_process_killed_while_resume_rewrites_metrics_keeps_the_history(tmp_path):
    old = history(3)
    run_dir = resumable_run(tmp_path, old)
    p = subprocess.run([sys.executable, '-c', KILL_DURING_WRITE, str(run_dir), ROOT],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 9, p.stderr  # it died mid-write
    assert (run_dir / 'metrics.csv').read_bytes().decode() == old


# ----------------------------------------------------------------------------- a row cut off mid-write

@pytest.mark.parametrize('cut', ['main,0,1', 'ma', 'main,0,'])
def test_resume_leaves_out_a_last_row_cut_off_mid_line(tmp_path, caplog, cut):
    # Ten whole epochs and the first bytes of the eleventh's row: the run was
    # killed while appending it, so its checkpoint holds epoch 10. 'main,0,1'
    # reads as epoch 1 (of 11...) and must not come back as a second epoch 1.
    run_dir = resumable_run(tmp_path, history(10) + cut)
    run = open_run(run_dir)
    assert [r['epoch'] for r in run.metrics_rows] == [str(e) for e in range(1, 11)]
    run.start_metrics(keep_upto=(0, 10))
    assert (run_dir / 'metrics.csv').read_bytes().decode() == history(10)
    assert run.metrics_cut_row == cut


def test_a_damaged_row_inside_metrics_stops_the_resume(tmp_path):
    lines = history(3).split('\r\n')
    lines[2] = 'main,0,2,0.1'  # a whole line with a field missing: not a cut, damage
    run_dir = resumable_run(tmp_path, '\r\n'.join(lines))
    with pytest.raises(records.UserError, match=r'metrics.csv is malformed .*line 3 has 4 fields, the header 5'):
        open_run(run_dir)


def test_a_run_killed_while_appending_a_row_resumes_to_the_uninterrupted_result(
        cifar10_root, tmp_path, monkeypatch):
    def argv(note, *extra):
        return ['--data_name', 'cifar10', '--net_name', 'resnet20', '--img_root', cifar10_root,
                '--save_root', str(tmp_path), '--note', note, '--epochs', '2', '--batch_size', '50',
                '--device', 'cpu', '--no_download', '--seed', '5', *extra]
    train_base.main(argv('straight'))

    # Epoch 2's row is appended, then the process dies before epoch 2's checkpoint;
    # cutting the row to its first bytes makes it the row a kill mid-append leaves.
    real_save = records.save_checkpoint

    def save(state, path):
        if path.endswith('checkpoint.pth.tar') and state['phase_epoch'] == 2:
            raise Killed()
        real_save(state, path)
    monkeypatch.setattr(records, 'save_checkpoint', save)
    with pytest.raises(Killed):
        train_base.main(argv('resumed'))
    monkeypatch.undo()
    metrics = tmp_path / 'resumed' / 'metrics.csv'
    text = metrics.read_bytes()
    metrics.write_bytes(text[:text.rstrip(b'\r\n').rfind(b'\n') + 3])  # 'ma' of epoch 2's row

    train_base.main(argv('resumed', '--resume'))
    assert [r['epoch'] for r in rows_of(metrics)] == ['1', '2']
    assert_same_run(str(tmp_path / 'straight'), str(tmp_path / 'resumed'))
    assert 'cut off mid-line' in (tmp_path / 'resumed' / 'log.txt').read_text()


def test_a_metrics_row_is_on_disk_before_append_returns(tmp_path, monkeypatch):
    run_dir = resumable_run(tmp_path, history(1))
    run = open_run(run_dir)
    flushed = []
    real_fsync = os.fsync

    def fsync(fd):
        flushed.append((os.path.realpath(f'/proc/self/fd/{fd}'), os.path.getsize(run_dir / 'metrics.csv')))
        real_fsync(fd)
    monkeypatch.setattr(os, 'fsync', fsync)
    run.append_metrics({'phase': 'main', 'phase_index': 0, 'epoch': 2, 'lr': 0.1, 'test_top1': 52.0})
    assert (run_dir / 'metrics.csv').read_bytes().decode() == history(2)
    # flushed after the whole row was written
    assert (os.path.realpath(run_dir / 'metrics.csv'), len(history(2))) in flushed


def test_a_damaged_last_row_is_dropped_past_the_checkpoint_and_refused_within_it(tmp_path):
    text = history(1) + 'main,0,2,0.1\r\n'  # epoch 2's row lacks a field
    open_run(resumable_run(tmp_path / 'past', text)).start_metrics(keep_upto=(0, 1))
    assert (tmp_path / 'past' / 'run' / 'metrics.csv').read_bytes().decode() == history(1)
    run = open_run(resumable_run(tmp_path / 'within', text))
    with pytest.raises(records.UserError, match='metrics.csv is malformed .*more or fewer fields'):
        run.start_metrics(keep_upto=(0, 2))
    assert (tmp_path / 'within' / 'run' / 'metrics.csv').read_bytes().decode() == text
