"""The sweep's local executor: the table's runs on this machine, a pool of
JOBS_PER_GPU runs at once on each GPU of GPUS (a run on the CPU takes a place
in the pool too, so GPUS x JOBS_PER_GPU is the number of runs at once).

A step starts, in the table's order, once a place is free and the steps it
needs have ended: a run whose baselines did not finish, or whose teacher
failed its check, is not started (reported; the others go on). A finished run
is skipped, one with a checkpoint resumed, one stopped before its first
checkpoint started again (sweep.restart_flag). Each run is its own process
group writing RESULTS/logs/<run>.out, announced as `[gpu N] command` or
`[cpu] command`, and followed, when it ends, by a progress line (done, failed,
remaining, elapsed, estimated time left); the sweep ends with a table of what
ran. Its failures are appended to RESULTS/logs/failed.txt, one dated block per
sweep, and listed on stderr (exit 1). SIGINT or SIGTERM stops every run it
started (TERM, then KILL after 10 s) and ends it with 128 + the signal.

`Pool` is also what runs a group of runs inside one SLURM job (sweep_slurm.py),
there without the history and the signal handling, which are the sweep's.
"""
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Optional

import sweep

STOP_GRACE_S = 10  # after TERM, a run's process group gets this long to save and leave before KILL
POLL_S = 0.2


def say(text='', file=None):
    print(text, file=file or sys.stdout, flush=True)


def clock(seconds):
    return str(timedelta(seconds=int(round(seconds))))


@dataclass
class Running:
    step: sweep.Step
    process: subprocess.Popen
    started: float
    log: str
    where: str


@dataclass
class Outcome:
    label: str
    result: str             # finished, failed (exit N), not started, stopped, done before
    seconds: Optional[float]
    where: str


class Pool:
    """Runs `steps` (sweep.Step) on `gpus` x `jobs_per_gpu` places; `cuda_count`
    decides where a command without --device goes. `failures` collects one line
    per run that failed, was not started or was stopped; `outcomes` one entry
    per step for the final table."""

    def __init__(self, steps, gpus, jobs_per_gpu, cuda_count, logs_dir, interrupted=lambda: None):
        self.steps = steps
        self.places = [gpus[i % len(gpus)] for i in range(len(gpus) * jobs_per_gpu)]
        self.cuda_count = cuda_count
        self.logs_dir = logs_dir
        self.running = {}                 # place -> Running
        self.ended = {}                   # step name -> True when it succeeded
        self.reasons = {}                 # check name -> its error line
        self.failures = []
        self.outcomes = []
        self.planned = {s.name: s for s in steps if s.kind != 'note'}
        self.started_at = time.time()
        self.durations = []
        self.stopping = False             # set by stop(): nothing more starts
        self.interrupted = interrupted    # the signal the sweep was asked to stop by, or None

    # ------------------------------------------------------------------ the loop
    def run(self):
        queue = list(self.steps)
        while (queue or self.running) and not self.stopping:
            queue = self.start_what_can(queue)
            if self.running:
                self.wait_for_one()
            elif queue and not self.stopping:  # nothing runs and nothing can start: steps that need each other
                names = ', '.join(s.label for s in queue)
                raise sweep.UserError(f'the table has steps that wait for each other: {names}')

    def start_what_can(self, queue):
        waiting = []
        for step in queue:
            self.check_interrupted()
            if self.stopping:
                return []
            if step.kind == 'note':
                say(step.name)
                continue
            if step.kind == 'run' and step.done:
                say(f'# done, skipped: {step.name}')
                self.ended[step.name] = True
                self.outcomes.append(Outcome(step.label, 'done before', None, '-'))
                continue
            needs = self.needs_state(step)
            if needs == 'wait':
                waiting.append(step)
                continue
            if needs is not None:
                self.not_started(step, needs)
                continue
            place = self.free_place()
            if place is None:
                waiting.append(step)
                continue
            self.launch(step, place)
        return waiting

    def needs_state(self, step):
        """'wait' while a step it needs runs or waits; else None when all it needs
        succeeded, or the reason it cannot start."""
        if any(name in self.planned and name not in self.ended for _, name in step.needs):
            return 'wait'
        for role, name in step.needs:
            if name in self.planned and self.planned[name].kind == 'check':
                if not self.ended[name]:
                    return f'{role} did not pass its check: {self.reasons.get(name) or "see its log"}'
            elif not sweep.finished(name):
                return f'{role} {name} is not finished'
        return None

    def free_place(self):
        return next((i for i in range(len(self.places)) if i not in self.running), None)

    def launch(self, step, place):
        command = list(step.command) + list(step.restart_flags if step.kind == 'run' else ())
        env = dict(os.environ)
        if sweep.runs_on_gpu(command, self.cuda_count):
            env['CUDA_VISIBLE_DEVICES'] = self.places[place]
            where = f'gpu {self.places[place]}'
        else:
            where = 'cpu'
        say(f'[{where}] {" ".join(command)}')
        os.makedirs(self.logs_dir, exist_ok=True)
        log = os.path.join(self.logs_dir, f'{step.label}.out')
        with open(log, 'w') as out:
            # its own process group (session): stopping it stops what it started too
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=env, start_new_session=True)
        self.running[place] = Running(step, process, time.time(), log, where)

    def wait_for_one(self):
        while True:
            self.check_interrupted()
            if self.stopping:
                return
            for place, run in list(self.running.items()):
                code = run.process.poll()
                if code is not None:
                    del self.running[place]
                    self.ended_with(run, code)
                    return
            time.sleep(POLL_S)

    def check_interrupted(self):
        signum = self.interrupted()
        if signum is not None:
            raise Stop(signum)

    # ------------------------------------------------------------------ what happened
    def ended_with(self, run, code):
        seconds = time.time() - run.started
        self.durations.append(seconds)
        self.ended[run.step.name] = code == 0
        if code == 0:
            result = 'finished'
        else:
            result = f'failed (exit {code})'
            reason = sweep.last_error_line(run.log)
            self.reasons[run.step.name] = reason
            self.failures.append(f'{run.step.label} (exit {code}): {run.log}{": " + reason if reason else ""}')
        self.outcomes.append(Outcome(run.step.label, result, seconds, run.where))
        self.progress(run.step.label, result)

    def not_started(self, step, why):
        say(f'# not started: {step.name}: {why}')
        self.ended[step.name] = False
        self.reasons[step.name] = f'{step.label} was not started'
        self.failures.append(f'not started: {step.name}: {why}')
        self.outcomes.append(Outcome(step.label, 'not started', None, '-'))

    def progress(self, label, result):
        launched = [o for o in self.outcomes if o.seconds is not None]
        done = sum(o.result == 'finished' for o in launched)
        failed = len(launched) - done
        not_started = sum(o.result == 'not started' for o in self.outcomes)
        remaining = len(self.planned) - len(self.ended)
        elapsed = time.time() - self.started_at
        mean = sum(self.durations) / len(self.durations)
        left = mean * remaining / len(self.places)  # the runs still to end, as long as the ended ones
        say(f'progress: {label} {result}; {done} done, {failed} failed, {not_started} not started, '
            f'{remaining} remaining; {clock(elapsed)} elapsed, about {clock(left)} left')

    def stop(self):
        """TERM every running step's process group, KILL what is left once its leader
        has ended, or after STOP_GRACE_S."""
        self.stopping = True
        runs = list(self.running.values())
        self.running.clear()
        for run in runs:
            self.failures.append(f'stopped: {run.step.name} (the sweep was interrupted; a rerun continues it)')
            self.outcomes.append(Outcome(run.step.label, 'stopped', time.time() - run.started, run.where))
            signal_group(run.process, signal.SIGTERM)
        # each run's leader (the training script) saves nothing more and leaves; then whatever
        # is left of its group goes (a zombie of the group could not be waited for: none is)
        deadline = time.time() + STOP_GRACE_S
        while time.time() < deadline and any(run.process.poll() is None for run in runs):
            time.sleep(0.1)
        for run in runs:
            signal_group(run.process, signal.SIGKILL)
            run.process.wait()

    def table(self):
        """What ran: one line per step, with its result, time and place."""
        if not self.outcomes:
            return []
        width = max(len(o.label) for o in self.outcomes)
        lines = [f'{"run":<{width}}  {"result":<16}  {"time":>8}  on']
        for o in self.outcomes:
            seconds = clock(o.seconds) if o.seconds is not None else '-'
            lines.append(f'{o.label:<{width}}  {o.result:<16}  {seconds:>8}  {o.where}')
        return lines


def signal_group(process, signum):
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------- the sweep on this machine

class Stop(Exception):
    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequests:
    """SIGINT and SIGTERM, noted by the handler and acted on by the loops (where
    the runs started so far are all known, so stop() finds every one)."""

    def __init__(self):
        self.signum = None

    def __call__(self):
        return self.signum

    def handle(self, signum, frame):
        self.signum = self.signum or signum


def run_sweep(steps, settings):
    """Run the table `steps` with the resolved `settings`; returns the exit code."""
    results = settings['RESULTS']
    logs = os.path.join(results, 'logs')
    os.makedirs(logs, exist_ok=True)
    started = datetime.now()
    gpus = sweep.words(settings['GPUS'])
    requests = StopRequests()
    pool = Pool(steps, gpus, int(settings['JOBS_PER_GPU']), sweep.cuda_device_count(), logs, requests)
    interrupted, code = None, 0
    previous = {s: signal.signal(s, requests.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = check_data(settings, requests)
        if code == 0:
            pool.run()
    except Stop as stop:
        interrupted, code = stop.signum, 128 + stop.signum
        say(f'sweep interrupted ({stop}): stopping its runs', file=sys.stderr)
    finally:
        pool.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if pool.failures and code == 0:
        code = 1
    write_history(os.path.join(logs, 'failed.txt'), started, code, settings, interrupted, pool.failures)
    if pool.outcomes:
        say('what ran:')
        for line in pool.table():
            say(f'  {line}')
    if pool.failures:
        say(f'{len(pool.failures)} runs of this sweep failed, were not started or were stopped '
            f'(history: {os.path.join(logs, "failed.txt")}):', file=sys.stderr)
        for line in pool.failures:
            say(line, file=sys.stderr)
    elif code == 0:
        say(f'all runs done; summary: {settings["PYTHON"]} summarize.py {results}')
    return code


def check_data(settings, interrupted):
    """The data, checked (and fetched if missing) once, before runs read it in parallel."""
    datasets = sweep.words(settings['DATASETS'])
    if not datasets or not sweep.words(settings['SEEDS']):
        return 0
    fetch = ['--no_download'] if '--no_download' in sweep.words(settings['EXTRA_ARGS']) else []
    try:
        process = subprocess.Popen([settings['PYTHON'], 'dataset.py', settings['DATA_ROOT'], *datasets, *fetch],
                                   start_new_session=True)
    except OSError as e:
        raise sweep.UserError(f"PYTHON: '{settings['PYTHON']}' cannot be run ({e.strerror})") from None
    while process.poll() is None:
        if interrupted() is not None:
            signal_group(process, signal.SIGTERM)
            process.wait()
            raise Stop(interrupted())
        time.sleep(POLL_S)
    return process.returncode


def write_history(path, started, code, settings, interrupted, failures):
    ended = datetime.now().strftime('%Y-%m-%d %H:%M:%S')
    what = f'{len(failures)} runs failed, not started or stopped' if failures else 'no run failed'
    by = f' interrupted by {signal.Signals(interrupted).name},' if interrupted else ''
    with open(path, 'a') as f:
        f.write(f'=== sweep started {started.strftime("%Y-%m-%d %H:%M:%S")}, ended {ended}, exit {code} '
                f'(TABLE={settings["TABLE"]} EPOCHS={settings["EPOCHS"]}):{by} {what}\n')
        for line in failures:
            f.write(line + '\n')
