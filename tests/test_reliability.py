"""Never a wrong result silently: what used to go wrong under attack, reproduced,
and now refused with a one-line message (exit 2, no traceback) or handled."""
import fcntl
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoints
import train_base
import train_dml
import train_kd
from conftest import distill_argv, dump, write_cifar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def base(img_root, save_root, note='run', *extra, epochs=1):
    return ['--data_name', 'cifar10', '--net_name', 'resnet20', '--img_root', img_root,
            '--save_root', str(save_root), '--note', note, '--epochs', str(epochs),
            '--batch_size', '50', '--device', 'cpu', '--no_download', *extra]


def kd(base_run, save_root, note='kd', mode='st', *extra, epochs=1):
    return distill_argv(base_run, save_root, note, mode, epochs, 50, extra)


def fails(main, argv, capsys, *fragments):
    """Run a script's main, expecting a one-line error containing every fragment."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith('error: ') and 'Traceback' not in err and err.count('\n') == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


# ----------------------------------------------------------------------------- non-finite epochs

def test_a_blown_up_epoch_is_never_saved(cifar10_root, tmp_path, capsys):
    """An lr that wrecks the weights in the epoch's last update: the test loss
    is NaN, and nothing of that epoch (model_best, checkpoint) is written."""
    # one step per epoch: its training loss is finite, only the update after it blows up
    err = fails(train_base.main, base(cifar10_root, tmp_path, 'huge', '--lr', '1e30',
                                      '--batch_size', '100'), capsys,
                'test loss', 'became non-finite', 'no checkpoint was saved yet')
    assert 'epoch 1/1' in err
    run = tmp_path / 'huge'
    assert not (run / 'model_best.pth.tar').exists() and not (run / 'checkpoint.pth.tar').exists()
    assert not (run / 'complete.json').exists()
    assert (run / 'log.txt').read_text().splitlines()[-1].startswith('error: ')


def test_a_later_blow_up_names_the_last_good_epoch(base_run, tmp_path, capsys, monkeypatch):
    """Epoch 2's weights become NaN: the run stops before saving epoch 2, and
    the checkpoint of epoch 1 stays resumable."""
    import utils
    real = utils.Phase.__init__

    def poison(self, *a, **k):
        real(self, *a, **k)
        begin = self.begin_epoch

        def begin_epoch(epoch):
            out = begin(epoch) if begin else None
            if epoch == 2:
                with torch.no_grad():
                    next(self.optimizer.params.__iter__()).fill_(float('nan'))
            return out
        self.begin_epoch = begin_epoch
    monkeypatch.setattr(utils.Phase, '__init__', poison)
    fails(train_kd.main, kd(base_run, tmp_path, 'late', 'st', epochs=3), capsys,
          'epoch 2/3', 'last good epoch (main epoch 1)', '--resume')
    assert torch.load(tmp_path / 'late' / 'checkpoint.pth.tar', weights_only=True)['epoch'] == 1


# ----------------------------------------------------------------------------- data files

def test_a_pickle_payload_in_a_batch_file_is_refused_unrun(tmp_path, capsys):
    root = str(tmp_path / 'data')
    write_cifar(root, 'cifar10', n_train=100, n_test=40)
    marker = tmp_path / 'pwned'

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))
    dump(os.path.join(root, 'cifar-10-batches-py', 'data_batch_3'), {'data': Payload(), 'labels': []})
    fails(train_base.main, base(root, tmp_path / 'res'), capsys, 'data_batch_3', 'posix.system',
          'refused')
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'dataset.py'), root, 'cifar10', '--no_download'],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 2 and 'refused' in p.stderr and 'Traceback' not in p.stderr
    assert not marker.exists()


@pytest.mark.parametrize('labels, message', [
    (lambda n: [1.7] * n, "'labels' must be integers"),
    (lambda n: ['a'] * n, "'labels' must be integers"),
])
def test_labels_that_are_not_integers_are_refused(tmp_path, capsys, labels, message):
    root = str(tmp_path / 'data')
    write_cifar(root, 'cifar10', n_train=100, n_test=40)
    path = os.path.join(root, 'cifar-10-batches-py', 'data_batch_2')
    entry = pickle.load(open(path, 'rb'))
    entry['labels'] = labels(len(entry['labels']))
    dump(path, entry)
    fails(train_base.main, base(root, tmp_path / 'res'), capsys, 'data_batch_2', message)


def test_an_empty_batch_file_and_a_missing_test_batch_are_named(tmp_path, capsys):
    root = str(tmp_path / 'data')
    write_cifar(root, 'cifar10', n_train=100, n_test=40)
    folder = os.path.join(root, 'cifar-10-batches-py')
    dump(os.path.join(folder, 'data_batch_4'), {'data': np.zeros((0, 3072), np.uint8), 'labels': []})
    fails(train_base.main, base(root, tmp_path / 'res'), capsys, 'data_batch_4: holds no images')
    os.remove(os.path.join(folder, 'test_batch'))
    err = fails(train_base.main, base(root, tmp_path / 'res'), capsys, 'lacks test_batch')
    assert 'data_batch_1' not in err.split('lacks')[1].split('.')[0]
    assert not (tmp_path / 'res').exists()


def test_a_failed_download_names_no_flag_it_was_not_given_and_leaves_no_folder(tmp_path, capsys,
                                                                             monkeypatch):
    import torchvision

    def offline(*a, **k):
        raise OSError('network unreachable')
    monkeypatch.setattr(torchvision.datasets, 'CIFAR10', offline)
    argv = [a for a in base(str(tmp_path / 'none'), tmp_path / 'res') if a != '--no_download']
    err = fails(train_base.main, argv, capsys, 'Downloading it failed', 'network unreachable')
    assert '(--no_download)' not in err
    assert not (tmp_path / 'none').exists()


# ----------------------------------------------------------------------------- one writer per run

def test_a_second_writer_on_one_run_directory_stops(cifar10_root, tmp_path, capsys):
    run = tmp_path / 'busy'
    run.mkdir()
    with open(run / 'run.lock', 'w') as held:  # what a running process holds
        held.write('pid 4242 on elsewhere since now: python train_base.py ...')
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fails(train_base.main, base(cifar10_root, tmp_path, 'busy'), capsys,
              'is being written by pid 4242 on elsewhere')
    assert sorted(os.listdir(run)) == ['run.lock']
    train_base.main(base(cifar10_root, tmp_path, 'busy'))  # released: the run proceeds
    assert (run / 'complete.json').is_file()


# ----------------------------------------------------------------------------- resume checks its inputs

def killed_before_marked_complete(run_dir):
    """A run killed after its last checkpoint, before complete.json: resumable."""
    os.remove(run_dir / 'complete.json')


def test_resume_refuses_a_changed_teacher_or_dataset_and_survives_a_lost_args_json(
        base_run, tmp_path, capsys):
    train_kd.main(kd(base_run, tmp_path, 'r', 'st', epochs=2))
    killed_before_marked_complete(tmp_path / 'r')
    teacher = tmp_path / 'teacher.pth.tar'
    teacher.write_bytes(open(base_run['best'], 'rb').read())
    argv = kd(base_run, tmp_path, 'r', 'st', epochs=2)
    argv[argv.index('--t_model') + 1] = str(teacher)
    train_kd.main(argv + ['--resume'])  # another path to the same content is fine
    killed_before_marked_complete(tmp_path / 'r')
    ckpt = checkpoints.load_checkpoint(base_run['best'])
    ckpt['net']['module.fc.bias'] += 1
    checkpoints.save_checkpoint(ckpt, str(teacher))
    fails(train_kd.main, argv + ['--resume'], capsys, '--t_model changed since the run started')
    other = str(tmp_path / 'other-data')
    write_cifar(other, 'cifar10', n_train=100, n_test=40, seed=5)
    argv = kd(base_run, tmp_path, 'r', 'st', epochs=2)
    argv[argv.index('--img_root') + 1] = other
    fails(train_kd.main, argv + ['--resume'], capsys, 'the training data (its size or content) changed')
    os.remove(tmp_path / 'r' / 'args.json')
    train_kd.main(kd(base_run, tmp_path, 'r', 'st', epochs=2) + ['--resume'])
    assert json.load(open(tmp_path / 'r' / 'args.json'))['args']['kd_mode'] == 'st'


def test_resume_with_garbage_metrics_is_a_message_and_loses_nothing(cifar10_root, tmp_path, capsys):
    train_base.main(base(cifar10_root, tmp_path, 'g'))
    (tmp_path / 'g' / 'metrics.csv').write_text('phase,phase_index,epoch\nmain,zero,one\n')
    before = {f: (tmp_path / 'g' / f).read_bytes() for f in os.listdir(tmp_path / 'g')}
    fails(train_base.main, base(cifar10_root, tmp_path, 'g', '--resume'), capsys,
          'metrics.csv is malformed')
    assert {f: (tmp_path / 'g' / f).read_bytes() for f in os.listdir(tmp_path / 'g')} == before


# ----------------------------------------------------------------------------- damaged checkpoints

def test_a_checkpoint_with_flipped_bytes_is_refused(base_run, tmp_path, capsys):
    damaged = tmp_path / 'damaged.pth.tar'
    data = bytearray(open(base_run['best'], 'rb').read())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
    damaged.write_bytes(bytes(data))
    argv = ['--data_name', 'cifar10', '--net_name', 'resnet20', '--img_root', base_run['img_root'],
            '--evaluate', str(damaged), '--device', 'cpu', '--no_download']
    fails(train_base.main, argv, capsys, 'damaged.pth.tar')


@pytest.mark.parametrize('make, message, teacher_message', [
    (lambda p: p.write_bytes(b''), 'is empty (0 bytes)', 'is empty (0 bytes)'),
    # a folder as --t_model is one of released teachers: this one holds none
    (lambda p: p.mkdir(), 'is not a regular file', 'no released teacher for resnet20'),
])
def test_empty_files_and_directories_as_checkpoints(base_run, tmp_path, capsys, make, message,
                                                    teacher_message):
    bad = tmp_path / 'bad.pth.tar'
    make(bad)
    for flag, expected in (('--t_model', teacher_message), ('--s_init', message)):
        argv = kd(base_run, tmp_path / 'res')
        argv[argv.index(flag) + 1] = str(bad)
        fails(train_kd.main, argv, capsys, flag, expected)
    fails(train_dml.main, ['--data_name', 'cifar10', '--net1_name', 'resnet20', '--net2_name', 'resnet20',
                           '--net1_init', str(bad), '--net2_init', 'random', '--device', 'cpu',
                           '--img_root', base_run['img_root'], '--save_root', str(tmp_path / 'res')],
          capsys, '--net1_init', message)
    assert not (tmp_path / 'res').exists()


class Unsafe:
    """Any class: a checkpoint holding one needs full unpickling to load."""


def test_an_unsafe_checkpoint_is_called_unsafe(base_run, tmp_path, capsys):
    path = tmp_path / 'unsafe.pth.tar'
    torch.save({'net': {}, 'extra': Unsafe()}, path)
    err = fails(train_kd.main, kd(base_run, tmp_path / 'res') + ['--t_model', str(path)], capsys,
                'refused', 'could run code')
    assert 'weights_only=False' not in err and 'truncated' not in err


# ----------------------------------------------------------------------------- nonsense flags

@pytest.mark.parametrize('flags, message', [
    (['--momentum', 'nan'], 'argument --momentum'),
    (['--momentum', '5'], 'argument --momentum: must lie in [0.0, 1.0)'),
    (['--weight_decay', 'inf'], 'argument --weight_decay: must be a finite number'),
    (['--lr', 'inf'], 'argument --lr: must be a finite number'),
    (['--lambda_kd', 'nan'], 'argument --lambda_kd: must be a finite number'),
    (['--kd_mode', 'rkd', '--w_dist', 'nan'], 'argument --w_dist: must be a finite number'),
    (['--kd_mode', 'irg', '--w_irg_edge', 'inf'], 'argument --w_irg_edge: must be a finite number'),
    (['--kd_mode', 'afd', '--att_f', 'inf'], 'argument --att_f: must be a finite number'),
    (['--seed', '-1'], 'argument --seed: must lie in [0, 4294967295]'),
    (['--seed', str(2 ** 33)], 'argument --seed: must lie in [0, 4294967295]'),
    (['--note', ''], 'argument --note: must be a folder name'),
    (['--note', '../x'], 'argument --note: must be a folder name'),
    (['--feat_dim', '1e12', '--kd_mode', 'crd'], 'argument --feat_dim'),
    (['--lr', '1e308'], 'argument --lr: must be at most 3.4e+38 (a float32)'),
])
def test_nonsense_flags_are_refused_before_anything_is_written(base_run, tmp_path, capsys, flags, message):
    fails(train_kd.main, kd(base_run, tmp_path / 'res') + flags, capsys, message)
    assert not (tmp_path / 'res').exists()


def test_an_allocation_that_cannot_succeed_is_a_message(base_run, tmp_path, capsys):
    fails(train_kd.main, kd(base_run, tmp_path / 'res', 'x', 'crd', '--feat_dim', str(2 ** 31 - 1),
                            '--nce_n', '16'), capsys, '--kd_mode crd', 'memory')
    assert not (tmp_path / 'res').exists()


def test_a_save_root_that_is_a_file_or_a_run_file_that_is_a_folder(cifar10_root, tmp_path, capsys):
    (tmp_path / 'file').write_text('x')
    fails(train_base.main, base(cifar10_root, tmp_path / 'file'), capsys, 'is a file, not a folder')
    (tmp_path / 'res' / 'run' / 'metrics.csv').mkdir(parents=True)
    fails(train_base.main, base(cifar10_root, tmp_path / 'res'), capsys,
          'metrics.csv is not a regular file')


# ----------------------------------------------------------------------------- leftovers and logs

def test_overwrite_clears_every_file_of_the_old_run(tmp_path, cifar10_root):
    dml = ['--data_name', 'cifar10', '--net1_name', 'resnet20', '--net2_name', 'resnet20', '--net1_init',
           'random', '--net2_init', 'random', '--img_root', cifar10_root, '--save_root', str(tmp_path),
           '--note', 'o', '--epochs', '1', '--batch_size', '50', '--device', 'cpu', '--no_download']
    train_dml.main(dml)
    (tmp_path / 'o' / 'args.resume.json').write_text('{}')
    train_base.main(base(cifar10_root, tmp_path, 'o', '--overwrite'))
    files = set(os.listdir(tmp_path / 'o'))
    assert not {'model_best_net1.pth.tar', 'model_best_net2.pth.tar', 'args.resume.json'} & files
    assert {'model_best.pth.tar', 'complete.json', 'initial_r20.pth.tar'} <= files


def test_logs_read_well_and_a_resume_adds_no_second_header(base_run, tmp_path):
    train_kd.main(kd(base_run, tmp_path, 'l', 'ab', '--init_epochs', '1', epochs=2))
    killed_before_marked_complete(tmp_path / 'l')
    train_kd.main(kd(base_run, tmp_path, 'l', 'ab', '--init_epochs', '1', '--resume', epochs=2))
    log = (tmp_path / 'l' / 'log.txt').read_text()
    assert log.startswith('command: python train_kd.py ') and "{'" not in log  # no raw args dict
    assert log.count('kd_mode ab (') == 1 and log.count('=== resumed ') == 1
    assert max(len(line) for line in log.splitlines() if line.startswith('[')) < 200


def test_a_dml_epoch_line_stays_short(cifar10_root, tmp_path):
    train_dml.main(['--data_name', 'cifar10', '--net1_name', 'resnet20', '--net2_name', 'resnet20',
                    '--net1_init', 'random', '--net2_init', 'random', '--img_root', cifar10_root,
                    '--save_root', str(tmp_path), '--note', 'd', '--epochs', '1', '--batch_size', '50',
                    '--device', 'cpu', '--no_download'])
    line = [l for l in (tmp_path / 'd' / 'log.txt').read_text().splitlines() if l.startswith('[main] epoch')][0]
    assert len(line) < 200 and 'net1 ce' in line and 'net2 ce' in line


def test_pre_training_phases_scale_with_the_schedule(base_run, tmp_path):
    argv = kd(base_run, tmp_path, 's', 'ab', epochs=4)
    args, sources, _ = train_kd.parse_args(argv)
    assert args.init_epochs == 1 and '50 of 200 epochs scaled to 4' in sources['init_epochs']
    args, _, _ = train_kd.parse_args(kd(base_run, tmp_path, 's', 'ab', epochs=200))
    assert args.init_epochs == 50
    args, _, _ = train_kd.parse_args(kd(base_run, tmp_path, 's', 'ft', epochs=20))
    assert args.para_epochs == 3
    args, _, _ = train_kd.parse_args(kd(base_run, tmp_path, 's', 'bss', '--warmup_epochs', '7', epochs=20))
    assert args.warmup_epochs == 7  # given: kept as it is
