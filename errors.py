"""Errors a user can fix, and the wrapper that turns them into one line.

A script's `main` is wrapped by `cli`: a `UserError` (bad flag, missing or
foreign file, a run that cannot continue) ends the run with `error: ...` on
stderr, the same line in the run's log.txt when it has one, and exit code 2,
never a traceback. The process group of a torchrun job is left either way.
`ArgumentParser` reports a bad flag the same way, in one line.
"""
import argparse
import functools
import logging
import sys

from distributed import WORLD, leave_distributed


class UserError(Exception):
    """A problem the user can fix (bad flag, missing file, ...): reported as a
    one-line message and a non-zero exit, never as a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as one line (`error: ...`, exit 2)
    instead of the usage block and the error."""

    def error(self, message):
        print(f'error: {message} (see {self.prog} --help)', file=sys.stderr)
        raise SystemExit(2)


def cli(main):
    """Wrap a script's main so that a UserError ends the run with its message
    (also recorded in log.txt when the run has one) and exit code 2."""
    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as e:
            for handler in _log_files():
                handler.emit(logging.makeLogRecord({'msg': f'error: {e}', 'levelno': logging.ERROR}))
            if WORLD.main:
                print(f'error: {e}', file=sys.stderr)
            raise SystemExit(2)
        finally:
            for handler in _log_files():  # the run's log.txt ends with the run
                logging.getLogger('kdzoo').removeHandler(handler)
                handler.close()
            leave_distributed()
    return wrapper


def _log_files():
    """The run's log.txt handlers (records.LOG, found by name: this module imports no run code)."""
    return [h for h in logging.getLogger('kdzoo').handlers if isinstance(h, logging.FileHandler)]
