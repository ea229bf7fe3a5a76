import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import write_cifar
import train_base

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script, *args):
    """Run a script as a user would; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True,
                       text=True, cwd=ROOT, timeout=600)
    return p.returncode, p.stdout, p.stderr


def test_one_epoch_writes_the_run_directory(base_run):
    d = base_run['dir']
    for name in ('initial_r20.pth.tar', 'checkpoint.pth.tar', 'model_best.pth.tar', 'log.txt',
                 'metrics.csv', 'args.json'):
        assert os.path.isfile(os.path.join(d, name)), name
    init = torch.load(os.path.join(d, 'initial_r20.pth.tar'), weights_only=True)
    ckpt = torch.load(os.path.join(d, 'checkpoint.pth.tar'), weights_only=True)
    assert init['epoch'] == 0 and ckpt['epoch'] == 1
    assert all(k.startswith('module.') for k in ckpt['net'])
    # training moved the weights away from the saved initial ones
    assert not torch.equal(init['net']['module.conv1.weight'], ckpt['net']['module.conv1.weight'])
    log = open(os.path.join(d, 'log.txt')).read()
    line = [l for l in log.splitlines() if l.startswith('[main] epoch 1/1 |')][0]
    for field in ('lr 0.02', 'train ce', 'top1', 'test loss', 's ('):  # the fixture's --lr; top-5: metrics.csv
        assert field in line
    rows = list(csv.DictReader(open(os.path.join(d, 'metrics.csv'))))
    assert len(rows) == 1 and rows[0]['epoch'] == '1'
    assert float(rows[0]['test_top1']) == pytest.approx(ckpt['prec@1'], abs=1e-3)
    args = json.load(open(os.path.join(d, 'args.json')))
    assert args['args']['num_class'] == 10 and args['args']['epochs'] == 1


def test_missing_data_stops_with_a_message_and_writes_nothing(tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    code, out, err = run_script('train_base.py', '--data_name', 'cifar10', '--net_name', 'resnet20',
                                '--img_root', str(empty), '--save_root', str(tmp_path / 'res'),
                                '--epochs', '1', '--device', 'cpu', '--no_download')
    assert code != 0
    assert 'cifar-10-batches-py' in err and str(empty) in err and '--no_download' in err
    assert 'Traceback' not in err + out
    assert not (tmp_path / 'res').exists()


@pytest.mark.parametrize('flags, message', [
    (['--num_class', '100'], 'contradicts --data_name cifar10'),
    (['--net_name', 'resnet57'], "invalid choice: 'resnet57'"),
    (['--epochs', '0'], 'must be > 0'),
    (['--lr', '-1'], 'must be > 0'),
    (['--batch_size', '1000'], 'larger than the training split'),
])
def test_bad_input_is_a_message(tmp_path, cifar10_root, flags, message):
    args = ['--data_name', 'cifar10', '--net_name', 'resnet20', '--img_root', cifar10_root,
            '--save_root', str(tmp_path / 'res'), '--epochs', '1', '--device', 'cpu', '--no_download']
    # a repeated flag takes the later value
    code, out, err = run_script('train_base.py', *args, *flags)
    assert code == 2 and message in err and 'Traceback' not in err
    assert not (tmp_path / 'res').exists()


def test_an_existing_run_is_not_overwritten(base_run):
    before = open(os.path.join(base_run['dir'], 'log.txt')).read()
    save_root, note = os.path.split(base_run['dir'])
    with pytest.raises(SystemExit) as e:
        train_base.main(['--data_name', 'cifar10', '--net_name', 'resnet20', '--img_root',
                         base_run['img_root'], '--save_root', save_root, '--note', note,
                         '--epochs', '1', '--device', 'cpu'])
    assert e.value.code == 2
    assert open(os.path.join(base_run['dir'], 'log.txt')).read() == before


def test_training_learns_a_learnable_task(tmp_path):
    write_cifar(str(tmp_path), 'cifar10', n_train=200, n_test=100, learnable=True, seed=1)
    train_base.main(['--data_name', 'cifar10', '--net_name', 'resnet20', '--img_root', str(tmp_path),
                     '--save_root', str(tmp_path / 'res'), '--note', 'learn', '--epochs', '6',
                     '--batch_size', '20', '--lr', '0.05', '--device', 'cpu', '--seed', '1'])
    rows = list(csv.DictReader(open(tmp_path / 'res' / 'learn' / 'metrics.csv')))
    best = max(float(r['test_top1']) for r in rows)
    assert best >= 40.0, f'best test top-1 {best} on a 10-class task (chance: 10)'
    assert float(rows[-1]['train_ce']) < float(rows[0]['train_ce'])
