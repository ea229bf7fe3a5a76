"""The run directory `<save_root>/<note>/` and what a run writes there.

log.txt (human-readable), metrics.csv (one row per epoch), args.json (every
resolved flag, the command, versions), the checkpoints, in an order that
makes a kill at any moment resumable (`Checkpointer`); and which recorded
flags define a run's result (`RESULT_NEUTRAL_FLAGS` are those that do not).
"""
import csv
import json
import logging
import os
import platform
import shlex
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


RUN_FILES = ('checkpoint.pth.tar', 'model_best.pth.tar', 'log.txt', 'metrics.csv', 'args.json')


class Run:
    """The run directory `<save_root>/<note>/` and what is written to it:
    log.txt (human-readable), metrics.csv (one row per epoch), args.json and
    the checkpoints. Constructing it only checks (nothing is written): a new
    run refuses an existing run directory unless --overwrite; --resume needs
    a checkpoint there. `open()` creates the directory and starts log.txt."""

    def __init__(self, args, script, argv=()):
        self.args, self.script, self.argv = args, script, list(argv)
        self.columns = None
        self.dir = os.path.join(args.save_root, args.note)
        self.ckpt_path = os.path.join(self.dir, 'checkpoint.pth.tar')
        self.metrics_path = os.path.join(self.dir, 'metrics.csv')
        self.existing = sorted(f for f in os.listdir(self.dir)
                               if f in RUN_FILES or f.startswith('initial_')) \
            if os.path.isdir(self.dir) else []
        if args.resume and not os.path.isfile(self.ckpt_path):
            raise UserError(f'--resume: no checkpoint to resume from in {self.dir}')
        if not args.resume and self.existing and not args.overwrite:
            raise UserError(f'{self.dir} already holds a run ({", ".join(self.existing)}); '
                            f'pass --resume to continue it or --overwrite to start over')

    def open(self, columns, device_name):
        """Create the run directory (clearing an --overwrite'n run), start
        log.txt with the lines logged so far, and write args.json; metrics.csv
        will have `columns`."""
        self.columns, self.tensorboard = list(columns), None
        if not WORLD.main:  # rank 0 writes the run directory
            return self
        if self.args.overwrite:
            for f in self.existing:
                os.remove(os.path.join(self.dir, f))
        os.makedirs(self.dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(self.dir, 'log.txt'))
        fh.setFormatter(logging.Formatter('%(message)s'))
        for h in list(LOG.handlers):
            if isinstance(h, _Buffer):
                for record in h.records:
                    fh.emit(record)
                LOG.removeHandler(h)
        LOG.addHandler(fh)
        if self.args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(self.dir, 'tensorboard'))
        self.write_args(device_name)
        return self

    # -- records
    def write_args(self, device_name):
        if not WORLD.main:
            return
        command = ' '.join(shlex.quote(a) for a in ['python', self.script] + self.argv)
        record = {'script': self.script, 'command': command,
                  'args': vars(self.args), 'device': device_name,
                  'processes': WORLD.size,
                 'versions': {'python': platform.python_version(), 'torch': torch.__version__,
                               'numpy': np.__version__, **_optional_versions()},
                  'git_commit': _git_commit(), 'started': time.strftime('%Y-%m-%d %H:%M:%S')}
        name = 'args.resume.json' if self.args.resume else 'args.json'
        with open(os.path.join(self.dir, name), 'w') as f:
            json.dump(record, f, indent=2, default=str)

    def saved_args(self):
        path = os.path.join(self.dir, 'args.json')
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            return json.load(f).get('args', {})

    def check_resume_args(self):
        """Refuse to resume with flags that would change the result."""
        saved, now = self.saved_args(), vars(self.args)
        diff = [k for k in now if k in saved and k not in RESULT_NEUTRAL_FLAGS and saved[k] != now[k]]
        if diff:
            raise UserError('--resume with flags that differ from the run being resumed: ' +
                            ', '.join(f'--{k} {now[k]} (was {saved[k]})' for k in diff))

    def start_metrics(self, keep_upto=None):
        """Create metrics.csv; on resume keep the rows up to `keep_upto`
        ((phase index, epoch) of the checkpoint), so no row is duplicated."""
        if not WORLD.main:
            return
        rows = []
        if keep_upto is not None and os.path.isfile(self.metrics_path):
            with open(self.metrics_path, newline='') as f:
                rows = [r for r in csv.DictReader(f)
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
    adds (optimiser, loader, RNG, method state).

    `nets` maps checkpoint keys to networks: {'net': net} for one network
    (metrics test_top1, file model_best.pth.tar), or e.g. {'net1': a, 'net2': b}
    (metrics test_net1_top1, files model_best_net1.pth.tar, ...)."""

    def __init__(self, run, nets, resume_state):
        self.run, self.nets, self.resume_state = run, nets, resume_state
        self.best = {k: {'top1': -1.0, 'top5': 0.0, 'epoch': 0} for k in nets}
        self.main_epoch = 0

    def _metric(self, key, row, name):
        return row.get(f'test_{name}' if key == 'net' else f'test_{key}_{name}')

    def best_path(self, key):
        name = 'model_best.pth.tar' if key == 'net' else f'model_best_{key}.pth.tar'
        return os.path.join(self.run.dir, name)

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
        if not WORLD.main:  # rank 0 alone writes
            return
        first = next(iter(self.nets))
        state = {'epoch': self.main_epoch, 'prec@1': self._metric(first, row, 'top1') or 0.0,
                 'prec@5': self._metric(first, row, 'top5') or 0.0,
                 **{key: zoo_state_dict(net) for key, net in self.nets.items()},
                 'phase_index': phase_index, 'phase_epoch': epoch, 'best': self.best,
                 **self.resume_state(phase_index)}
        save_checkpoint(state, self.run.ckpt_path)

    def restore(self, state):
        """Networks and best-so-far from a resume checkpoint; returns
        (phase index, epochs done in it)."""
        for key, net in self.nets.items():
            net.load_state_dict(strip_prefixes(state[key]))
        self.best, self.main_epoch = {k: dict(v) for k, v in state['best'].items()}, state['epoch']
        return state['phase_index'], state['phase_epoch']
