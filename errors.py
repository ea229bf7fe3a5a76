"""Errors a user can fix, and the wrapper that turns them into one line.

A script's `main` is wrapped by `cli`: a `UserError` (bad flag, missing or
foreign file, a run that cannot continue) ends the run with `error: ...` on
stderr, the same line in the run's log.txt when it has one, and exit code 2,
never a traceback. Under torchrun, a process that loses the others (one
stopped or hung: distributed.CollectiveError) says so in one line and exits
with 1; SIGINT or SIGTERM ends a run in one line too, with exit code 128 +
the signal's number. Every process of a torchrun job reports its own
ending, those other than rank 0 naming themselves (`error: process 1 of 2:
...`). However a run ends, its lock is released and the process group left
(distributed.leave_distributed: after a successful run, once every process
has finished). `ArgumentParser` reports a bad flag the same way, in one line.
"""
import argparse
import functools
import logging
import signal
import sys
import threading

import torch.distributed as dist

from distributed import WORLD, CollectiveError, leave_distributed


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, ...): reported as a
    one-line message and a non-zero exit, never as a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as one line (`error: ...`, exit 2)
    instead of the usage block and the error."""

    def error(self, message):
        print(f'error: {message} (see {self.prog} --help)', file=sys.stderr)
        raise SystemExit(2)


class Interrupted(SystemExit, KeyboardInterrupt):
    """The end of a run stopped by SIGINT or SIGTERM, after its cleanup: the
    process exits quietly with 128 + the signal's number (a SystemExit), and
    whoever called main in-process sees a KeyboardInterrupt."""


class _Signalled(KeyboardInterrupt):
    """SIGINT, or SIGTERM (torchrun's, a scheduler's, kill's), raised as a
    KeyboardInterrupt that knows its signal, so that the run's cleanup happens."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_signalled(signum, frame):
    raise _Signalled(signum)


def _set_stop_handlers(handler):
    """Set SIGTERM's and SIGINT's handlers to `handler`; returns the handlers
    there were, to restore. Left alone: an ignored SIGINT (a background job's),
    a handler set outside Python (it could not be restored), and every handler
    outside the main thread (only it can set them)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(signum)
        if current is None or (signum == signal.SIGINT and current is signal.SIG_IGN):
            continue
        previous[signum] = current
        signal.signal(signum, handler)
    return previous


def cli(main):
    """Wrap a script's main so that a UserError ends the run with its message
    (also recorded in log.txt when the run has one) and exit code 2; a lost
    torchrun process (CollectiveError) with one line on every process that
    notices it and exit code 1; SIGINT or SIGTERM with one line and 128 + the
    signal's number. The cleanup after main ignores further SIGINT/SIGTERM
    (torchrun sends SIGTERM to the survivors of a failed process) so that it
    runs to its end: log.txt closed, the process group left."""
    @functools.wraps(main)
    def wrapper(argv=None):
        # SIGTERM raises like SIGINT, so both end the run through the cleanup below
        handlers = _set_stop_handlers(_raise_signalled)
        try:
            try:
                result = main(argv)
                leave_distributed(wait_for_others=True)  # no process leaves before all have ended well
                return result
            finally:
                _set_stop_handlers(signal.SIG_IGN)
        except UserError as e:
            _report(e)
            raise SystemExit(2)
        except CollectiveError as e:
            _report(e, names_its_process=True)
            raise SystemExit(1)
        except dist.DistError as e:  # joining the job, or a collective of torch's own (SyncBatchNorm)
            reason = (str(e).strip() or type(e).__name__).splitlines()[0]
            _report(f'process {WORLD.rank} of {WORLD.size}: the torchrun job failed ({reason})',
                    names_its_process=True)
            raise SystemExit(1)
        except KeyboardInterrupt as e:
            signum = getattr(e, 'signum', signal.SIGINT)
            _report(f'interrupted by {signal.Signals(signum).name}; --resume continues from the last '
                    f'saved epoch')
            raise Interrupted(128 + signum) from None
        finally:
            for handler in _log_files():  # the run's log.txt ends with the run
                logging.getLogger('kdzoo').removeHandler(handler)
                handler.close()
            leave_distributed()
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
    return wrapper


def _report(message, names_its_process=False):
    """`error: <message>` on stderr and in the run's log.txt (rank 0 keeps
    one). Every process of a torchrun job reports how it ended (where one
    failed alone, its line says why), those other than rank 0 naming
    themselves."""
    if WORLD.main or names_its_process:
        line = f'error: {message}'
    else:
        line = f'error: process {WORLD.rank} of {WORLD.size}: {message}'
    for handler in _log_files():
        handler.emit(logging.makeLogRecord({'msg': line, 'levelno': logging.ERROR}))
    print(line, file=sys.stderr, flush=True)


def _log_files():
    """The run's log.txt handlers (records.LOG, found by name: this module imports no run code)."""
    return [h for h in logging.getLogger('kdzoo').handlers if isinstance(h, logging.FileHandler)]
