"""The sweep on a SLURM cluster (EXECUTOR=slurm, sweep_slurm.py), without one:
the sbatch scripts the script submits (a stand-in sbatch keeps them) carry the
partition, time limit, GPUs, array throttle, extra options and the KD runs'
dependency on the baselines' array; `sweep.py status` reads the cluster's
states (a stand-in sacct) and the run directories; and through submitit's
LocalExecutor (real job processes and job folders, real tiny training) an
array of runs finishes, KD runs start after their baselines, and a job
interrupted mid-run (SIGUSR2, as SLURM warns before a time limit or a
preemption) is requeued and ends with the same weights as an uninterrupted run."""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

submitit = pytest.importorskip('submitit')

import sweep  # noqa: E402
import sweep_slurm  # noqa: E402
from conftest import assert_same_run  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'example_train_script.sh')

# Stand-ins for the cluster's commands: sbatch keeps each script it is given and
# answers with a job id (1001, 1002, ...); srun only has to exist; sacct answers
# with the states in $FAKE_SACCT.
SBATCH = '''#!/usr/bin/env bash
n=$(( $(ls "$SBATCH_RECORD" | wc -l) + 1001 ))
cp "$1" "$SBATCH_RECORD/$n.sh"
echo "Submitted batch job $n"
'''
SACCT = '''#!/usr/bin/env bash
echo "JobID|State|NodeList"
printf '%s\\n' $FAKE_SACCT
'''


@pytest.fixture
def cluster(tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name, text in (('sbatch', SBATCH), ('srun', '#!/bin/sh\n'), ('sacct', SACCT)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    record = tmp_path / 'submitted'
    record.mkdir()
    return {'PATH': f'{bin_dir}:{os.environ["PATH"]}', 'SBATCH_RECORD': str(record), 'record': record}


def sbatch_lines(path):
    return [line for line in path.read_text().splitlines() if line.startswith('#SBATCH ')]


def test_the_job_scripts_carry_the_settings_and_status_reads_the_cluster(tmp_path, cluster):
    results = tmp_path / 'res'
    env = {**os.environ, 'PATH': cluster['PATH'], 'SBATCH_RECORD': cluster['SBATCH_RECORD'],
           'PYTHON': sys.executable, 'EXECUTOR': 'slurm', 'PARTITION': 'gpu', 'TIME_LIMIT': '1:30:00',
           'GPUS_PER_JOB': '2', 'MAX_JOBS': '1', 'SBATCH_OPTIONS': '--account=lab --exclusive',
           'MODES': 'st at fitnet', 'DATASETS': 'cifar10', 'PAIRS': 'resnet110:resnet20',
           'DML_PAIRS': 'resnet20:resnet20', 'EPOCHS': '3', 'RESULTS': str(results), 'SHARE_TEACHER': '0'}
    p = subprocess.run(['bash', SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert 'submitted 4 runs in 2 jobs: array 1002, after array 1001' in p.stdout
    # the baselines: 2 runs, one job of 2 GPUs x JOBS_PER_GPU=1 (one job: no array)
    first, second = sbatch_lines(cluster['record'] / '1001.sh'), sbatch_lines(cluster['record'] / '1002.sh')
    for lines in (first, second):
        for expected in ('--partition=gpu', '--time=90', '--gpus-per-node=2', '--account=lab', '--exclusive',
                         '--signal=USR2@180'):  # the warning before the time limit, to requeue
            assert f'#SBATCH {expected}' in lines, (expected, lines)
    assert not any('--array' in line or '--dependency' in line for line in first)
    # KD and DML: 4 runs in 2 jobs, an array throttled to MAX_JOBS, after every baseline has ended
    assert '#SBATCH --array=0-1%1' in second and '#SBATCH --dependency=afterany:1001' in second
    jobs = [json.loads(line) for line in (results / 'slurm' / 'jobs.jsonl').read_text().splitlines()]
    assert [j['job_id'] for j in jobs] == ['1001', '1002_0', '1002_1']
    assert [len(j['runs']) for j in jobs] == [2, 2, 2]
    # status: the cluster's states where a run has no verdict of its own
    (results / 'base' / 'base-c10-r20-s2-e3').mkdir(parents=True)
    (results / 'base' / 'base-c10-r20-s2-e3' / 'complete.json').write_text('{}')
    env['FAKE_SACCT'] = '1001|RUNNING|node1 1002_0|PENDING|None 1002_1|FAILED|node2'
    p = subprocess.run([sys.executable, 'sweep.py', 'status', str(results)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == '2 queued, 1 running, 1 done, 2 failed, 0 unfinished (6 runs)'
    state = {line.split()[1]: line.split()[0] for line in lines[1:]}
    assert state[str(results / 'base' / 'base-c10-r20-s2-e3')] == 'done'  # finished, though its job runs
    assert state[str(results / 'base' / 'base-c10-r110-s2-e3')] == 'running'
    assert state[str(results / 'st' / 'st-c10-r110-r20-s2-e3')] == 'queued'
    assert state[str(results / 'dml' / 'dml-c10-r20-r20-s2-e3')] == 'failed'


def test_without_sbatch_it_is_one_line_and_nothing_is_written(tmp_path):
    env = {**os.environ, 'PATH': '/usr/bin:/bin', 'PYTHON': sys.executable, 'EXECUTOR': 'slurm',
           'MODES': 'st', 'DATASETS': 'cifar10', 'PAIRS': 'resnet110:resnet20', 'DML_PAIRS': '',
           'RESULTS': str(tmp_path / 'res')}
    p = subprocess.run(['bash', SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stdout == '', p.stdout + p.stderr
    assert p.stderr.startswith('error: EXECUTOR=slurm: sbatch and srun not found') and \
        len(p.stderr.splitlines()) == 1, p.stderr
    assert not (tmp_path / 'res').exists()


# ----------------------------------------------------------------------------- jobs that run

def train_base(note, save_root, img_root, epochs):
    return (sys.executable, '-u', 'train_base.py', '--data_name', 'cifar10', '--net_name', 'resnet20',
            '--img_root', img_root, '--save_root', save_root, '--note', note, '--epochs', str(epochs),
            '--lr', '0.02', '--batch_size', '25', '--device', 'cpu', '--no_download', '--seed', '3')


def process_of(note):
    """The pid of the running training process of run `note` and its parent's (the job's)."""
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                words = f.read().split(b'\0')
            with open(f'/proc/{pid}/stat') as f:
                parent = int(f.read().rsplit(')', 1)[1].split()[1])
        except OSError:
            continue
        if b'train_base.py' in words and note.encode() in words:
            return int(pid), parent
    return None


def test_an_array_runs_and_a_requeued_job_ends_as_an_uninterrupted_run(tmp_path, cifar10_root, monkeypatch):
    monkeypatch.chdir(ROOT)  # the jobs import the sweep's modules and run the scripts from here
    res = tmp_path / 'res'
    base = str(res / 'base')
    long_run, short_run = res / 'base' / 'long', res / 'base' / 'short'
    steps = [
        sweep.Step('run', str(long_run), (), train_base('long', base, cifar10_root, 2)),
        sweep.Step('run', str(short_run), (), train_base('short', base, cifar10_root, 1)),
        sweep.Step('run', str(res / 'st' / 'st'), (('teacher', str(short_run)), ('student baseline', str(long_run))),
                   (sys.executable, '-u', 'train_kd.py', '--data_name', 'cifar10', '--t_name', 'resnet20',
                    '--s_name', 'resnet20', '--kd_mode', 'st', '--t_model', str(short_run / 'model_best.pth.tar'),
                    '--s_init', str(long_run / 'initial_r20.pth.tar'), '--img_root', cifar10_root,
                    '--save_root', str(res / 'st'), '--note', 'st', '--epochs', '1', '--batch_size', '25',
                    '--device', 'cpu', '--no_download')),
    ]
    settings = sweep.check_settings({'EXECUTOR': 'slurm', 'RESULTS': str(res), 'GPUS_PER_JOB': '0',
                                     'JOBS_PER_GPU': '1', 'PYTHON': sys.executable})
    # the same run, uninterrupted, beside the jobs
    straight = subprocess.Popen(train_base('straight', str(tmp_path / 'straight'), cifar10_root, 2), cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    executor = submitit.LocalExecutor(folder=str(tmp_path / 'jobs' / '%j'))
    executor.update_parameters(timeout_min=10)
    submitted = {}
    thread = threading.Thread(target=lambda: submitted.update(jobs=sweep_slurm.submit(steps, settings, executor)))
    thread.start()
    # interrupt the 2-epoch run's job mid-run, once its first epoch is saved, as SLURM warns a job
    deadline = time.time() + 240
    while time.time() < deadline and not (long_run / 'checkpoint.pth.tar').exists() and thread.is_alive():
        time.sleep(0.05)
    found = process_of('long')
    assert found and not (long_run / 'complete.json').exists(), 'the run ended before it could be interrupted'
    os.kill(found[1], signal.SIGUSR2)
    thread.join(timeout=400)
    jobs = submitted['jobs']
    assert len(jobs) == 3  # two baselines' jobs (an array), then the KD run's
    for job in jobs:
        job.result()  # raises if a job failed
    stdout = jobs[0].stdout()
    assert 'Requeued job' in stdout, stdout
    # the requeued job decided again: the run resumed from its checkpoint
    assert stdout.count('train_base.py') == 2 and '--note long --epochs 2' in stdout
    assert any(line.startswith('[cpu] ') and line.endswith(' --resume') for line in stdout.splitlines()), stdout
    assert all(sweep.finished(s.name) for s in steps)
    # ... and ends as the same run without the interruption
    assert straight.wait(timeout=300) == 0
    assert_same_run(str(long_run), str(tmp_path / 'straight' / 'straight'))
