"""The torch release the project needs: requirements.txt states it, and an older
torch (or one too old for --compile inductor) stops a run with one line naming
the release, before anything is written. The installed version is faked."""
import os
import re

import pytest

import capture
import train_base
import versions
from errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def argv(root, save_root, *extra):
    return ['--data_name', 'cifar10', '--net_name', 'resnet8', '--img_root', root, '--save_root',
            str(save_root), '--note', 'run', '--epochs', '1', '--batch_size', '50', '--device', 'cpu',
            '--no_download', *extra]


@pytest.mark.parametrize('text, parsed', [('2.14.1+cu130', (2, 14, 1)), ('2.11.0a0+git1234abc', (2, 11, 0)),
                                          ('2.3', (2, 3, 0)), ('10.0.1.dev20270101', (10, 0, 1))])
def test_versions_are_parsed(text, parsed):
    assert versions.parse_version(text) == parsed


def test_requirements_state_the_minimum_the_code_checks():
    text = open(os.path.join(ROOT, 'requirements.txt')).read()
    torch_line = re.search(r'^torch>=([\d.]+)\s*$', text, re.M)
    assert torch_line, 'requirements.txt names no torch>= line'
    assert versions.parse_version(torch_line.group(1))[:2] == versions.MINIMUM
    assert re.search(r'^torchvision>=0\.18\s*$', text, re.M)  # the release paired with torch 2.3


def test_the_installed_torch_passes():
    versions.require()
    versions.require('compile', '--compile inductor')


@pytest.mark.parametrize('installed', [(2, 2, 2), (1, 13, 1)])
def test_a_torch_older_than_the_minimum_stops_any_run(cifar10_root, tmp_path, capsys, monkeypatch, installed):
    monkeypatch.setattr(versions, 'torch_version', lambda: installed)
    with pytest.raises(SystemExit) as stop:
        train_base.main(argv(cifar10_root, tmp_path))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('error: this project needs torch >= 2.3')
    assert not (tmp_path / 'run').exists()


def test_inductor_on_a_torch_before_2_11_is_refused_in_one_line(cifar10_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(versions, 'torch_version', lambda: (2, 10, 1))
    train_base.main(argv(cifar10_root, tmp_path, '--compile', 'auto'))  # 2.10 runs everything else
    assert (tmp_path / 'run' / 'complete.json').is_file()
    with pytest.raises(SystemExit) as stop:
        train_base.main(argv(cifar10_root, tmp_path, '--compile', 'inductor', '--note', 'compiled'))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith('error: --compile inductor needs torch >= 2.11') and 'autograd.grad' in err
    assert not (tmp_path / 'compiled').exists()


def test_tracing_a_step_on_an_old_torch_says_which_release_it_needs(monkeypatch):
    monkeypatch.setattr(versions, 'torch_version', lambda: (2, 10, 0))
    with pytest.raises(UserError, match=r'needs torch >= 2\.11'):
        capture.configure_dynamo()
