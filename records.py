"""The run directory `<save_root>/<note>/` and what a run writes there.

log.txt (human-readable), metrics.csv (one row per epoch), args.json (every
resolved flag, the command, versions), the checkpoints, in an order that
makes a kill at any moment resumable (`Checkpointer`); and which recorded
flags define a run's result (`RESULT_NEUTRAL_FLAGS` are those that do not).
"""
import csv
import fcntl
import fnmatch
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


def reset_logger():
    """Log to stdout, buffering lines for log.txt until `Run.open` (only rank 0 logs)."""
    for h in list(LOG.handlers):
        LOG.removeHandler(h)
        h.close()
    if not WORLD.main:
        LOG.addHandler(logging.NullHandler())
        return LOG
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter('%(message)s'))
    LOG.addHandler(out)
    LOG.addHandler(_Buffer())
    return LOG


# What a run writes in its directory (--overwrite removes exactly these).
RUN_FILES = ('checkpoint.pth.tar', 'model_best.pth.tar', 'log.txt', 'metrics.csv', 'args.json',
             'complete.json', 'run.lock')
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
    checkpoint and metrics.csv there. `open()` locks the directory (a second
    process writing the same run stops with a message naming the holder),
    then creates it and starts log.txt."""

    def __init__(self, args, script, argv=()):
        self.args, self.script, self.argv = args, script, list(argv)
        self.columns, self.tensorboard, self._lock = None, None, None
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
        if args.resume:
            if not os.path.isfile(self.ckpt_path):
                raise UserError(f'--resume: no checkpoint to resume from in {self.dir}')
            self.metrics_rows = self.read_metrics()
        elif [f for f in self.existing if f != LOCK_FILE] and not args.overwrite:
            shown = [f for f in self.existing if f != LOCK_FILE]
            raise UserError(f'{self.dir} already holds a run ({", ".join(shown)}); '
                            f'pass --resume to continue it or --overwrite to start over')

    def run_files(self):
        """The files of this run directory that the project wrote."""
        if not os.path.isdir(self.dir):
            return []
        names = os.listdir(self.dir)
        return sorted(f for f in names if f in RUN_FILES or f == 'tensorboard'
                      or any(fnmatch.fnmatch(f, p) for p in RUN_FILE_PATTERNS))

    def read_metrics(self):
        """metrics.csv's rows as dicts, checked enough to resume from (a UserError otherwise)."""
        try:
            with open(self.metrics_path, newline='') as f:
                rows = list(csv.DictReader(f))
            for r in rows:
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
        """args.json: every resolved flag, the command, versions, device; a
        resume adds itself to its 'resumes' list (args.json is rewritten if
        it was lost)."""
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
                      'git_commit': _git_commit(), 'started': now}
        write_text_atomically(path, json.dumps(record, indent=2, default=str))

    def check_resume_args(self, saved):
        """Refuse to resume with flags that would change the result (`saved`:
        the flags the checkpoint was written with)."""
        now = json_args(self.args)
        diff = [k for k in now if k in saved and k not in RESULT_NEUTRAL_FLAGS and saved[k] != now[k]]
        if diff:
            raise UserError('--resume with flags that differ from the run being resumed: ' +
                            ', '.join(f'--{k} {now[k]} (was {saved[k]})' for k in diff) +
                            '; rerun with the original flags, or start over with --overwrite')

    def start_metrics(self, keep_upto=None):
        """Create metrics.csv; on resume keep the rows up to `keep_upto`
        ((phase index, epoch) of the checkpoint), so no row is duplicated."""
        if not WORLD.main:
            return
        rows = []
        if keep_upto is not None:
            rows = [{k: r.get(k, '') for k in self.columns} for r in self.metrics_rows or []
                    if (int(r['phase_index']), int(r['epoch'])) <= tuple(keep_upto)]
        with open(self.metrics_path, 'w', newline='') as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            w.writerows(rows)

    def append_metrics(self, row):
        if not WORLD.main:
            return
        with open(self.metrics_path, 'a', newline='') as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow(
                {k: (f'{v:.6g}' if isinstance(v, float) else v) for k, v in row.items()})
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
        path = os.path.join(self.dir, COMPLETE_FILE)
        if os.path.isfile(path):
            os.remove(path)


def write_text_atomically(path, text):
    tmp = f'{path}.tmp'
    try:
        with open(tmp, 'w') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f'cannot write {path}: {e.strerror or e}') from None


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
