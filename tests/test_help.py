"""Every script's --help shows each flag's default (each mode's, for the
distillation flags), and its example commands are the README's."""
import argparse
import os
import re
import subprocess
import sys

import pytest

import bench
import train_base
import train_dml
import train_kd
from kd_losses.__main__ import build_parser as kd_losses_parser
from test_readme import shell_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARSERS = {'train_base.py': train_base.build_parser, 'train_kd.py': train_kd.build_parser,
           'train_dml.py': train_dml.build_parser, 'bench.py': bench.build_parser,
           'python -m kd_losses': kd_losses_parser}


def help_of(script):
    argv = [sys.executable, '-m', 'kd_losses'] if script.startswith('python') else \
        [sys.executable, os.path.join(ROOT, script)]
    p = subprocess.run(argv + ['--help'], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def flag_help(text, flag):
    """The help of `flag` in a --help text, on one line."""
    block = re.search(r'^  ' + re.escape(flag) + r'(?=\s).*?(?=^  -|^\S|\Z)', text, re.M | re.S).group(0)
    return ' '.join(block.split())


@pytest.mark.parametrize('script', sorted(PARSERS))
def test_every_optional_flag_shows_its_default(script):
    parser = PARSERS[script]()
    formatter = parser._get_formatter()
    missing = [a.option_strings[-1] for a in parser._actions
               if a.option_strings and not a.required and a.help is not argparse.SUPPRESS
               and not isinstance(a, argparse._HelpAction)
               and not re.search(r'\[[^\]]+\]$', formatter._get_help_string(a) or '')]
    assert not missing, f'{script} --help gives no default for {missing}'


def test_the_defaults_read_as_the_scripts_use_them():
    kd = help_of('train_kd.py')
    assert flag_help(kd, '--seed').endswith('[2]')
    assert flag_help(kd, '--no_progress').endswith('[off]')
    assert flag_help(kd, '--amp, --no-amp').endswith('[on with CUDA, off on the CPU]')
    # a default every mode shares, then the modes that differ, and where a
    # dataset, --protocol or a switch changes a mode's
    # (st with --logit_stand: logit-standardization-KD mdistiller/engine/cfg.py line 64, CE_WEIGHT 0.1)
    assert flag_help(kd, '--ce_weight').endswith(
        '[1; ctkd 0.1, mlkd 0.1, sdd_kd 0.1, simkd 0, st 1 (--protocol crd 0.1; with --logit_stand 0.1)]')
    assert flag_help(kd, '--dot_delta DOT_DELTA').endswith('[0.075]')
    lambda_kd = flag_help(kd, '--lambda_kd')
    for text in ('ab 10 (--protocol crd 1)', 'crd 0.2 (cifar100 0.8; --protocol crd 0.8)',
                 'st 0.1 (--protocol crd 0.9; with --logit_stand 9)', 'wttm 4]'):
        assert text in lambda_kd
    assert flag_help(kd, '--warmup_epochs').endswith(
        '[bss 10 (--protocol crd 12); scaled to --epochs from a 200-epoch schedule]')
    assert flag_help(help_of('train_dml.py'), '--lambda_kd').endswith('[1.0]')
    base = help_of('train_base.py')
    assert flag_help(base, '--evaluate CHECKPOINT').endswith('[none: train]')
    assert flag_help(help_of('bench.py'), '--configs PATTERN [PATTERN ...]').endswith(
        '[every one on CUDA; base-r20 kd-st on the CPU]')


def test_kd_mode_help_explains_the_list_form():
    text = flag_help(help_of('train_kd.py'), '--kd_mode MODE[,MODE...]')
    for words in ('comma list', 'one student per mode', 'the teacher runs once',
                  '<save_root>/<note>/<mode>/', 'python -m kd_losses --shareable'):
        assert words in text, words


def test_train_base_trains_any_cifar_network():
    first = help_of('train_base.py').split('\n\n')[1]
    assert first.startswith('Train one of the CIFAR networks') and 'ResNet with' not in first


def docstring_commands(module):
    """The example commands of a script's docstring, continuation lines joined."""
    text = module.__doc__.replace('\\\n', ' ')
    return [' '.join(line.split()) for line in text.splitlines() if line.strip().startswith('python ')]


@pytest.mark.parametrize('module', [train_base, train_kd, train_dml], ids=lambda m: m.__name__)
def test_help_examples_are_the_readme_commands(module):
    readme = {' '.join(c.split()) for c in shell_commands()}
    examples = docstring_commands(module)
    assert examples
    for command in examples:
        assert command in readme, f'{module.__name__} --help example not in README.md: {command}'
