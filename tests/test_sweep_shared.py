"""The sweep's shared runs (SHARE_TEACHER=1, the default): the KD runs of one
dataset, pair and seed go to one train_kd.py process (--kd_mode a,b,...), up to
STUDENTS_PER_RUN students each; modes that cannot share run alone; a shared
sweep killed and rerun ends with the summary of an unshared one."""
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'example_train_script.sh')


def script(env, check=True):
    p = subprocess.run(['bash', SCRIPT], env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=900)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def kd_commands(env):
    out = script({'DRY_RUN': '1', 'DATASETS': 'cifar10', 'PAIRS': 'resnet110:resnet20', 'DML_PAIRS': '',
                  **env}).stdout
    commands = [shlex.split(line) for line in out.splitlines() if 'train_kd.py' in line]
    return [(c[c.index('--kd_mode') + 1], c[c.index('--save_root') + 1], c[c.index('--note') + 1])
            for c in commands]


def test_the_modes_of_a_pair_share_one_process_and_the_others_run_alone(tmp_path):
    res = str(tmp_path / 'res')
    shareable = sweep.code_registries().shareable
    assert 'lwm' not in shareable and 'st' in shareable  # lwm differentiates through the teacher
    assert kd_commands({'RESULTS': res, 'MODES': 'st lwm at crd'}) == [
        ('lwm', f'{res}/lwm', 'lwm-c10-r110-r20-s2'),
        ('st,at,crd', f'{res}/shared', 'kd-c10-r110-r20-s2')]
    # at most STUDENTS_PER_RUN students a process, named by their first mode; one left alone runs alone
    assert kd_commands({'RESULTS': res, 'MODES': 'st at crd fitnet ab', 'STUDENTS_PER_RUN': '2'}) == [
        ('st,at', f'{res}/shared', 'kd-c10-r110-r20-s2-st'),
        ('crd,fitnet', f'{res}/shared', 'kd-c10-r110-r20-s2-crd'),
        ('ab', f'{res}/ab', 'ab-c10-r110-r20-s2')]
    # SHARE_TEACHER=0: one process per run, as the runs' own folders
    assert kd_commands({'RESULTS': res, 'MODES': 'st at', 'SHARE_TEACHER': '0'}) == [
        ('st', f'{res}/st', 'st-c10-r110-r20-s2'), ('at', f'{res}/at', 'at-c10-r110-r20-s2')]
    # one mode: its own run, as without sharing (the README's quick start)
    assert kd_commands({'RESULTS': res, 'MODES': 'st'}) == [('st', f'{res}/st', 'st-c10-r110-r20-s2')]


@pytest.mark.parametrize('env, message', [
    ({'STUDENTS_PER_RUN': '0'}, 'STUDENTS_PER_RUN'),
    ({'STUDENTS_PER_RUN': 'some'}, 'STUDENTS_PER_RUN'),
    ({'SHARE_TEACHER': 'maybe'}, 'SHARE_TEACHER'),
])
def test_bad_sharing_settings_are_one_line(env, message):
    with pytest.raises(sweep.UserError, match=message):
        sweep.check_settings(env)


def test_a_shared_step_is_done_when_each_student_is_and_resumes_once_one_began(tmp_path):
    group = tmp_path / 'shared' / 'kd-x'
    line = (f"run {group} --student {group}/st --student {group}/at --needs teacher {tmp_path}/t "
            f"-- python train_kd.py --kd_mode st,at")
    step = sweep.read_plan(line + '\nend\n')[0]
    assert step.students == (f'{group}/st', f'{group}/at') and step.needs == (('teacher', f'{tmp_path}/t'),)
    assert not step.done and step.restart_flags == ()
    (group / 'st').mkdir(parents=True)
    (group / 'st' / 'complete.json').write_text('{}')
    assert not step.done and step.restart_flags == ('--resume',)  # at starts afresh, st stays done
    (group / 'at').mkdir()
    (group / 'at' / 'complete.json').write_text('{}')
    assert step.done


def summary_rows(results):
    """The KD rows of the summary's CSV: (mode, numbers) with the run's place left out."""
    import csv
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'summarize.py'), results],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    with open(os.path.join(results, 'summary.csv')) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3  # the baseline, st and at
    return sorted(tuple((k, v) for k, v in r.items() if k != 'runs') for r in rows)


def test_a_shared_sweep_killed_and_rerun_summarises_as_an_unshared_one(cifar10_root, tmp_path):
    env = {'DATA_ROOT': cifar10_root, 'DATASETS': 'cifar10', 'PAIRS': 'resnet20:resnet20', 'DML_PAIRS': '',
           'MODES': 'st at', 'EPOCHS': '3', 'PYTHON': sys.executable,
           'EXTRA_ARGS': '--device cpu --no_download --batch_size 50'}
    shared, alone = str(tmp_path / 'shared'), str(tmp_path / 'alone')
    students = [os.path.join(shared, 'shared', 'kd-c10-r20-r20-s2-e3', mode) for mode in ('st', 'at')]
    # killed (TERM: the sweep stops its runs) once the shared process has a first epoch checkpointed
    sweep_process = subprocess.Popen(['bash', SCRIPT], env={**os.environ, **env, 'RESULTS': shared},
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_epoch = os.path.join(students[1], 'checkpoint.pth.tar')
    deadline = time.time() + 600
    while time.time() < deadline and sweep_process.poll() is None and not os.path.isfile(first_epoch):
        time.sleep(0.05)
    sweep_process.send_signal(signal.SIGTERM)
    out, err = sweep_process.communicate(timeout=120)
    assert '--kd_mode st,at' in out, out + err  # the baseline, then one KD process for both students
    stopped_early = not all(os.path.isfile(os.path.join(d, 'complete.json')) for d in students)
    rerun = [shlex.split(line) for line in script({**env, 'RESULTS': shared, 'DRY_RUN': '1'}).stdout.splitlines()
             if 'train_kd.py' in line]
    if stopped_early:  # (a fast machine may have finished first: then the rerun has nothing to do)
        assert len(rerun) == 1 and rerun[0][rerun[0].index('--kd_mode') + 1] == 'st,at' and '--resume' in rerun[0]
    script({**env, 'RESULTS': shared})
    assert all(os.path.isfile(os.path.join(d, 'complete.json')) for d in students)
    script({**env, 'RESULTS': alone, 'SHARE_TEACHER': '0'})
    assert summary_rows(shared) == summary_rows(alone)
