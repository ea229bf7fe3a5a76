"""The sweep's SLURM executor, through submitit, and `sweep.py status`.

EXECUTOR=slurm submits the table as job arrays: first one of the steps that
need nothing (the baselines; with TEACHERS, the teachers' checks), then one
of the KD and DML runs, which depends on the first (`--dependency=afterany:`
the first array: each job starts once every baseline has ended, and a run
whose baseline did not finish is not started, as on this machine). Each job
holds GPUS_PER_JOB x JOBS_PER_GPU steps and runs them as the local executor
does (sweep_local.Pool, on the GPUs SLURM gave it), deciding at its start
what is finished, resumed or started again. A job that reaches its time
limit or is preempted gets SIGUSR2 first (submitit's --signal): it stops its
runs (their last checkpoint stays), is requeued, and its runs continue with
--resume, exactly as resume does. Finished runs are not submitted. Every
array is written to RESULTS/slurm/jobs.jsonl, which `status` reads.

    python sweep.py status RESULTS    # queued / running / done / failed, run by run

`status` lists every run directory under RESULTS (done: complete.json;
failed: its log ends with `error: ...`; unfinished otherwise) and, where a
submitted job holds the run and the cluster (sacct) knows it, queued or
running from the job's state.
"""
import json
import os
import shutil
import time

import submitit

import sweep
import sweep_local

FOLDER = 'slurm'           # RESULTS/slurm: submitit's job files, and jobs.jsonl
SIGNAL_DELAY_S = 180       # the warning before the time limit: time to stop, save nothing more, requeue


class Job(submitit.helpers.Checkpointable):
    """One array task: its steps, run by a sweep_local.Pool on the job's GPUs.
    Raises (the job fails) when one of its runs failed or could not start."""

    def __init__(self, steps, jobs_per_gpu, logs_dir):
        self.steps = steps
        self.jobs_per_gpu = jobs_per_gpu
        self.logs_dir = logs_dir
        self.pool = None

    def __call__(self):
        gpus = [g for g in os.environ.get('CUDA_VISIBLE_DEVICES', '').split(',') if g] or ['0']
        self.pool = sweep_local.Pool(self.steps, gpus, self.jobs_per_gpu, sweep.cuda_device_count(),
                                     self.logs_dir)
        self.pool.run()
        for line in self.pool.table():
            sweep_local.say(line)
        if self.pool.failures:
            raise RuntimeError('; '.join(self.pool.failures))
        return [o.label for o in self.pool.outcomes]

    def checkpoint(self):
        """Called on SIGUSR2 (time limit or preemption): stop the runs, requeue this job."""
        if self.pool is not None:
            self.pool.stop()
        self.pool = None  # a pool holds processes: the requeued job starts a new one
        return submitit.helpers.DelayedSubmission(self)


def groups(steps, size):
    """`steps` in jobs of `size` (the table's order kept)."""
    return [steps[i:i + size] for i in range(0, len(steps), size)]


def phases(steps):
    """The steps to submit (finished runs and notes left out), as (first, second):
    those that need nothing, then those that need one of them or anything else."""
    todo = [s for s in steps if s.kind != 'note' and not (s.kind == 'run' and s.done)]
    first = [s for s in todo if not s.needs]
    return first, [s for s in todo if s.needs]


def with_their_checks(group, checks):
    """A job of the second array also runs (again: their result is cached) the checks its runs
    need, which ran in the first array: each job decides for itself."""
    needed = [checks[name] for s in group for _, name in s.needs if name in checks]
    return list({s.name: s for s in needed}.values()) + group


def job_size(settings):
    return int(settings['JOBS_PER_GPU']) * max(1, int(settings['GPUS_PER_JOB']))


def make_executor(settings):
    """A submitit SlurmExecutor with the settings' partition, time, GPUs, throttle and options."""
    missing = [tool for tool in ('sbatch', 'srun') if shutil.which(tool) is None]
    if missing:
        raise sweep.UserError(f'EXECUTOR=slurm: {" and ".join(missing)} not found: submit from a machine of the '
                              f'SLURM cluster (a login node), or use EXECUTOR=local')
    executor = submitit.SlurmExecutor(folder=os.path.join(settings['RESULTS'], FOLDER, '%j'))
    parameters = dict(job_name=f'kdzoo-{settings["TABLE"]}', time=int(settings['TIME_LIMIT']),
                      array_parallelism=int(settings['MAX_JOBS']), signal_delay_s=SIGNAL_DELAY_S,
                      additional_parameters=sweep.sbatch_options(settings['SBATCH_OPTIONS']))
    if settings['PARTITION']:
        parameters['partition'] = settings['PARTITION']
    if int(settings['GPUS_PER_JOB']):
        parameters['gpus_per_node'] = int(settings['GPUS_PER_JOB'])
    executor.update_parameters(**parameters)
    return executor


def submit_array(executor, jobs):
    if not jobs:
        return []
    with executor.batch():
        submitted = [executor.submit(job) for job in jobs]
    return submitted


def array_id(job):
    return str(job.job_id).split('_')[0]


def record(results, submitted, jobs):
    path = os.path.join(results, FOLDER, 'jobs.jsonl')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'a') as f:
        for job, callable_ in zip(submitted, jobs):
            f.write(json.dumps({'job_id': str(job.job_id), 'folder': str(job.paths.folder),
                                'runs': [d for s in callable_.steps for d in (s.students or (s.name,))], 'submitted': time.time()}) + '\n')


def submit(steps, settings, executor=None):
    """Submit the table; returns the submitted jobs. `executor`: another submitit executor (a LocalExecutor in the
    tests), which has no dependencies: the second array is submitted once the first ended."""
    on_slurm = executor is None
    executor = executor or make_executor(settings)
    for step in steps:
        if step.kind == 'note':
            sweep_local.say(step.name)
        elif step.kind == 'run' and step.done:
            sweep_local.say(f'# done, skipped: {step.name}')
    logs = os.path.join(settings['RESULTS'], 'logs')
    size = job_size(settings)
    first, second = phases(steps)
    checks = {s.name: s for s in first if s.kind == 'check'}
    first_jobs = [Job(g, int(settings['JOBS_PER_GPU']), logs) for g in groups(first, size)]
    second_jobs = [Job(with_their_checks(g, checks), int(settings['JOBS_PER_GPU']), logs)
                   for g in groups(second, size)]
    submitted = submit_array(executor, first_jobs)
    record(settings['RESULTS'], submitted, first_jobs)
    if submitted:
        sweep_local.say(f'submitted {len(first)} runs without prerequisites in {len(first_jobs)} jobs: '
                        f'array {array_id(submitted[0])}')
    if second_jobs:
        after = ''
        if submitted and on_slurm:
            after = array_id(submitted[0])
            executor.update_parameters(dependency=f'afterany:{after}')
        elif submitted:
            for job in submitted:
                job.wait()
        later = submit_array(executor, second_jobs)
        record(settings['RESULTS'], later, second_jobs)
        sweep_local.say(f'submitted {len(second)} runs in {len(second_jobs)} jobs: array {array_id(later[0])}'
                        + (f', after array {after}' if after else ''))
    else:
        later = []
    if not submitted and not second_jobs:
        sweep_local.say('all runs done; nothing to submit')
    sweep_local.say(f'follow them: {settings["PYTHON"]} sweep.py status {settings["RESULTS"]}')
    return submitted + later


def describe(steps, settings):
    """A dry run's account of what EXECUTOR=slurm would submit."""
    first, second = phases(steps)
    size = job_size(settings)
    print(f'# slurm: {len(first)} runs in {len(groups(first, size))} jobs, then {len(second)} runs in '
          f'{len(groups(second, size))} jobs after them; {size} runs per job, at most {settings["MAX_JOBS"]} '
          f'jobs of an array at once')


# ----------------------------------------------------------------------------- status

def run_directories(results):
    """Every run directory under RESULTS/<kind>/ (one with args.json, log.txt or a checkpoint)."""
    found = []
    for kind in sorted(os.listdir(results)) if os.path.isdir(results) else []:
        if kind in ('logs', FOLDER) or not os.path.isdir(os.path.join(results, kind)):
            continue
        for name in sorted(os.listdir(os.path.join(results, kind))):
            path = os.path.join(results, kind, name)
            if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f)) for f in
                                           ('args.json', 'log.txt', 'checkpoint.pth.tar', 'complete.json')):
                found.append(path)
    return found


def cluster_states(results):
    """{run directory: (job id, SLURM state)} for the runs of submitted jobs, newest job last."""
    path = os.path.join(results, FOLDER, 'jobs.jsonl')
    if not os.path.isfile(path):
        return {}
    states = {}
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    for entry in records:
        try:
            state = submitit.SlurmJob(folder=entry['folder'], job_id=entry['job_id']).state
        except Exception as e:  # no sacct here, or the cluster forgot the job
            state = f'UNKNOWN ({type(e).__name__})'
        for run in entry['runs']:
            states[os.path.normpath(run)] = (entry['job_id'], state)
    return states


QUEUED = ('PENDING', 'REQUEUED', 'CONFIGURING', 'REQUEUE_HOLD', 'REQUEUE_FED', 'SUSPENDED', 'RESV_DEL_HOLD')
RUNNING = ('RUNNING', 'COMPLETING', 'STAGE_OUT', 'SIGNALING', 'RESIZING')
ENDED_BADLY = ('FAILED', 'CANCELLED', 'TIMEOUT', 'OUT_OF_MEMORY', 'NODE_FAIL', 'BOOT_FAIL', 'DEADLINE')


def run_state(run_dir, job_state):
    if sweep.finished(run_dir):
        return 'done'
    state = (job_state or '').split(' ')[0]
    if state in QUEUED:
        return 'queued'
    if state in RUNNING:
        return 'running'
    if state in ENDED_BADLY:
        return 'failed'
    return 'failed' if last_line(os.path.join(run_dir, 'log.txt')).startswith('error: ') else 'unfinished'


def last_line(path):
    """The last line of a run's log (a failed run's is its `error: ...`), or ''."""
    try:
        with open(path, errors='replace') as f:
            lines = f.read().rstrip().splitlines()
    except OSError:
        return ''
    return lines[-1] if lines else ''


def status_lines(results):
    if not os.path.isdir(results):
        raise sweep.UserError(f"{results} is not a directory (a sweep's RESULTS)")
    jobs = cluster_states(results)
    runs = sorted(set(map(os.path.normpath, run_directories(results))) | set(jobs))
    rows = []
    for run in runs:
        job_id, job_state = jobs.get(run, ('', ''))
        state = run_state(run, job_state)
        rows.append((state, run, f'job {job_id}: {job_state}' if job_id else ''))
    counts = {s: sum(r[0] == s for r in rows) for s in ('queued', 'running', 'done', 'failed', 'unfinished')}
    lines = [', '.join(f'{n} {s}' for s, n in counts.items()) + f' ({len(rows)} runs)']
    lines += [f'{state:<10}  {run}' + (f'  ({job})' if job else '') for state, run, job in rows]
    return lines
