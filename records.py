"""The run directory `<save_root>/<note>/` and what a run writes there.

log.txt (human-readable), metrics.csv (one row per epoch), args.json (every
resolved flag, the command, versions), the checkpoints, in an order that
makes a kill at any moment resumable (`Checkpointer`); and which recorded
flags define a run's result (`RESULT_NEUTRAL_FLAGS` are those that do not).
A file that is rewritten is replaced atomically (`write_text_atomically`),
and a metrics row is appended in one write flushed to disk
(`append_line_durably`), so a kill at any instant leaves every file whole but
possibly metrics.csv's last row, which a resume leaves out (`without_cut_row`).
"""
import contextlib
import csv
import fcntl
import fnmatch
import io
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

from checkpoints import save_checkpoint, strip_prefixes, zoo_record, zoo_state_dict
from distributed import WORLD
from errors import UserError

# Flags that do not change a result: --resume may change them, and runs that
# differ only in these and the seed are replicates of one experiment.
RESULT_NEUTRAL_FLAGS = frozenset({
    'note', 'save_root', 'img_root', 'device', 'cuda', 'resume', 'overwrite',
    'print_freq', 'no_progress', 'eval_batch_size', 'no_download', 's_init', 't_model',
    'net1_init', 'net2_init', 'tensorboard', 'deterministic'})

# Result-changing flags added after runs had been saved, with the value every
# run saved before them trained with: --resume compares a checkpoint that lacks
# one against this value (so `--optimizer dot` cannot resume an SGD run).
FLAGS_ADDED_SINCE = {'optimizer': 'sgd', 'dot_delta': None}


class _Buffer(logging.Handler):
    """Keeps records until the run directory exists, so log.txt starts at the first line."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


def _make_logger():
    log = logging.getLogger('kdzoo')
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


LOG = _make_logger()


def reset_logger(buffer=True):
    """Log to stdout, buffering lines for log.txt until `Run.open` (only rank 0
    logs); without `buffer`, to stdout alone (a process whose runs have
    handlers of their own: `logging_to`)."""
    for h in list(LOG.handlers):
        LOG.removeHandler(h)
        h.close()
    for h in run_handlers():
        if buffer or not isinstance(h, _Buffer):
            LOG.addHandler(h)
    return LOG


def run_handlers(prefix=''):
    """The handlers of one run's lines: stdout (each line after `prefix`) and
    the buffer that keeps them for its log.txt until `Run.open` (rank 0 only)."""
    if not WORLD.main:
        return [logging.NullHandler()]
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter(prefix.replace('%', '%%') + '%(message)s'))
    return [out, _Buffer()]


@contextlib.contextmanager
def logging_to(handlers):
    """Within the block LOG writes to `handlers` alone: one run's (from
    `run_handlers`), where several runs share a process, so that each
    log.txt holds its own run's lines. `Run.open` swaps the buffer for the
    log file within that same list."""
    saved = LOG.handlers
    LOG.handlers = handlers
    try:
        yield
    finally:
        LOG.handlers = saved


# What a run writes in its directory (--overwrite removes exactly these).
RUN_FILES = ('checkpoint.pth.tar', 'model_best.pth.tar', 'log.txt', 'metrics.csv', 'args.json',
             'complete.json', 'run.lock', 'initial.pth.tar')
RUN_FILE_PATTERNS = ('model_best_*.pth.tar', 'initial_*.pth.tar', '*.tmp', 'args.resume.json')
LOCK_FILE, COMPLETE_FILE = 'run.lock', 'complete.json'


def command_line(script, argv):
    return ' '.join(shlex.quote(a) for a in ['python', script] + list(argv))


def json_args(args):
    """The resolved flags as plain JSON values (what args.json and checkpoints record)."""
    return json.loads(json.dumps(vars(args), default=str))


class Run:
    """The run directory `<save_root>/<note>/` and what is written to it:
    log.txt (human-readable), metrics.csv (one row per epoch), args.json, the
    checkpoints and, once the last epoch's files are saved, complete.json.

    Constructing it only checks (nothing is written): a new run refuses an
    existing run directory unless --overwrite; --resume needs a readable
    checkpoint and metrics.csv there; the directory must be writable, except
    for --resume of a finished run (`complete`), which writes nothing.
    `open()` locks the directory (a second process writing the same run
    stops with a message naming the holder), then creates it and starts
    log.txt; a failure there is a UserError that leaves no folder it made."""

    metrics_cut_row = None  # metrics.csv's last line if cut off mid-write (see read_metrics)

    def __init__(self, args, script, argv=()):
        self.args, self.script, self.argv = args, script, list(argv)
        self.columns, self.tensorboard, self._lock = None, None, None
        # What args.json records beside the flags, by key (e.g. the teacher file's
        # identity and sha256): set before `open`, or added later with `record`.
        self.records = {}
        self.dir = os.path.join(args.save_root, args.note)
        self.ckpt_path = os.path.join(self.dir, 'checkpoint.pth.tar')
        self.metrics_path = os.path.join(self.dir, 'metrics.csv')
        if os.path.exists(self.dir) and not os.path.isdir(self.dir):
            raise UserError(f'{self.dir} is a file, not a run directory')
        for name in ('log.txt', 'metrics.csv', 'args.json', 'checkpoint.pth.tar'):
            path = os.path.join(self.dir, name)
            if os.path.exists(path) and not os.path.isfile(path):
                raise UserError(f'{path} is not a regular file (a directory?): remove it first')
        self.existing = self.run_files()
        self.metrics_rows = None
        self.complete = self.read_complete()
        shown = ', '.join(f for f in self.existing if f != LOCK_FILE)
        if args.resume:
            if not os.path.isfile(self.ckpt_path):
                if not shown:
                    raise UserError(f'--resume: no checkpoint to resume from in {self.dir} (no run '
                                    f'there yet); to start the run afresh, leave out --resume (no '
                                    f'--overwrite needed)')
                raise UserError(f'--resume: no checkpoint to resume from in {self.dir} (the run '
                                f'stopped before its first epoch was saved); to start it afresh, pass '
                                f'--overwrite instead of --resume (this deletes {shown})')
            self.metrics_rows = self.read_metrics()
        elif shown and not args.overwrite:
            if self.complete is not None:
                raise UserError(f'{self.dir} already holds a finished run ({shown}); pass --overwrite '
                                f'to train it again (deleting those files) or choose another --note')
            raise UserError(f'{self.dir} already holds a run ({shown}); '
                            f'pass --resume to continue it or --overwrite to start over')
        if not (args.resume and self.complete is not None):  # a finished run resumed writes nothing
            problem = self.unwritable()
            if problem:
                raise UserError(problem)

    def read_complete(self):
        """complete.json's record ({} if unreadable) when the run is finished, else None."""
        path = os.path.join(self.dir, COMPLETE_FILE)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                record = json.load(f)
            return record if isinstance(record, dict) else {}
        except (OSError, ValueError):
            return {}

    def describe_complete(self):
        """What --resume of a finished run says (it changes nothing)."""
        record = self.complete or {}
        epochs = record.get('epochs')
        done = [f'{epochs} epoch{"" if epochs == 1 else "s"}' if epochs is not None else '',
                f'finished {record["finished"]}' if 'finished' in record else '']
        done = ', '.join(d for d in done if d)
        return (f'{self.dir} is already complete{f" ({done})" if done else ""}: nothing to resume, '
                f'nothing changed; to train it again, start over with --overwrite or choose another '
                f'--note')

    def unwritable(self):
        """Why this run could not write its directory (the folder, or a file in
        it that a run opens for writing), or None; checked before anything is
        written. A folder not made yet is --save_root's check (flags.py)."""
        if not os.path.isdir(self.dir):
            return None
        if not os.access(self.dir, os.W_OK | os.X_OK):
            return f'{self.dir} is not writable: check its permissions, or choose another --save_root'
        appended = (LOCK_FILE,) if self.args.overwrite else (LOCK_FILE, 'log.txt', 'metrics.csv')
        for name in appended:  # (--overwrite deletes the others first)
            path = os.path.join(self.dir, name)
            if os.path.isfile(path) and not os.access(path, os.W_OK):
                return f'{path} is not writable: check its permissions'
        return None

    def run_files(self):
        """The files of this run directory that the project wrote."""
        if not os.path.isdir(self.dir):
            return []
        names = os.listdir(self.dir)
        return sorted(f for f in names if f in RUN_FILES or f == 'tensorboard'
                      or any(fnmatch.fnmatch(f, p) for p in RUN_FILE_PATTERNS))

    def read_metrics(self):
        """metrics.csv's rows as dicts, checked enough to resume from (a UserError
        otherwise). A last row cut off mid-line (the run was killed while
        appending it, before that epoch's checkpoint) is left out and kept in
        `metrics_cut_row`: the resumed run writes that epoch again."""
        try:
            with open(self.metrics_path, newline='') as f:
                text, self.metrics_cut_row = without_cut_row(f.read())
            reader = csv.DictReader(io.StringIO(text, newline=''))
            rows = list(reader)
            for line, r in enumerate(rows, start=2):
                # Every row but the last is covered by the checkpoint, so it must be
                # whole; the last may be one appended after it (start_metrics drops it).
                damaged = None in r or None in r.values()  # fields beyond the header's, or lacking
                if damaged and line <= len(rows):
                    fields = sum(v is not None for k, v in r.items() if k is not None) + len(r.get(None, ()))
                    raise ValueError(f'line {line} has {fields} fields, the header {len(reader.fieldnames)}')
                int(r['phase_index']), int(r['epoch'])
            return rows
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError, csv.Error) as e:
            raise UserError(f'{self.metrics_path} is malformed ({type(e).__name__}: {e}); restore '
                            f'it, or start the run over with --overwrite') from None

    def open(self, columns, device_name, resumed):
        """Lock and create the run directory (clearing an --overwrite'n run),
        start log.txt, write args.json. A fresh run's log.txt starts with the
        lines logged so far; a resumed one gets a 'resumed' line instead of a
        second header. metrics.csv will have `columns`."""
        self.columns = list(columns)
        if not WORLD.main:  # rank 0 writes the run directory
            return self
        made = self.folders_to_make()
        try:
            os.makedirs(self.dir, exist_ok=True)
            self.lock()
            if self.args.overwrite:
                for name in self.run_files():
                    path = os.path.join(self.dir, name)
                    if name == LOCK_FILE:
                        continue
                    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            self.unmark_complete()
            fh = logging.FileHandler(os.path.join(self.dir, 'log.txt'))
        except OSError as e:  # read-only, a name too long, disk full: found only when writing
            self.close()
            self.remove_made(made)
            where = f'{e.filename}: ' if e.filename and os.fspath(e.filename) != self.dir else ''
            raise UserError(f'cannot write the run directory {self.dir} ({where}{e.strerror or e}); '
                            f'check its permissions and free space, or choose another --save_root') from None
        fh.setFormatter(logging.Formatter('%(message)s'))
        command = command_line(self.script, self.argv)
        for h in list(LOG.handlers):
            if isinstance(h, _Buffer):
                if resumed:
                    fh.emit(logging.makeLogRecord({'msg': f'=== resumed {time.strftime("%Y-%m-%d %H:%M:%S")}: '
                                                          f'{command}', 'levelno': logging.INFO}))
                else:
                    fh.emit(logging.makeLogRecord({'msg': f'command: {command}', 'levelno': logging.INFO}))
                    for record in h.records:
                        fh.emit(record)
                LOG.removeHandler(h)
        LOG.addHandler(fh)
        if self.args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(self.dir, 'tensorboard'))
        self.write_args(device_name, resumed)
        return self

    def folders_to_make(self):
        """The folders `open` creates (the run directory and any missing
        parents), deepest first."""
        made, path = [], os.path.abspath(self.dir)
        while not os.path.exists(path):
            made.append(path)
            path = os.path.dirname(path)
        return made

    def remove_made(self, made):
        """Undo a failed `open` in the folders it created (`made`): its own
        files, then each folder that is empty (another run may have started
        in a new --save_root meanwhile; its files stay)."""
        for folder in made[:1]:
            for name in (LOCK_FILE, 'log.txt'):
                try:
                    os.remove(os.path.join(folder, name))
                except OSError:
                    pass
        for folder in made:
            if not os.path.isdir(folder):  # never made (the failure came first)
                continue
            try:
                os.rmdir(folder)
            except OSError:  # not empty: someone else's now
                break

    def lock(self):
        """Hold run.lock for as long as this process writes the run (the
        kernel releases it when the process ends, however it ends)."""
        fd = os.open(os.path.join(self.dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 1000).decode(errors='replace').strip() or 'another process'
            os.close(fd)
            raise UserError(f'{self.dir} is being written by {holder}; stop that run first '
                            f'(two processes must not write one run)') from None
        os.ftruncate(fd, 0)
        os.write(fd, f'pid {os.getpid()} on {platform.node()} since '
                     f'{time.strftime("%Y-%m-%d %H:%M:%S")}: {command_line(self.script, self.argv)}'.encode())
        self._lock = fd

    def close(self):
        """Release the lock (the end of the run, however it ends; log.txt stays
        open for the error line `errors.cli` may add, and is closed there)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    # -- records
    def write_args(self, device_name, resumed):
        """args.json: every resolved flag, the command, versions, device and
        `records`; a resume adds itself to its 'resumes' list (args.json is
        rewritten if it was lost)."""
        path = os.path.join(self.dir, 'args.json')
        now = time.strftime('%Y-%m-%d %H:%M:%S')
        command = command_line(self.script, self.argv)
        record = None
        if resumed:
            try:
                with open(path) as f:
                    record = json.load(f)
                record.setdefault('resumes', []).append({'command': command, 'started': now,
                                                         'device': device_name})
            except (OSError, ValueError, AttributeError):
                record = None
        if record is None:
            record = {'script': self.script, 'command': command, 'args': json_args(self.args),
                      'device': device_name, 'processes': WORLD.size,
                      'versions': {'python': platform.python_version(), 'torch': torch.__version__,
                                   'numpy': np.__version__, **_optional_versions()},
                      'git_commit': _git_commit(), 'started': now, **self.records}
        write_text_atomically(path, json.dumps(record, indent=2, default=str))

    def record(self, key, value):
        """Add `key: value` to args.json (rewritten atomically), e.g. the
        sha256 of a file the run wrote after args.json was first written."""
        self.records[key] = value
        if not WORLD.main:
            return
        path = os.path.join(self.dir, 'args.json')
        with open(path) as f:
            saved = json.load(f)
        saved[key] = value
        write_text_atomically(path, json.dumps(saved, indent=2, default=str))

    def check_resume_args(self, saved):
        """Refuse to resume with flags that would change the result (`saved`:
        the flags the checkpoint was written with; a flag the zoo gained since
        counts as the value such a run trained with, FLAGS_ADDED_SINCE)."""
        now = json_args(self.args)
        saved = {**{k: v for k, v in FLAGS_ADDED_SINCE.items() if k in now}, **saved}
        diff = [k for k in now if k in saved and k not in RESULT_NEUTRAL_FLAGS and saved[k] != now[k]]
        if diff:
            raise UserError('--resume with flags that differ from the run being resumed: ' +
                            ', '.join(f'--{k} {now[k]} (was {saved[k]})' for k in diff) +
                            '; rerun with the original flags, or start over with --overwrite')

    def start_metrics(self, keep_upto=None):
        """Create metrics.csv; on resume keep the rows up to `keep_upto`
        ((phase index, epoch) of the checkpoint), so no row is duplicated.
        The file is replaced atomically: a kill at any instant leaves the
        previous history or the new one, never a partial file."""
        if not WORLD.main:
            return
        rows = []
        if keep_upto is not None:
            kept = [r for r in self.metrics_rows or []
                    if (int(r['phase_index']), int(r['epoch'])) <= tuple(keep_upto)]
            if any(None in r or None in r.values() for r in kept):
                raise UserError(f'{self.metrics_path} is malformed (its last row, which the checkpoint '
                                f'covers, has more or fewer fields than the header); restore it, or '
                                f'start the run over with --overwrite')
            rows = [{k: r.get(k, '') for k in self.columns} for r in kept]
            if self.metrics_cut_row is not None:
                LOG.info(f'{self.metrics_path}: its last row was cut off mid-line '
                         f'({self.metrics_cut_row.strip()!r}: the run was killed while writing it); '
                         f'left out, the epoch is run again')
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=self.columns)
        w.writeheader()
        w.writerows(rows)
        write_text_atomically(self.metrics_path, text.getvalue())

    def append_metrics(self, row):
        """One epoch's row, appended in one write and flushed to disk before
        the epoch's checkpoint is saved (a kill mid-write can only cut this
        last row, which a resume leaves out)."""
        if not WORLD.main:
            return
        line = io.StringIO()
        csv.DictWriter(line, fieldnames=self.columns).writerow(
            {k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in row.items()})
        append_line_durably(self.metrics_path, line.getvalue())
        if self.tensorboard is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ('epoch', 'phase_index'):
                    self.tensorboard.add_scalar(f"{row['phase']}/{k}", v, row['epoch'])
            self.tensorboard.flush()

    def mark_complete(self, summary):
        """complete.json, written after the last epoch's checkpoint: only then is
        a run finished (the sweep and the summary read this, not metrics.csv)."""
        if WORLD.main:
            write_text_atomically(os.path.join(self.dir, COMPLETE_FILE),
                                  json.dumps({**summary, 'finished': time.strftime('%Y-%m-%d %H:%M:%S')},
                                             indent=2))

    def unmark_complete(self):
        """Remove complete.json: the run is being written again (an OSError
        if it cannot be removed; `open` reports it)."""
        try:
            os.remove(os.path.join(self.dir, COMPLETE_FILE))
        except FileNotFoundError:
            pass


def write_text_atomically(path, text):
    """Replace `path` by `text` so that a kill or crash at any instant leaves
    the old file or the new one, whole: written beside it, flushed to disk,
    renamed over it (a rename is atomic), the folder flushed so the rename
    lasts. A failed write is a UserError and leaves no temporary file."""
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'w', newline='') as f:  # the text as given: csv's \r\n stays
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(os.path.dirname(path))
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise UserError(f'cannot write {path}: {e.strerror or e}') from None


def append_line_durably(path, text):
    """Append `text` (one record, ending in a newline) in one write, flushed
    to disk: what follows it (the epoch's checkpoint) never refers to a row
    that a crash could still lose. A failed write is a UserError."""
    data = text.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        raise UserError(f'cannot write {path}: {e.strerror or e}') from None


def without_cut_row(text):
    """A CSV file's text without a last line cut off mid-write (every row is
    written ending in a newline, so one without it is incomplete); returns
    (the text of the whole rows, the cut line or None)."""
    if not text or text.endswith('\n'):
        return text, None
    whole = text.rfind('\n') + 1
    return text[:whole], text[whole:]


def _fsync_folder(folder):
    try:
        fd = os.open(folder or '.', os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot flush a folder; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


def _optional_versions():
    out = {}
    for name in ('torchvision', 'tqdm'):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            pass
    return out


def _git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(['git', '-C', here, 'rev-parse', 'HEAD'], capture_output=True,
                              text=True, timeout=5).stdout.strip() or None
    except Exception:
        return None


def describe_device(device):
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)'


class Checkpointer:
    """Saves after each epoch, in an order that makes a kill at any point
    resumable without a lost or duplicated metrics row: the metrics row, then
    the best-model file of each network whose test top-1 improved, then
    checkpoint.pth.tar with every network and what `resume_state(phase_index)`
    adds (optimiser, loader, RNG, method state, flags, input digests).

    `nets` maps checkpoint keys to networks: {'net': net} for one network
    (metrics test_top1, file model_best.pth.tar), or e.g. {'net1': a, 'net2': b}
    (metrics test_net1_top1, files model_best_net1.pth.tar, ...)."""

    def __init__(self, run, nets, resume_state, phase_names):
        self.run, self.nets, self.resume_state = run, nets, resume_state
        self.phase_names = list(phase_names)
        self.best = {k: {'top1': -1.0, 'top5': 0.0, 'epoch': 0} for k in nets}
        self.main_epoch = 0
        self.last_saved = None  # (phase index, epoch) of checkpoint.pth.tar

    def _metric(self, key, row, name):
        return row.get(f'test_{name}' if key == 'net' else f'test_{key}_{name}')

    def best_path(self, key):
        name = 'model_best.pth.tar' if key == 'net' else f'model_best_{key}.pth.tar'
        return os.path.join(self.run.dir, name)

    def describe_last_save(self):
        """Where a failed run can be resumed from, in words."""
        if self.last_saved is None:
            return 'no checkpoint was saved yet, so a rerun starts over (--overwrite)'
        phase, epoch = self.last_saved
        return (f'checkpoint.pth.tar holds the last good epoch ({self.phase_names[phase]} epoch '
                f'{epoch}), which --resume continues from')

    def __call__(self, phase_index, epoch, row):
        self.run.append_metrics(row)
        for key, net in self.nets.items():
            top1, top5 = self._metric(key, row, 'top1'), self._metric(key, row, 'top5')
            if top1 is None:  # a phase without evaluation (pre-training)
                continue
            self.main_epoch = epoch
            if top1 > self.best[key]['top1']:
                self.best[key] = {'top1': top1, 'top5': top5, 'epoch': epoch}
                save_checkpoint(zoo_record(net, epoch, top1, top5), self.best_path(key))
        if WORLD.main:  # rank 0 alone writes
            first = next(iter(self.nets))
            state = {'epoch': self.main_epoch, 'prec@1': self._metric(first, row, 'top1') or 0.0,
                     'prec@5': self._metric(first, row, 'top5') or 0.0,
                     **{key: zoo_state_dict(net) for key, net in self.nets.items()},
                     'phase_index': phase_index, 'phase_epoch': epoch, 'best': self.best,
                     **self.resume_state(phase_index)}
            save_checkpoint(state, self.run.ckpt_path)
        self.last_saved = (phase_index, epoch)

    def restore(self, state):
        """Networks and best-so-far from a resume checkpoint; returns
        (phase index, epochs done in it)."""
        for key, net in self.nets.items():
            net.load_state_dict(strip_prefixes(state[key]))
        self.best, self.main_epoch = {k: dict(v) for k, v in state['best'].items()}, state['epoch']
        self.last_saved = (state['phase_index'], state['phase_epoch'])
        return self.last_saved
