"""The README's commands name only scripts and flags that exist, and its
method table is the registry's."""
import os
import re
import shlex
import subprocess
import sys

import pytest

import sweep
from kd_losses.__main__ import method_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, 'README.md')).read()


def shell_commands():
    """Each command of the README's bash blocks, continuation lines joined,
    split at && and with comments dropped."""
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', README, re.S):
        for line in block.replace('\\\n', ' ').splitlines():
            line = line.split(' # ')[0].strip()
            if line and not line.startswith('#'):
                commands += [c.strip() for c in line.split('&&')]
    return commands


def python_invocations():
    """(script, [--flags]) for every python/torchrun command of the README."""
    out = []
    for cmd in shell_commands():
        words = shlex.split(cmd)
        scripts = [i for i, w in enumerate(words) if w.endswith('.py')]
        if scripts and words[0] in ('python', 'torchrun'):
            i = scripts[0]
            out.append((words[i], [w.split('=')[0] for w in words[i + 1:] if w.startswith('--')]))
    return out


HELP = {}


def help_text(script, sub=None):
    key = (script, sub)
    if key not in HELP:
        argv = [sys.executable, os.path.join(ROOT, script)] + ([sub] if sub else []) + ['--help']
        HELP[key] = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120).stdout
    return HELP[key]


def test_the_readme_has_the_two_quick_start_commands():
    quick = README.split('## Quick start')[1].split('##')[0]
    block = re.findall(r'```bash\n(.*?)```', quick, re.S)[0].strip().splitlines()
    assert len(block) == 2
    assert block[0].startswith('pip install -r requirements.txt && ')
    assert block[1] == 'pip install -r requirements.txt -r requirements-cluster.txt && python -m pytest -q'
    ci = open(os.path.join(ROOT, '.ci', 'run')).read()
    assert 'pip install -r requirements.txt -r requirements-cluster.txt && python -m pytest -q' in ci


@pytest.mark.parametrize('script, flags', python_invocations(),
                         ids=[f'{s}:{" ".join(f)[:40]}' for s, f in python_invocations()])
def test_every_script_and_flag_exists(script, flags):
    assert os.path.isfile(os.path.join(ROOT, script)), script
    text = help_text(script, 'summary' if script == 'utils.py' else None)
    for flag in flags:
        assert re.search(re.escape(flag) + r'\b', text), f'{script} --help does not list {flag}'


def test_sweep_settings_named_in_the_readme_exist():
    for cmd in shell_commands():
        if 'example_train_script.sh' in cmd:
            for var in re.findall(r'\b([A-Z_]+)=', cmd):
                assert var in sweep.KNOWN_NAMES, var  # the sweep's settings (sweep.py) and their aliases


def test_the_method_table_is_the_registry():
    assert method_table() in README
