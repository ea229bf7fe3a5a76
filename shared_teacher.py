"""Several students distilled from one teacher in one process (train_kd.py --kd_mode a,b,...).

Each batch is drawn and augmented once and the teacher runs once on it
(`TeacherPass`); then every student takes its own step with its own
optimiser and method state. Each student is a whole run of its own
(`Student`): its run directory, log.txt, metrics, checkpoints and
complete.json are those its separate run writes, so the summary, the
sweep and --resume treat it like any run.

The results are those of the separate runs, bitwise on the CPU:

- the loader's epoch clock drives every student: the loader's epoch L is
  the L-th epoch of each student's run, whichever phase that is (a student
  with pre-training phases runs longer and goes on after the others
  finish). A resumed student whose checkpoint is ahead of another's sits
  out the loader's epochs it has already done;
- each student has its own random stream: the global RNG state its separate
  run would have (the methods draw from the global generators: CRD's
  negatives, BSS's attack), swapped in around each of its steps and epoch
  ends, and saved in its checkpoint;
- the teacher runs as in a separate run's step (eval mode, no gradient,
  the same precision), so every student reads the features its own step
  would compute.

A student that fails (a non-finite loss, settings its method cannot build)
stops alone, its error in its own log.txt; the others go on, and the
process ends with an error naming it.
"""
import contextlib
import logging
import os
import time

import torch
from torch.utils._pytree import tree_leaves, tree_map

from capture import StepRunner
from errors import UserError
from records import LOG, describe_device, logging_to, run_handlers
from utils import RunTrainer, autocast, check_finite, finish_run, rng_state, set_rng_state, start_run


class TeacherPass:
    """The teacher's forward, once per batch for every student: `run(batch)`
    computes it (a step of its own: captured once under --compile), and
    calling the object, as a student's step calls its teacher, returns those
    features. Run eagerly they are the forward's own tensors; compiled or
    captured, they are copied into tensors kept per batch size, which the
    students' captured steps read."""

    def __init__(self, teacher, args, device, backend='inductor'):
        self.teacher, self.args = teacher, args
        self.runner = StepRunner(self.forward, args.compile, device, backend=backend, log=LOG.info)
        self.persistent = self.runner.mode != 'off'
        self.outputs = {}  # batch size -> the features' persistent tensors
        self.features = None

    def forward(self, batch):
        with torch.no_grad(), autocast(self.args):
            t = self.teacher(batch.img)
        if not self.persistent:
            self.features = t
            return
        for dst, src in zip(tree_leaves(self.features), tree_leaves(t)):
            dst.copy_(src)

    def run(self, batch):
        if self.persistent:
            size = batch.img.shape[0]
            if size not in self.outputs:  # made once per batch size, eagerly, before any capture
                with torch.no_grad(), autocast(self.args):
                    self.outputs[size] = tree_map(torch.clone, self.teacher(batch.img))
            self.features = self.outputs[size]
        self.runner(batch)

    def __call__(self, img):
        return self.features


class Student:
    """One student of a shared run: its mode, flags (`args`, as its separate
    run resolves them, --note its folder <note>/<mode>), run directory,
    log handlers, RNG stream and, once built, its trainer. `error` is set
    when it failed; `finished` once its run is complete."""

    def __init__(self, mode, args, sources, ignored):
        self.mode, self.args, self.sources, self.ignored = mode, args, sources, ignored
        self.handlers = run_handlers(f'[{mode}] ')
        self.run = self.resume = self.trainer = self.checkpointer = self.distiller = None
        self.opened = False
        self.rng = None  # its global RNG state while it is not running
        self.error = self.build_error = None
        self.finished = False

    @contextlib.contextmanager
    def active(self):
        """Within the block LOG writes this student's lines and the global RNG is its stream."""
        with logging_to(self.handlers):
            if self.rng is not None:
                set_rng_state(self.rng)
            try:
                yield
            finally:
                self.rng = rng_state()

    def check(self, check_run, script, argv):
        """Its run directory and resume checkpoint, checked (nothing written).
        With --resume, a finished student is done, and one whose first epoch
        was never saved (a kill came first) starts afresh."""
        args = self.args
        if args.resume:
            args.resume = False  # a look first: is there a checkpoint to resume from?
            args.overwrite = True
            self.run, _ = check_run(args, script, argv)
            if self.run.complete is not None:
                self.finished = True
                LOG.info(f'{self.mode}: {self.run.describe_complete()}')
                return
            has_checkpoint = any(f == 'checkpoint.pth.tar' for f in self.run.existing)
            args.resume, args.overwrite = has_checkpoint, not has_checkpoint
        self.run, self.resume = check_run(args, script, argv)

    def build(self, build):
        """The student's networks and phases (`build(args)`, in its log); a
        UserError (settings its method cannot build) fails it alone, once
        training starts (a refused run writes nothing)."""
        try:
            model, _, self.distiller, self.phases, self.on_fresh_start = build(self.args)
        except UserError as e:
            self.build_error = str(e)
            return
        self.nets, self.state = {'net': model}, {'distiller': self.distiller}

    def start(self, loader, device, teacher_line):
        """Open its run directory and start or restore its run (in its log)."""
        self.opened = True
        self.checkpointer, start = start_run(
            self.run, self.resume, self.phases, self.nets, loader, self.args, device, self.state,
            on_fresh_start=lambda: (self.on_fresh_start(), LOG.info(teacher_line())))
        self.trainer = RunTrainer(self.phases, loader, self.args, self.checkpointer, start,
                                  watched=[*self.nets.values(), *self.state.values()])

    def finish(self):
        """Mark its run complete (complete.json, the final line) and close it."""
        with self.active():
            finish_run(self.run, self.checkpointer, self.args)
        self.finished = True
        self.close()

    def fail(self, message):
        """Stop this student alone: its error on stdout and in its log.txt
        (its run directory opened for it if it was not yet, as a separate
        run's is when it stops), its run directory released."""
        self.error = message
        with logging_to(self.handlers):
            if not self.opened:
                self.opened = True
                try:
                    self.run.open([], describe_device(self.args.device), resumed=self.resume is not None)
                except UserError:  # an unwritable directory: stdout has the error
                    pass
            LOG.info(f'error: {message}')
        self.close()

    def log_files(self):
        return [h for h in self.handlers if isinstance(h, logging.FileHandler)]

    def close(self):
        """Release its run directory and close its log.txt (stdout stays)."""
        if self.run is not None:
            self.run.close()
        for h in self.log_files():
            h.close()
            self.handlers.remove(h)

    @property
    def running(self):
        return self.trainer is not None and self.error is None and not self.finished


def train_students(students, teacher_pass, loader, args, device, teacher_test):
    """Train every student over `loader`, the teacher run once per batch by
    `teacher_pass`; `teacher_test()` is the log line on the teacher's test
    accuracy (computed once, for the students that start afresh). Ends with
    a UserError naming the students that failed, if any."""
    LOG.info(f'{len(students)} students share one teacher pass: '
             f'{", ".join(s.mode for s in students)} (run directories under '
             f'{os.path.dirname(students[0].run.dir)}/)')
    line = []

    def teacher_line():  # evaluated once, logged by every student that starts afresh
        if not line:
            line.append(teacher_test())
        return line[0]

    initial_loader = loader.state_dict()
    try:
        for s in students:
            if s.build_error is not None:
                s.fail(s.build_error)
            elif not s.finished:
                with s.active():
                    s.start(loader, device, teacher_line)
                if s.trainer.finished:  # killed after its last checkpoint, before complete.json
                    s.finish()
        # the loader resumes at the least advanced student; those ahead sit out until it catches up
        behind = [s for s in students if s.running]
        clock = min((s.trainer.done for s in behind), default=0)
        loader.load_state_dict(next((s.resume['loader'] for s in behind
                                     if s.trainer.done == clock and s.resume is not None), initial_loader))
        while any(s.running for s in students):
            members = [s for s in students if s.running and s.trainer.done == clock]
            if members:
                train_shared_epoch(members, teacher_pass, loader, args)
            else:  # every running student has done this epoch already: the loader passes over it
                for _ in loader:
                    pass
            clock += 1
    except BaseException:
        # the whole process stops (interrupted, a torchrun peer lost): errors.cli
        # writes its last line in each student's open log.txt, as in a separate run's
        for s in students:
            if s.opened and s.error is None and not s.finished:
                LOG.handlers.extend(s.log_files())
                s.run.close()
        raise
    failed = [s for s in students if s.error is not None]
    done = [s.mode for s in students if s.finished]
    LOG.info(f'finished: {", ".join(done) or "none"}' +
             (f'; failed: {", ".join(s.mode for s in failed)}' if failed else ''))
    if failed:
        raise UserError(f'{len(failed)} of {len(students)} students failed: ' +
                        '; '.join(f'{s.mode} ({s.error})' for s in failed) +
                        ('; the others finished' if len(failed) < len(students) else ''))


def train_shared_epoch(members, teacher_pass, loader, args):
    """One loader epoch for the `members` (the students at that epoch of
    their runs): each batch through the teacher once (if a member's step of
    this epoch reads it), then through each member's step with its RNG
    stream; every --print_freq steps and at the end each member's losses
    are checked (a non-finite one fails that member alone); then each
    member's epoch end (evaluation, log line, metrics row, checkpoint)."""
    runners = {}
    for s in members:
        with s.active():
            runners[s.mode] = s.trainer.begin_epoch()
    uses_teacher = any(getattr(s.trainer.phase.step, 'uses_teacher', True) for s in members)
    start = time.time()
    for i, batch in enumerate(loader, start=1):
        if uses_teacher:
            teacher_pass.run(batch)
        for s in members:
            if s.error is not None:
                continue
            swap_torch_rng(s.rng)
            runners[s.mode](batch)
            save_torch_rng(s.rng)
        if i % args.print_freq == 0 or i == len(loader):
            for s in members:
                if s.error is None:
                    progress(s, i, len(loader), start)
    seconds = time.time() - start
    for s in members:
        if s.error is not None:
            continue
        with s.active():
            train = s.trainer.phase.stats.values()
            train['seconds'], train['img_per_s'] = seconds, train['n'] / max(seconds, 1e-9)
            try:
                s.trainer.end_epoch(train)
            except UserError as e:  # a non-finite test loss or weights: this student stops
                error = str(e)
            else:
                error = None
        if error is not None:
            s.fail(error)
        elif s.trainer.finished:
            s.finish()


def progress(s, i, n, start):
    """A member's check after step `i` of `n`: a non-finite loss fails it; a log line but at the end."""
    with s.active():
        try:
            check_finite(s.trainer.phase.stats, s.trainer.header, s.checkpointer)
        except UserError as e:
            error = str(e)
        else:
            error = None
            if i != n:
                v = s.trainer.phase.stats.values()
                text = '  '.join(f'{k} {v[k]:.4f}' for k in v if k != 'n')
                LOG.info(f'{s.trainer.header} [{i}/{n}] {text}  '
                         f'{v["n"] / max(time.time() - start, 1e-9):.0f} img/s')
    if error is not None:
        s.fail(error)


def swap_torch_rng(state):
    """The torch generators (CPU, CUDA) set to a student's stream before its step
    (its steps draw from these alone; Python's and numpy's wait for its epoch end)."""
    torch.set_rng_state(state['torch'])
    if 'cuda' in state:
        torch.cuda.set_rng_state_all(state['cuda'])


def save_torch_rng(state):
    state['torch'] = torch.get_rng_state()
    if 'cuda' in state:
        state['cuda'] = torch.cuda.get_rng_state_all()
