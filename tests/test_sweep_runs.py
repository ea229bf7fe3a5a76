"""The sweep script's checks and bookkeeping, with a stand-in for the training
scripts (a fake PYTHON that records each run it is asked for and finishes,
fails or hangs as told), so no network trains here: bad settings, and
variables that look like misspelt ones, are refused before anything starts; a
dry run (DRY_RUN=1, yes or true) starts nothing; failures are kept as a dated history; a KD or DML run
whose baseline did not finish is not started; stopping the sweep stops its
runs; each run says whether it goes to a GPU or the CPU."""
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from checkpoints import initial_weights_name
from kd_losses import METHODS
from kd_losses.__main__ import main as kd_losses_main
from network import NETWORKS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'example_train_script.sh')

# Runs train_*.py as a stand-in: it logs "pid note CUDA_VISIBLE_DEVICES" to
# $FAKE_LOG, sleeps $FAKE_SLEEP seconds if set, then fails (notes in $FAKE_FAIL, with an `error:` line as the
# scripts write it), hangs with a child process (FAKE_HANG=1), or writes
# complete.json (and logs the note to $FAKE_LOG.ended). dataset.py passes; anything else is the real interpreter, where
# `sweep.py run` sees $FAKE_CUDA CUDA devices when it is set.
FAKE_PYTHON = r'''#!/usr/bin/env bash
[ "${1-}" = dataset.py ] && exit 0
case ${2-} in
    train_base.py|train_kd.py|train_dml.py) ;;
    *) if [ -n "${FAKE_CUDA-}" ] && [ "${1-}" = sweep.py ] && [ "${2-}" = run ]; then
           exec "$REAL_PYTHON" -c 'import sys, sweep
sweep.cuda_device_count = lambda: int(sys.argv[1])
sweep.main(["run"])' "$FAKE_CUDA"
       fi
       exec "$REAL_PYTHON" "$@" ;;
esac
while [ $# -gt 0 ]; do
    case $1 in --save_root) root=$2; shift ;; --note) note=$2; shift ;; esac
    shift
done
mkdir -p "$root/$note"
echo "$$ $note ${CUDA_VISIBLE_DEVICES-unset}" >> "$FAKE_LOG"
[ -z "${FAKE_SLEEP-}" ] || sleep "$FAKE_SLEEP"
case " ${FAKE_FAIL-} " in
    *" $note "*) echo "error: planted failure of $note" | tee -a "$root/$note/log.txt"; exit 2 ;;
esac
if [ -n "${FAKE_HANG-}" ]; then
    sleep 300 &
    echo "$!" >> "$FAKE_LOG.children"
    wait
fi
echo '{}' > "$root/$note/complete.json"
echo "$note" >> "$FAKE_LOG.ended"
'''


@pytest.fixture
def fake(tmp_path):
    path = tmp_path / 'python'
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    log = tmp_path / 'runs.log'
    env = {**os.environ, 'PYTHON': str(path), 'REAL_PYTHON': sys.executable, 'FAKE_LOG': str(log),
           'RESULTS': str(tmp_path / 'res'), 'DATA_ROOT': str(tmp_path / 'data'), 'DATASETS': 'cifar10',
           'PAIRS': 'resnet110:resnet20', 'DML_PAIRS': 'resnet110:resnet20', 'MODES': 'st at',
           'EPOCHS': '3', 'EXTRA_ARGS': '--no_download', 'SHARE_TEACHER': '0'}
    env.pop('FAKE_FAIL', None)

    def started():
        """(pid, note, CUDA_VISIBLE_DEVICES) of each run the fake was asked for."""
        return [tuple(line.split(' ')) for line in log.read_text().splitlines()] if log.exists() else []

    return {'env': env, 'started': started, 'results': tmp_path / 'res', 'log': log}


def sweep(env, **extra):
    return subprocess.run(['bash', SCRIPT], env={**env, **extra}, capture_output=True, text=True,
                          timeout=300)


# ----------------------------------------------------------------------------- checks before anything starts

BAD_SETTINGS = [  # (setting, value, what the one-line message must name)
    ('DATASETS', 'cifar1O', ["'cifar1O'", 'cifar10 cifar100']),
    ('MODES', 'st atx', ["'atx'", ' '.join(sorted(METHODS))]),
    ('PAIRS', 'resnet110:resnet21', ["'resnet21'", ' '.join(NETWORKS)]),
    ('DML_PAIRS', 'vgg:resnet20', ["'vgg'", ' '.join(NETWORKS)]),
    ('PAIRS', 'resnet110-resnet20', ["'resnet110-resnet20'", 'TEACHER:STUDENT']),
    ('DML_PAIRS', 'a:b:c', ["'a:b:c'", 'NET1:NET2']),
    ('EPOCHS', '3O', ["'3O'", 'whole number']),
    ('SEEDS', '1 two', ["'two'", 'whole number']),
    ('JOBS_PER_GPU', 'x', ["'x'", 'whole number']),
    ('JOBS_PER_GPU', '0', ["'0'", 'whole number >= 1']),
    ('MODES', 'st at st', ["'st' twice"]),
    ('DATASETS', 'cifar10 cifar10', ["'cifar10' twice"]),
    ('PAIRS', 'resnet110:resnet20 resnet110:resnet20', ["'resnet110:resnet20' twice"]),
    ('DML_PAIRS', 'resnet20:resnet20 resnet20:resnet20', ["'resnet20:resnet20' twice"]),
    ('SEEDS', '1 2 01', ["'1' twice"]),
    ('TABLE', 'crd2', ["crd2", 'seed crd']),
    ('DRY_RUN', 'maybe', ["'maybe'", '0/1/no/yes/false/true']),
    ('EXECUTOR', 'pbs', ["'pbs'", 'local slurm']),
    ('SCHEDULES', 'own', ["'own'", 'table authors']),
    ('SCHEDULES', 'authors', ['TABLE=crd', 'TABLE is seed']),  # the per-pair lengths are the benchmark's
    ('PARTITION', 'gpu', ['EXECUTOR=slurm', 'unset PARTITION']),  # given for the local executor: a mistake
    ('TEACHERS', '/no/such/folder', ["'/no/such/folder' is not a directory"]),
    # a variable that looks like a misspelt setting (test_sweep_settings.py has more): the sweep
    # would otherwise run the default table
    ('MODE', 'st', ['is not a setting of the sweep', 'did you mean MODES?']),
    ('EPOCH', '2', ['did you mean EPOCHS?']),
    ('modes', 'st', ['did you mean MODES?']),
    ('DMLPAIRS', '', ['did you mean DML_PAIRS?']),
]


@pytest.mark.parametrize('name, value, named', BAD_SETTINGS, ids=[f'{n}={v}' for n, v, _ in BAD_SETTINGS])
def test_a_bad_setting_is_one_line_and_nothing_starts(fake, name, value, named):
    p = sweep(fake['env'], **{name: value})
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stdout == '' and len(p.stderr.splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f'error: {name}'), p.stderr
    for text in named:
        assert text in p.stderr, (text, p.stderr)
    assert fake['started']() == [] and not fake['results'].exists()  # nothing run, nothing written


@pytest.mark.parametrize('name, value', [('MODES', 'st atx'), ('EPOCHS', 'abc'), ('MODES', 'st st')])
def test_a_dry_run_checks_too(fake, name, value):
    p = sweep(fake['env'], DRY_RUN='1', **{name: value})
    assert p.returncode == 2 and p.stdout == '' and p.stderr.startswith(f'error: {name}'), p.stderr


def test_dry_run_takes_yes_and_no_words_and_a_dry_run_starts_nothing(fake):
    for value in ('true', 'yes', 'TRUE'):
        p = sweep(fake['env'], DRY_RUN=value)
        assert p.returncode == 0, p.stderr
        assert [line.split(' ')[2] for line in p.stdout.splitlines()] == \
            ['train_base.py'] * 2 + ['train_kd.py'] * 2 + ['train_dml.py'], p.stdout  # the commands
        assert fake['started']() == [] and not fake['results'].exists(), value  # nothing run, nothing written
    p = sweep(fake['env'], DRY_RUN='no')  # means what it says: the sweep runs
    assert p.returncode == 0 and len(fake['started']()) == 5, p.stdout + p.stderr


def test_the_default_modes_are_the_registry_and_names_follow_the_code(fake, capsys):
    kd_losses_main(['--names'])  # what `python -m kd_losses --names` prints
    names = capsys.readouterr().out.split()
    assert names == sorted(METHODS)
    env = {k: v for k, v in fake['env'].items() if k != 'MODES'}
    # every network as a student once: its initial weights are named as train_base.py names them
    nets = list(NETWORKS)
    out = sweep(env, DRY_RUN='1', PAIRS=' '.join(f'resnet20:{n}' for n in nets), DML_PAIRS='',
                SEEDS='3').stdout
    cmds = [shlex.split(line) for line in out.splitlines() if 'train_kd.py' in line]
    assert [c[c.index('--kd_mode') + 1] for c in cmds] == names * len(nets)
    for c in cmds:
        student, s_init = c[c.index('--s_name') + 1], c[c.index('--s_init') + 1]
        assert os.path.basename(s_init) == initial_weights_name(student)
        assert c[c.index('--note') + 1].endswith('-s3-e3')


# ----------------------------------------------------------------------------- failures and their history

def test_failures_are_kept_and_unfinished_teachers_teach_nobody(fake):
    env = {**fake['env'], 'FAKE_FAIL': 'base-c10-r110-s2-e3'}
    p = sweep(env)
    assert p.returncode == 1, p.stdout + p.stderr
    notes = [n for _, n, _ in fake['started']()]
    # the resnet110 baseline failed: no KD or DML run starts from it; the others went on
    assert sorted(notes) == ['base-c10-r110-s2-e3', 'base-c10-r20-s2-e3']
    for run in ('st/st-c10-r110-r20-s2-e3', 'at/at-c10-r110-r20-s2-e3', 'dml/dml-c10-r110-r20-s2-e3'):
        line = f"# not started: {fake['results'] / run}: "
        assert line in p.stdout, p.stdout
    assert f"teacher {fake['results'] / 'base' / 'base-c10-r110-s2-e3'} is not finished" in p.stdout
    assert 'net1 baseline' in p.stdout
    # this sweep's failures at the end, with the run's own error line
    err = p.stderr.splitlines()
    assert err[0].startswith('4 runs of this sweep failed, were not started or were stopped')
    assert any('base-c10-r110-s2-e3 (exit 2)' in e and 'error: planted failure' in e for e in err)
    failed_txt = fake['results'] / 'logs' / 'failed.txt'
    first = failed_txt.read_text()
    assert first.startswith('=== sweep started ') and 'exit 1' in first.splitlines()[0]
    # a second sweep succeeds: the history keeps the first one's failures
    p = sweep(fake['env'])
    assert p.returncode == 0, p.stdout + p.stderr
    assert '# done, skipped: ' in p.stdout and 'all runs done' in p.stdout
    history = failed_txt.read_text()
    assert history.startswith(first)
    assert history[len(first):].startswith('=== sweep started ') and history.rstrip().endswith('no run failed')
    assert history.count('=== sweep started ') == 2


# ----------------------------------------------------------------------------- stopping the sweep

def still_running(pid):
    """Whether process `pid` exists and is not a zombie (an ended process that
    nothing has reaped yet: where PID 1 does not reap, one stays listed)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_stopping_the_sweep_stops_its_runs(fake, sig):
    env = {**fake['env'], 'FAKE_HANG': '1', 'JOBS_PER_GPU': '2'}
    proc = subprocess.Popen(['bash', SCRIPT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    children = fake['log'].with_name('runs.log.children')
    deadline = time.time() + 60
    while time.time() < deadline and not (children.exists() and len(children.read_text().split()) == 2):
        time.sleep(0.1)
    runs = fake['started']()
    assert len(runs) == 2, runs  # both baselines hang, each with a child process
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    pids = [int(pid) for pid, _, _ in runs] + [int(pid) for pid in children.read_text().split()]
    deadline = time.time() + 10  # a loaded machine may take a moment to end them
    while time.time() < deadline and any(map(still_running, pids)):
        time.sleep(0.1)
    assert [pid for pid in pids if still_running(pid)] == [], 'the sweep left runs behind'
    assert 'stopping its runs' in err
    history = (fake['results'] / 'logs' / 'failed.txt').read_text()
    assert f'interrupted by SIG{sig.name[3:]}' in history and history.count('stopped: ') == 2


# ----------------------------------------------------------------------------- where a run goes

def test_the_progress_line_says_gpu_or_cpu(fake):
    env = {**fake['env'], 'MODES': 'st', 'DML_PAIRS': '', 'FAKE_CUDA': '2'}
    out = sweep(env, GPUS='0 1', JOBS_PER_GPU='1').stdout
    lines = [line for line in out.splitlines() if line.startswith('[')]
    assert len(lines) == 3 and all(line.startswith(('[gpu 0] ', '[gpu 1] ')) for line in lines), out
    assert {gpu for _, _, gpu in fake['started']()} <= {'0', '1'}
    fake['log'].unlink()
    out = sweep(env, RESULTS=str(fake['results']) + '-cpu', GPUS='0 1',
                EXTRA_ARGS='--no_download --device cpu').stdout
    lines = [line for line in out.splitlines() if line.startswith('[')]
    assert len(lines) == 3 and all(line.startswith('[cpu] ') for line in lines), out
    assert {gpu for _, _, gpu in fake['started']()} == {'unset'}  # no GPU set aside for a CPU run


# ----------------------------------------------------------------------------- the scheduler's decisions

def test_kd_runs_wait_for_their_baselines_and_progress_is_reported(fake):
    """With places to spare, a KD or DML run still starts only once both its
    baselines have ended; each ended run gets a progress line, the sweep a table."""
    env = {**fake['env'], 'JOBS_PER_GPU': '4', 'FAKE_SLEEP': '1'}
    p = sweep(env)
    assert p.returncode == 0, p.stdout + p.stderr
    started = [note for _, note, _ in fake['started']()]
    ended = fake['log'].with_name('runs.log.ended').read_text().split()
    assert sorted(started[:2]) == ['base-c10-r110-s2-e3', 'base-c10-r20-s2-e3']
    assert sorted(ended[:2]) == sorted(started[:2])  # both baselines ended before any run that needs them
    progress = [line for line in p.stdout.splitlines() if line.startswith('progress: ')]
    assert len(progress) == 5 and progress[-1].split('; ')[1] == '5 done, 0 failed, 0 not started, 0 remaining'
    assert ' elapsed, about ' in progress[0] and progress[-1].endswith('about 0:00:00 left')
    table = p.stdout.split('what ran:\n', 1)[1].splitlines()
    assert table[0].split() == ['run', 'result', 'time', 'on']
    assert sorted(line.split()[0] for line in table[1:6]) == sorted(started)
    assert all(line.split()[1] == 'finished' for line in table[1:6])


def test_a_sweep_killed_and_run_again_finishes_what_it_stopped(fake):
    env = {**fake['env'], 'MODES': 'st', 'DML_PAIRS': '', 'JOBS_PER_GPU': '2'}
    proc = subprocess.Popen(['bash', SCRIPT], env={**env, 'FAKE_HANG': '1'}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(fake['started']()) < 2:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    # the stopped baselines left directories without a checkpoint: started again, then the KD run
    p = sweep(env)
    assert p.returncode == 0, p.stdout + p.stderr
    launched = [line for line in p.stdout.splitlines() if line.startswith('[')]
    assert len(launched) == 3 and all(line.endswith(' --overwrite') for line in launched[:2]), p.stdout
    assert not launched[2].endswith(('--overwrite', '--resume')) and 'train_kd.py' in launched[2]
    history = (fake['results'] / 'logs' / 'failed.txt').read_text()
    assert history.count('=== sweep started ') == 2 and history.rstrip().endswith('no run failed')


# ----------------------------------------------------------------------------- released teachers

@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, 'teachers.py')), reason='needs teachers.py')
def test_released_teachers_are_checked_once_and_teach_without_baselines(fake, tmp_path):
    """TEACHERS=DIR: no teacher baseline is trained; each teacher is checked once
    (`teachers.py verify`, for real) before its KD runs, which get its file as
    --t_model; one that fails its check stops only its own runs, with its error."""
    import torch

    from conftest import write_cifar
    from network import build_network
    write_cifar(str(tmp_path / 'data'), 'cifar100', n_train=100, n_test=40)
    teachers = tmp_path / 'teachers'
    for net in ('resnet20', 'resnet56'):  # RepDistiller's layout, the released files' keys
        (teachers / f'{net}_vanilla').mkdir(parents=True)
        torch.save({'epoch': 240, 'model': build_network(net, 100).state_dict(), 'accuracy': 0.0},
                   teachers / f'{net}_vanilla' / 'ckpt_epoch_240.pth')
    # resnet20 has no published teacher accuracy: it passes; untrained resnet56 is far below its own
    env = {**fake['env'], 'TEACHERS': str(teachers), 'DATASETS': 'cifar100', 'DATA_ROOT': str(tmp_path / 'data'),
           'PAIRS': 'resnet20:resnet20 resnet56:resnet20', 'DML_PAIRS': '', 'MODES': 'st at',
           'EXTRA_ARGS': '--no_download --device cpu', 'JOBS_PER_GPU': '2'}
    dry = sweep(env, DRY_RUN='1')
    assert dry.returncode == 0, dry.stderr
    cmds = [shlex.split(line) for line in dry.stdout.splitlines()]
    assert [c[2] for c in cmds] == ['train_base.py', 'verify', 'verify'] + ['train_kd.py'] * 4
    assert [c[c.index('--net_name') + 1] for c in cmds[:1]] == ['resnet20']  # students only
    assert sorted(c[4] for c in cmds[1:3]) == ['resnet20', 'resnet56']  # python teachers.py verify DIR NET
    for c in cmds[3:]:
        t = c[c.index('--t_name') + 1]
        assert c[c.index('--t_model') + 1] == str(teachers / f'{t}_vanilla' / 'ckpt_epoch_240.pth')
    p = sweep(env)
    assert p.returncode == 1, p.stdout + p.stderr
    started = sorted(note for _, note, _ in fake['started']())
    assert started == ['at-c100-r20-r20-s2-e3', 'base-c100-r20-s2-e3', 'st-c100-r20-r20-s2-e3']
    for mode in ('st', 'at'):
        line = next(x for x in p.stdout.splitlines() if x.startswith(f"# not started: {fake['results']}/{mode}/"))
        assert f'{mode}-c100-r56-r20-s2-e3: teacher did not pass its check: error: teacher ' in line
        assert 'below its published' in line
    assert p.stderr.startswith('3 runs of this sweep failed')  # resnet56's check and its two runs
