"""The mistakes of a first run and the runs met again: each mistake ends in
one line (`error: ...`, exit code 2, no traceback) before anything is
written, and --resume of a finished run says so in one line, exits 0 and
changes no file of the run."""
import builtins
import os

import pytest
import torch

import records
import train_base
import train_dml
import train_kd
from conftest import distill_argv, write_cifar

HUGE = str(10 ** 20)


def base(img_root, save_root, note='run', *extra, epochs=1):
    return ['--data_name', 'cifar10', '--net_name', 'resnet20', '--img_root', img_root,
            '--save_root', str(save_root), '--note', note, '--epochs', str(epochs),
            '--batch_size', '50', '--device', 'cpu', '--no_download', *extra]


def dml(img_root, save_root, *extra):
    return ['--data_name', 'cifar10', '--net1_name', 'resnet20', '--net2_name', 'resnet20',
            '--net1_init', 'random', '--net2_init', 'random', '--img_root', img_root,
            '--save_root', str(save_root), '--note', 'dml', '--epochs', '1', '--batch_size', '50',
            '--device', 'cpu', '--no_download', *extra]


def fails(main, argv, capsys, *fragments):
    """Run a script's main, expecting exit 2 and exactly one line, `error: ...`,
    holding every fragment; returns that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


@pytest.fixture
def no_run_starts(monkeypatch):
    """A refused run never reaches its run directory (and an accepted one
    stops there instead of training for 10**20 epochs)."""
    def open_run(self, *args, **kwargs):
        raise AssertionError(f'the run started: {self.dir} was about to be written')
    monkeypatch.setattr(records.Run, 'open', open_run)


def snapshot(folder):
    """Every file under `folder`: its bytes and modification time."""
    out = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, 'rb') as f:
                out[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
    return out


# ----------------------------------------------------------------------------- numbers out of range

# (script, flags, what the message says): whole numbers beyond a 32-bit int,
# real ones beyond a float32, in every script and every flag family.
TOO_LARGE = [
    ('base', ['--epochs', HUGE], 'argument --epochs: must be at most 2147483647 (a 32-bit int)'),
    ('base', ['--batch_size', HUGE], 'argument --batch_size: must be at most 2147483647'),
    ('base', ['--eval_batch_size', HUGE], 'argument --eval_batch_size: must be at most 2147483647'),
    ('base', ['--print_freq', HUGE], 'argument --print_freq: must be at most 2147483647'),
    ('base', ['--lr_decay_epochs', f'1,{HUGE}'], 'argument --lr_decay_epochs: must be at most'),
    ('base', ['--weight_decay', '1e39'], 'argument --weight_decay: must be at most 3.4e+38 (a float32)'),
    ('base', ['--lr', '1e308'], 'argument --lr: must be at most 3.4e+38 (a float32)'),
    ('kd', ['--protocol', 'crd', '--epochs', HUGE], 'argument --epochs: must be at most 2147483647'),
    ('kd', ['--kd_mode', 'dkd', '--epochs', HUGE], 'argument --epochs: must be at most 2147483647'),
    ('kd', ['--kd_mode', 'dkd', '--dkd_warmup', HUGE], 'argument --dkd_warmup: must be at most'),
    ('kd', ['--kd_mode', 'ab', '--init_epochs', HUGE], 'argument --init_epochs: must be at most'),
    ('kd', ['--kd_mode', 'ft', '--para_epochs', HUGE], 'argument --para_epochs: must be at most'),
    ('kd', ['--kd_mode', 'bss', '--warmup_epochs', HUGE], 'argument --warmup_epochs: must be at most'),
    ('kd', ['--kd_mode', 'crd', '--nce_n', HUGE], 'argument --nce_n: must be at most 2147483647'),
    ('kd', ['--kd_mode', 'crd', '--feat_dim', HUGE], 'argument --feat_dim: must be at most'),
    ('kd', ['--kd_mode', 'crd', '--feat_dim', '1e30'],
     "argument --feat_dim: must be a whole number, got '1e30'"),
    ('kd', ['--kd_mode', 'cc', '--P_order', f'-{HUGE}'], 'argument --P_order: must be at least -2147483647'),
    ('kd', ['--lambda_kd', '1e39'], 'argument --lambda_kd: must be at most 3.4e+38 (a float32)'),
    ('kd', ['--kd_mode', 'rkd', '--w_dist=-1e39'], 'argument --w_dist: must be at least -3.4e+38'),
    ('dml', ['--epochs', HUGE], 'argument --epochs: must be at most 2147483647'),
    ('dml', ['--lambda_kd', '1e39'], 'argument --lambda_kd: must be at most 3.4e+38'),
]


@pytest.mark.parametrize('script, flags, message', TOO_LARGE,
                         ids=[f'{s}{" ".join(f)}'[:60] for s, f, _ in TOO_LARGE])
def test_numbers_too_large_are_refused_before_anything_is_written(
        base_run, tmp_path, capsys, no_run_starts, script, flags, message):
    save_root = tmp_path / 'res'
    main, argv = {'base': (train_base.main, base(base_run['img_root'], save_root)),
                  'kd': (train_kd.main, distill_argv(base_run, save_root, 'kd', 'st')),
                  'dml': (train_dml.main, dml(base_run['img_root'], save_root))}[script]
    fails(main, argv + flags, capsys, message)
    assert not save_root.exists()


def test_a_number_of_thousands_of_digits_is_quoted_short(cifar10_root, tmp_path, capsys, no_run_starts):
    err = fails(train_base.main, base(cifar10_root, tmp_path / 'res', epochs='1' + '0' * 5000), capsys,
                'argument --epochs: must be at most 2147483647', '(5001 characters)')
    assert len(err) < 200


@pytest.mark.parametrize('flags', [['--kd_mode', 'ft', '--k', '1e30'], ['--kd_mode', 'vid', '--sf', '1e30'],
                                   ['--kd_mode', 'afd', '--att_f', '1e30'],
                                   ['--kd_mode', 'cc', '--P_order', '1000']],
                         ids=lambda f: f[-2])
def test_a_factor_or_order_too_large_to_build_is_a_message(base_run, tmp_path, capsys, no_run_starts,
                                                           flags):
    """Within the flags' bounds, but a size computed from them overflows."""
    fails(train_kd.main, distill_argv(base_run, tmp_path / 'res', 'kd', 'st') + flags, capsys,
          f'--kd_mode {flags[1]}: cannot be built with these settings', 'too large')
    assert not (tmp_path / 'res').exists()


# ----------------------------------------------------------------------------- names and paths

@pytest.mark.parametrize('note', ['x' * 300, 'é' * 128], ids=['300-characters', '256-bytes'])
def test_a_note_longer_than_a_file_name_may_be(cifar10_root, tmp_path, capsys, no_run_starts, note):
    fails(train_base.main, base(cifar10_root, tmp_path / 'res', note), capsys,
          'argument --note: must be a folder name of at most 255 bytes')
    assert not (tmp_path / 'res').exists()


def test_a_run_directory_the_file_system_cannot_hold_leaves_nothing(cifar10_root, tmp_path, capsys):
    """A --save_root so deep that the run's path exceeds PATH_MAX: found only
    when the folders are made; the ones made before are removed again."""
    deep = os.path.join(str(tmp_path), *['d' * 200] * 25)
    fails(train_base.main, base(cifar10_root, deep), capsys, 'cannot write the run directory',
          'File name too long')
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('name, folder', [('cifar10', 'cifar-10-batches-py'),
                                          ('cifar100', 'cifar-100-python')])
def test_img_root_given_as_the_dataset_folder_itself(tmp_path, capsys, monkeypatch, name, folder):
    import torchvision

    def download(*a, **k):
        raise AssertionError('a second copy would be downloaded inside the dataset folder')
    monkeypatch.setattr(torchvision.datasets, 'CIFAR10', download)
    monkeypatch.setattr(torchvision.datasets, 'CIFAR100', download)
    data = tmp_path / 'data'
    write_cifar(str(data), name, n_train=100, n_test=40)
    argv = base(str(data / folder), tmp_path / 'res')
    argv[argv.index('cifar10')] = name
    files = sorted(os.listdir(data / folder))
    for flags in (argv, [a for a in argv if a != '--no_download']):
        fails(train_base.main, flags, capsys, f'--img_root {data / folder} is the dataset folder itself',
              f'(--img_root {data})')
    assert not (tmp_path / 'res').exists() and sorted(os.listdir(data / folder)) == files


def test_a_missing_dataset_is_one_line(tmp_path, capsys):
    fails(train_base.main, base(str(tmp_path / 'none'), tmp_path / 'res'), capsys,
          'cifar10 not found', 'Downloading is off (--no_download)', 'unpack the official python archive')
    assert not (tmp_path / 'res').exists() and not (tmp_path / 'none').exists()


# ----------------------------------------------------------------------------- checkpoints

class SystemCall:
    """A pickle payload: unpickling it would run a shell command."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_checkpoint_that_would_run_a_command_is_called_unsafe(base_run, tmp_path, capsys):
    marker = tmp_path / 'ran'
    path = tmp_path / 'evil.pth.tar'
    torch.save({'net': {}, 'payload': SystemCall(f'touch {marker}')}, path)
    argv = distill_argv(base_run, tmp_path / 'res', 'kd', 'st')
    argv[argv.index('--t_model') + 1] = str(path)
    err = fails(train_kd.main, argv, capsys, '--t_model', 'is refused', 'system', 'could run code')
    assert 'truncated' not in err and not marker.exists() and not (tmp_path / 'res').exists()


# ----------------------------------------------------------------------------- resume

@pytest.fixture
def finished_run(cifar10_root, tmp_path):
    train_base.main(base(cifar10_root, tmp_path, 'done'))
    return tmp_path / 'done'


def read_only(monkeypatch, folder):
    """Make `folder` behave as a directory without write permission: no entry
    may be created, removed or renamed in it (its files keep their own
    permissions). The bits alone do not stop root, who runs the tests here."""
    folder = str(folder)

    def inside(path):
        return os.path.abspath(os.fsdecode(path)).startswith(folder)

    def refuse(path):
        raise PermissionError(13, 'Permission denied', os.fsdecode(path))

    def guard(real, *path_args):
        def call(*args, **kwargs):
            for i in path_args:
                if i < len(args) and inside(args[i]):
                    refuse(args[i])
            return real(*args, **kwargs)
        return call
    for name in ('remove', 'unlink', 'rmdir', 'mkdir'):
        monkeypatch.setattr(os, name, guard(getattr(os, name), 0))
    for name in ('replace', 'rename'):
        monkeypatch.setattr(os, name, guard(getattr(os, name), 0, 1))
    real_os_open, real_open = os.open, builtins.open

    def os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & os.O_CREAT and not os.path.exists(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode='r', *args, **kwargs):
        if (isinstance(file, (str, bytes, os.PathLike)) and inside(file) and set(mode) & set('wxa+')
                and not os.path.exists(file)):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)
    monkeypatch.setattr(os, 'open', os_open)
    monkeypatch.setattr(builtins, 'open', open_)


def test_resume_of_a_finished_run_says_so_and_changes_nothing(cifar10_root, tmp_path, capsys, monkeypatch,
                                                             finished_run):
    before = snapshot(finished_run)
    assert {'log.txt', 'metrics.csv', 'args.json', 'complete.json'} <= set(before)
    capsys.readouterr()
    read_only(monkeypatch, finished_run)  # nothing may be written, so a read-only run resumes too
    with pytest.raises(SystemExit) as e:
        train_base.main(base(cifar10_root, tmp_path, 'done', '--resume'))
    monkeypatch.undo()
    out, err = capsys.readouterr()
    assert e.value.code == 0 and err == ''
    assert out.count('\n') == 1 and f'{finished_run} is already complete (1 epoch, finished ' in out
    assert '--overwrite' in out
    assert snapshot(finished_run) == before
    # a new run there (no --resume) is told the run is finished, not to resume it
    fails(train_base.main, base(cifar10_root, tmp_path, 'done'), capsys, 'already holds a finished run',
          '--overwrite')
    # and other flags are still refused first: they are not the run that finished
    fails(train_base.main, base(cifar10_root, tmp_path, 'done', '--resume', epochs=2), capsys,
          '--epochs 2 (was 1)')
    assert snapshot(finished_run) == before


def test_resume_without_a_checkpoint_says_how_to_start_afresh(cifar10_root, tmp_path, capsys):
    fails(train_base.main, base(cifar10_root, tmp_path, 'new', '--resume'), capsys,
          f'--resume: no checkpoint to resume from in {tmp_path / "new"}', 'leave out --resume',
          '--overwrite')
    assert not (tmp_path / 'new').exists()
    stopped = tmp_path / 'stopped'  # killed before its first epoch was saved
    stopped.mkdir()
    (stopped / 'log.txt').write_text('command: python train_base.py ...\n')
    fails(train_base.main, base(cifar10_root, tmp_path, 'stopped', '--resume'), capsys,
          'stopped before its first epoch was saved', 'pass --overwrite instead of --resume',
          'deletes log.txt')
    train_base.main(base(cifar10_root, tmp_path, 'stopped', '--overwrite'))  # the advice works
    assert (stopped / 'complete.json').is_file()


def test_overwrite_in_a_read_only_run_directory_is_a_message(cifar10_root, tmp_path, capsys, monkeypatch,
                                                            finished_run):
    """Found when the old files are deleted (root, or a check that passed):
    a message, and the run's files as they were (run.lock, writable, names
    the process that last held it)."""
    def files():
        return {k: v for k, v in snapshot(finished_run).items() if k != 'run.lock'}
    before = files()
    read_only(monkeypatch, finished_run)
    fails(train_base.main, base(cifar10_root, tmp_path, 'done', '--overwrite'), capsys,
          f'cannot write the run directory {finished_run}', 'Permission denied')
    monkeypatch.undo()
    assert files() == before


def test_a_run_directory_without_write_permission_is_refused_before_anything(
        cifar10_root, tmp_path, capsys, monkeypatch, finished_run):
    before = snapshot(finished_run)
    real_access = os.access
    monkeypatch.setattr(os, 'access', lambda path, mode, **k: False if os.fspath(path) == str(finished_run)
                        else real_access(path, mode, **k))
    fails(train_base.main, base(cifar10_root, tmp_path, 'done', '--overwrite'), capsys,
          f'{finished_run} is not writable')
    assert snapshot(finished_run) == before
