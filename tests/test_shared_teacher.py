"""train_kd.py --kd_mode a,b,...: students sharing one teacher pass end
bitwise where their separate runs end, each in a run directory of its own;
a kill and --resume change nothing; a failing student stops alone; a method
that cannot share is refused before anything is written."""
import json
import os

import pytest
import torch
from torch.utils._pytree import tree_leaves

import records
import train_kd
from conftest import StopRun, metrics_rows
from checkpoints import save_checkpoint, zoo_record
from network import build_network

# Every kind of student at once: logits (st, dkd with its warm-up), features
# (at), a connector (fitnet), random negatives and memory banks (crd), an
# initialisation stage that makes its run one epoch longer (ab), and a student
# that classifies through the teacher's head (simkd).
MODES = ('st', 'at', 'fitnet', 'crd', 'ab', 'dkd', 'simkd')
TINY = ['--nce_n', '16', '--feat_dim', '16', '--init_epochs', '1', '--dkd_warmup', '2',
        '--print_freq', '1']


@pytest.fixture(scope='module')
def pair(tmp_path_factory, cifar10_root):
    """A resnet8 teacher and student start as checkpoint files (different
    random weights: the smallest networks; the teacher need not be trained)."""
    folder = tmp_path_factory.mktemp('resnet8')
    files = {}
    for seed, name in ((1, 'teacher'), (2, 'student')):
        torch.manual_seed(seed)
        files[name] = str(folder / f'{name}.pth.tar')
        save_checkpoint(zoo_record(build_network('resnet8', 10), 0), files[name])
    return {**files, 'img_root': cifar10_root}


def argv(pair, save_root, note, modes, extra=()):
    return ['--data_name', 'cifar10', '--img_root', pair['img_root'], '--save_root', str(save_root),
            '--note', note, '--s_name', 'resnet8', '--t_name', 'resnet8', '--s_init', pair['student'],
            '--t_model', pair['teacher'], '--kd_mode', modes, '--epochs', '1', '--batch_size', '50',
            '--device', 'cpu', '--no_download', *TINY, *extra]


def checkpoint(run_dir):
    return torch.load(os.path.join(run_dir, 'checkpoint.pth.tar'), weights_only=True)


def assert_equal_runs(a_dir, b_dir):
    """The same final student, method state and RNG stream, and the same
    metrics (times aside)."""
    a, b = checkpoint(a_dir), checkpoint(b_dir)
    for key in ('net', 'distiller'):
        assert set(a[key]) == set(b[key])
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f'{b_dir}: {key}.{name} differs'
    assert torch.equal(a['rng']['torch'], b['rng']['torch'])
    assert (a['phase_index'], a['phase_epoch']) == (b['phase_index'], b['phase_epoch'])
    assert metrics_rows(a_dir) == metrics_rows(b_dir)


@pytest.fixture(scope='module')
def separate(pair, tmp_path_factory):
    """Each mode's separate run."""
    root = tmp_path_factory.mktemp('separate')
    for mode in MODES:
        train_kd.main(argv(pair, root, mode, mode))
    return root


@pytest.fixture(scope='module')
def shared(pair, tmp_path_factory):
    root = tmp_path_factory.mktemp('shared')
    train_kd.main(argv(pair, root, 'row', ','.join(MODES)))
    return root / 'row'


def test_each_student_ends_bitwise_as_its_separate_run(separate, shared):
    for mode in MODES:
        assert_equal_runs(separate / mode, shared / mode)
        recorded = json.loads((shared / mode / 'args.json').read_text())['args']
        assert recorded['kd_mode'] == mode
        assert (shared / mode / 'complete.json').is_file()
        log = (shared / mode / 'log.txt').read_text()
        assert f'kd_mode {mode} (' in log and 'done: best test top-1' in log
        assert not any(f'kd_mode {other} (' in log for other in MODES if other != mode)
    ab = metrics_rows(shared / 'ab')
    assert [r['phase'] for r in ab] == ['init', 'main']  # its run outlasts the others by its stage


def test_a_kill_then_resume_ends_as_the_uninterrupted_run(pair, shared, tmp_path, monkeypatch):
    """Stopped right after the third save of the loader's first epoch (st
    finished, at saved, ab's init stage saved, crd not saved yet), then the
    same command with --resume."""
    modes = 'st,at,ab,crd'
    save, saves = records.Checkpointer.__call__, []

    def save_then_stop(self, *a, **k):
        save(self, *a, **k)
        saves.append(self.run.dir)
        if len(saves) == 3:
            raise StopRun
    monkeypatch.setattr(records.Checkpointer, '__call__', save_then_stop)
    with pytest.raises(StopRun):
        train_kd.main(argv(pair, tmp_path, 'row', modes))
    monkeypatch.setattr(records.Checkpointer, '__call__', save)
    row = tmp_path / 'row'
    assert (row / 'st' / 'complete.json').is_file() and not (row / 'crd' / 'checkpoint.pth.tar').exists()
    train_kd.main(argv(pair, tmp_path, 'row', modes, ['--resume']))
    for mode in modes.split(','):
        assert_equal_runs(shared / mode, row / mode)
    assert 'resumed from' in (row / 'ab' / 'log.txt').read_text()


def test_a_failing_student_stops_alone(pair, shared, tmp_path, monkeypatch, capsys):
    """st's loss turns non-finite, crd cannot be built with its --nce_n on this
    data: both stop with their errors in their own log.txt, at goes on to
    its separate run's end, and the process exits non-zero naming both."""
    import kd_losses.st as st
    real_forward = st.SoftTarget.forward
    monkeypatch.setattr(st.SoftTarget, 'forward', lambda self, s, t: real_forward(self, s, t) * float('nan'))
    with pytest.raises(SystemExit) as e:
        train_kd.main(argv(pair, tmp_path, 'row', 'st,at,crd', ['--nce_n', '16384']))
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith('error: 2 of 3 students failed: st (') and 'crd (' in last
    row = tmp_path / 'row'
    assert 'kd loss became non-finite' in (row / 'st' / 'log.txt').read_text()
    assert '--nce_n 16384' in (row / 'crd' / 'log.txt').read_text()
    assert not (row / 'st' / 'complete.json').exists() and not (row / 'crd' / 'checkpoint.pth.tar').exists()
    assert_equal_runs(shared / 'at', row / 'at')


def test_a_mode_that_cannot_share_is_refused_and_nothing_written(pair, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_kd.main(argv(pair, tmp_path, 'row', 'st,lwm'))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'lwm (' in err[0] and 'teacher_grad' in err[0] and 'st (' not in err[0]
    assert not (tmp_path / 'row').exists()


def test_the_registry_says_which_modes_share(capsys):
    from kd_losses.__main__ import main
    main(['--shareable'])
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    shared = lines[0].split()
    assert 'st' in shared and 'crd' in shared and 'lwm' not in shared and 'sobolev' not in shared
    assert any(line.startswith('# not shareable: lwm: ') for line in lines[1:])


def test_a_compiled_teacher_pass_runs_once_per_batch_into_the_same_tensors():
    """--compile inductor (traced here with the eager backend, as the CPU
    affords): the teacher's pass is one traced step, run once per batch, and
    writes its features into the same tensors every batch (what the
    students' captured steps read), equal to an eager forward's."""
    from dataset import Batch
    from shared_teacher import TeacherPass
    from test_capture import CountingBackend
    argv = ['--data_name', 'cifar10', '--kd_mode', 'st', '--t_name', 'resnet8', '--s_name', 'resnet8',
            '--t_model', 'random', '--s_init', 'random', '--device', 'cpu', '--compile', 'inductor']
    args, _, _ = train_kd.parse_args(argv)
    torch.manual_seed(0)
    teacher = train_kd.frozen_teacher(build_network('resnet8', 10), args, 'cpu', load_weights=False)
    backend = CountingBackend()
    teacher_pass = TeacherPass(teacher, args, 'cpu', backend=backend)
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    seen = None
    for _ in range(2):
        batch = Batch(torch.randn(4, 3, 32, 32, generator=g), torch.zeros(4, dtype=torch.long), torch.arange(4))
        teacher_pass.run(batch)
        features = teacher_pass(batch.img)
        leaves = [t.data_ptr() for t in tree_leaves(features)]
        assert seen is None or leaves == seen  # the same tensors, written in place
        seen = leaves
        with torch.no_grad():
            expected = teacher(batch.img)
        for got, want in zip(tree_leaves(features), tree_leaves(expected)):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    assert backend.graphs == 1 and teacher_pass.runner.record() == ('inductor', '')
    torch._dynamo.reset()


def test_students_share_a_teacher_under_torchrun(base_run, tmp_path):
    """Two CPU processes train the shared students as one process does (within
    the rounding tests/test_distributed.py allows)."""
    from conftest import distill_argv
    from test_distributed import BATCH, LR, assert_same, load, run

    def args(note):
        return distill_argv(base_run, tmp_path, note, 'st,crd', 1, BATCH,
                            ['--seed', '4', '--lr', LR, '--nce_n', '16', '--feat_dim', '16'])
    run('train_kd.py', args('one'), 1)
    p = run('train_kd.py', args('two'), 2)
    assert p.stdout.count('2 students share one teacher pass') == 1  # rank 0 alone logs
    for mode in ('st', 'crd'):
        assert_same(str(tmp_path / 'one' / mode), str(tmp_path / 'two' / mode), {'net': load(base_run['initial'])})
