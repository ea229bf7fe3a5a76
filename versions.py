"""The torch releases this project needs, and the checks that stop a run on an older one.

Everything runs on torch 2.3 or newer (requirements.txt says the same):

- the CUDA update is one fused SGD kernel reading its learning rate from a
  device tensor (`torch._fused_sgd_` with a tensor lr), so that a captured
  step sees an lr written after its capture: torch 2.3;
- NumPy 2, which `pip install numpy` gives, works with torch from 2.3 on
  (older wheels cannot convert arrays with it, and the data is read through
  numpy).

Tracing a whole step with torch.compile (`--compile inductor`, and the tests
that trace steps) needs torch 2.11: the step computes its gradients with
`torch.autograd.grad`, which dynamo traces only with
`torch._dynamo.config.trace_autograd_ops`, added in 2.11.

A run on an older torch stops with a one-line error naming the release it
needs (`require`), before anything is written.
"""
import re

import torch

from errors import UserError

MINIMUM = (2, 3)
# feature -> (the oldest torch that has it, what needs it)
FEATURES = {
    'compile': ((2, 11), 'tracing a step that calls torch.autograd.grad '
                         '(torch._dynamo.config.trace_autograd_ops)'),
}


def parse_version(text):
    """(major, minor, patch) of a version string such as '2.14.1+cu130' or '2.11.0a0+git1234'."""
    match = re.match(r'(\d+)\.(\d+)(?:\.(\d+))?', str(text))
    if match is None:
        raise ValueError(f'not a version: {text!r}')
    return tuple(int(part or 0) for part in match.groups())


def torch_version():
    """The installed torch's (major, minor, patch)."""
    return parse_version(torch.__version__)


def _named(version):
    return '.'.join(str(v) for v in version)


def require(feature=None, what=None):
    """Stop with a UserError unless the installed torch has `feature` (one of
    FEATURES; None: the project's minimum). `what` names what asked for it in
    the message (e.g. '--compile inductor')."""
    needed, why = (MINIMUM, 'this project') if feature is None else FEATURES[feature]
    if torch_version()[:len(needed)] < needed:
        asker = f'{what} needs' if what else f'{why} needs'
        detail = f' for {why}' if what and feature is not None else ''
        raise UserError(f'{asker} torch >= {_named(needed)}{detail}, and torch {torch.__version__} '
                        f'is installed: pip install --upgrade "torch>={_named(needed)}"')
