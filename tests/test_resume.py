"""Kill a run with SIGKILL mid-epoch, resume it, and get exactly what an
uninterrupted run gives; checkpoints survive a crash during a save; a
non-finite loss stops the run and keeps the last good checkpoint."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train_base
import train_kd
import checkpoints
from conftest import assert_same_run, distill_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOLATILE = {'seconds', 'img_per_s'}  # wall-clock columns


def metrics(run_dir):
    with open(os.path.join(run_dir, 'metrics.csv')) as f:
        return [{k: v for k, v in r.items() if k not in VOLATILE} for r in csv.DictReader(f)]


def final_state(run_dir):
    ckpt = torch.load(os.path.join(run_dir, 'checkpoint.pth.tar'), weights_only=True)
    return ckpt


def wait_for_checkpoint(path, proc, timeout=300):
    """Until the run has finished its first checkpointed epoch."""
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(f'run ended before it could be killed: {proc.stdout.read()}')
        if os.path.isfile(path):
            return
        time.sleep(0.05)
    raise AssertionError('no checkpoint appeared')


def kill_and_resume(script, args, run_dir):
    """Start the run, SIGKILL it once its first epoch is saved, then resume it."""
    env = {**os.environ, 'OMP_NUM_THREADS': str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(os.path.join(run_dir, 'checkpoint.pth.tar'), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(os.path.join(run_dir, 'checkpoint.pth.tar'), weights_only=True)
    killed_at['metrics_rows'] = len(metrics(run_dir))  # what the killed run had written
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args, '--resume'], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert 'resumed from' in p.stdout
    return killed_at


def base_args(root, save_root, note, epochs=3):
    return ['--data_name', 'cifar10', '--net_name', 'resnet20', '--img_root', root,
            '--save_root', str(save_root), '--note', note, '--epochs', str(epochs),
            '--batch_size', '10', '--device', 'cpu', '--no_download', '--seed', '7']


def test_train_base_kill_and_resume_equals_uninterrupted(cifar10_root, tmp_path):
    train_base.main(base_args(cifar10_root, tmp_path, 'straight'))
    killed = kill_and_resume('train_base.py', base_args(cifar10_root, tmp_path, 'resumed'),
                             str(tmp_path / 'resumed'))
    assert killed['epoch'] < 3  # it really was interrupted
    assert_same_run(str(tmp_path / 'straight'), str(tmp_path / 'resumed'))


def kd_args(base_run, save_root, note, mode, epochs, extra=()):
    return distill_argv(base_run, save_root, note, mode, epochs, 10, ['--seed', '3', *extra])


@pytest.mark.parametrize('mode, epochs, extra', [
    ('crd', 2, ['--nce_n', '16', '--feat_dim', '16']),   # memory banks and Z constants
    ('ab', 1, ['--init_epochs', '2']),                   # killed inside the init stage
])
def test_train_kd_kill_and_resume_equals_uninterrupted(base_run, tmp_path, mode, epochs, extra):
    train_kd.main(kd_args(base_run, tmp_path, 'straight', mode, epochs, extra))
    killed = kill_and_resume('train_kd.py', kd_args(base_run, tmp_path, 'resumed', mode, epochs, extra),
                             str(tmp_path / 'resumed'))
    # it really was interrupted: the killed run had written fewer epochs than the full run
    full = len(metrics(str(tmp_path / 'straight')))
    assert killed['metrics_rows'] < full and killed['epoch'] < 2, (killed['metrics_rows'], full)
    if mode == 'ab':
        assert killed['phase_index'] == 0 and killed['phase_epoch'] == 1
    assert_same_run(str(tmp_path / 'straight'), str(tmp_path / 'resumed'))


def test_train_dml_kill_and_resume_equals_uninterrupted(base_run, tmp_path):
    def args(note):
        return ['--data_name', 'cifar10', '--img_root', base_run['img_root'], '--save_root',
                str(tmp_path), '--note', note, '--net1_name', 'resnet20', '--net2_name', 'resnet20',
                '--net1_init', base_run['initial'], '--net2_init', base_run['best'], '--epochs', '2',
                '--batch_size', '10', '--device', 'cpu', '--no_download', '--seed', '5']
    import train_dml
    train_dml.main(args('straight'))
    kill_and_resume('train_dml.py', args('resumed'), str(tmp_path / 'resumed'))
    assert_same_run(str(tmp_path / 'straight'), str(tmp_path / 'resumed'), ('net1', 'net2'))


def test_resume_needs_a_checkpoint_and_a_new_run_does_not_overwrite(cifar10_root, tmp_path):
    with pytest.raises(SystemExit) as e:
        train_base.main(base_args(cifar10_root, tmp_path, 'none', 1) + ['--resume'])
    assert e.value.code == 2 and not (tmp_path / 'none').exists()
    train_base.main(base_args(cifar10_root, tmp_path, 'run', 1))
    before = (tmp_path / 'run' / 'checkpoint.pth.tar').read_bytes()
    with pytest.raises(SystemExit):
        train_base.main(base_args(cifar10_root, tmp_path, 'run', 1))
    assert (tmp_path / 'run' / 'checkpoint.pth.tar').read_bytes() == before
    with pytest.raises(SystemExit):  # resuming with a different schedule is refused
        train_base.main(base_args(cifar10_root, tmp_path, 'run', 2) + ['--resume', '--lr', '0.5'])
    train_base.main(base_args(cifar10_root, tmp_path, 'run', 1) + ['--overwrite'])
    assert len(metrics(str(tmp_path / 'run'))) == 1


def test_resume_continues_a_finished_run_to_more_epochs_without_duplicate_rows(cifar10_root, tmp_path):
    train_base.main(base_args(cifar10_root, tmp_path, 'run', 2))
    rows = metrics(str(tmp_path / 'run'))
    # a kill between the metrics row and the checkpoint leaves an extra row: resume drops it
    with open(tmp_path / 'run' / 'metrics.csv', 'a') as f:
        f.write('main,0,3,0.1,9,9,9,9,9,9,9,9\n')
    os.remove(tmp_path / 'run' / 'complete.json')  # not marked complete: resumable
    train_base.main(base_args(cifar10_root, tmp_path, 'run', 2) + ['--resume'])
    assert metrics(str(tmp_path / 'run')) == rows


def test_a_failed_write_keeps_the_old_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = str(tmp_path / 'checkpoint.pth.tar')
    checkpoints.save_checkpoint({'epoch': 1, 'w': torch.ones(3)}, path)

    def disk_full(src, dst):
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(checkpoints.os, 'replace', disk_full)
    with pytest.raises(checkpoints.UserError, match='No space left on device; the previous file is kept'):
        checkpoints.save_checkpoint({'epoch': 2, 'w': torch.zeros(3)}, path)
    assert not os.path.exists(path + '.tmp')
    assert checkpoints.load_checkpoint(path)['epoch'] == 1


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(base_run, tmp_path, monkeypatch,
                                                                       capsys):
    import kd_losses.st as st
    calls = {'n': 0}
    real_forward = st.SoftTarget.forward

    def poisoned(self, out_s, out_t):
        calls['n'] += 1
        loss = real_forward(self, out_s, out_t)
        return loss * float('nan') if calls['n'] == 13 else loss  # epoch 2, step 3 (10 steps/epoch)
    monkeypatch.setattr(st.SoftTarget, 'forward', poisoned)
    args = kd_args(base_run, tmp_path, 'nan', 'st', 3, ['--print_freq', '100'])
    with pytest.raises(SystemExit) as e:
        train_kd.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert 'epoch 2/3' in err and 'the kd loss became non-finite at step 3' in err
    ckpt = torch.load(tmp_path / 'nan' / 'checkpoint.pth.tar', weights_only=True)
    assert ckpt['epoch'] == 1
    assert all(torch.isfinite(v).all() for v in ckpt['net'].values() if v.is_floating_point())
    assert 'non-finite' in (tmp_path / 'nan' / 'log.txt').read_text()


def test_resuming_from_a_foreign_checkpoint_is_refused(cifar10_root, tmp_path, capsys):
    train_base.main(base_args(cifar10_root, tmp_path, 'run', 1))
    ckpt = tmp_path / 'run' / 'checkpoint.pth.tar'
    torch.save({'epoch': 1, 'net': torch.load(ckpt, weights_only=True)['net']}, ckpt)  # a zoo file
    before = (tmp_path / 'run' / 'log.txt').read_text()
    with pytest.raises(SystemExit) as e:
        train_base.main(base_args(cifar10_root, tmp_path, 'run', 1) + ['--resume'])
    assert e.value.code == 2
    assert 'lacks phase_index' in capsys.readouterr().err
    assert (tmp_path / 'run' / 'log.txt').read_text() == before
    (tmp_path / 'run' / 'checkpoint.pth.tar').write_bytes(b'not a checkpoint')
    with pytest.raises(SystemExit):
        train_base.main(base_args(cifar10_root, tmp_path, 'run', 1) + ['--resume'])
    assert 'checkpoint.pth.tar cannot be loaded' in capsys.readouterr().err
