"""Every mistake is caught before training starts: a one-line message, exit
code 2, no traceback, nothing written."""
import csv
import os

import pytest
import torch

import train_base
import train_kd
from network import resnet20
from checkpoints import save_checkpoint, zoo_record


@pytest.fixture(scope='module')
def cifar100_checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('c100') / 'r20-c100.pth.tar')
    save_checkpoint(zoo_record(resnet20(100), 0), path)
    return path


def kd_args(base_run, save_root, **over):
    flags = {'data_name': 'cifar10', 'img_root': base_run['img_root'], 'save_root': str(save_root),
             'note': 'bad', 's_name': 'resnet20', 't_name': 'resnet20', 's_init': base_run['initial'],
             't_model': base_run['best'], 'kd_mode': 'st', 'epochs': '1', 'batch_size': '32',
             'device': 'cpu', 'no_download': None}
    flags.update(over)
    out = []
    for k, v in flags.items():
        if v is not False:
            out += [f'--{k}'] + ([] if v is None else [str(v)])
    return out


CASES = [
    ({'kd_mode': 'kdx'}, "argument --kd_mode: invalid choice: 'kdx' (choose from"),
    ({'t_name': 'resnet57'}, "argument --t_name: invalid choice: 'resnet57'"),
    ({'s_name': 'vgg'}, "argument --s_name: invalid choice: 'vgg'"),
    ({'data_name': 'svhn'}, "argument --data_name: invalid choice: 'svhn'"),
    ({'t_name': 'resnet110'}, 'teacher (--t_model)'),
    ({'s_init': '/no/such/file.pth.tar'}, 'student initialisation (--s_init) /no/such/file.pth.tar does not exist'),
    ({'epochs': '0'}, 'argument --epochs: must be > 0'),
    ({'lr': '-0.1'}, 'argument --lr: must be > 0'),
    ({'batch_size': '0'}, 'argument --batch_size: must be > 0'),
    ({'batch_size': '101'}, '--batch_size 101 is larger than the training split (100 images)'),
    ({'T': '0'}, 'argument --T: must be > 0'),
    ({'kd_mode': 'crd', 'nce_n': '1000'}, '--kd_mode crd: --nce_n 1000 exceeds the 90 negatives'),
    ({'lambda_kd': '-1'}, 'argument --lambda_kd: must be >= 0'),
    ({'num_class': '100'}, '--num_class 100 contradicts --data_name cifar10'),
    ({'device': 'cuda'}, 'CUDA is not available'),
    ({'device': 'tpu'}, 'is not a device name'),
]


@pytest.mark.parametrize('over, message', CASES, ids=[m[:30] for _, m in CASES])
def test_bad_input_to_train_kd(base_run, tmp_path, capsys, over, message):
    if over.get('device') == 'cuda' and torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    with pytest.raises(SystemExit) as e:
        train_kd.main(kd_args(base_run, tmp_path, **over))
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert message in err, err
    assert 'Traceback' not in err
    assert not os.path.exists(tmp_path / 'bad')


def test_a_teacher_for_another_class_count_says_what_the_file_holds(base_run, tmp_path, capsys,
                                                                    cifar100_checkpoint):
    with pytest.raises(SystemExit):
        train_kd.main(kd_args(base_run, tmp_path, t_model=cifar100_checkpoint))
    err = capsys.readouterr().err
    assert 'expected resnet20 with 10 classes, the file holds resnet20 with 100 classes' in err
    assert cifar100_checkpoint in err and not os.path.exists(tmp_path / 'bad')


def test_a_truncated_student_checkpoint_is_named(base_run, tmp_path, capsys):
    bad = tmp_path / 'truncated.pth.tar'
    bad.write_bytes(open(base_run['initial'], 'rb').read()[:1000])
    with pytest.raises(SystemExit):
        train_kd.main(kd_args(base_run, tmp_path, s_init=str(bad)))
    assert f'{bad} cannot be loaded' in capsys.readouterr().err


def test_deterministic_reruns_give_identical_logs(cifar10_root, tmp_path):
    def run(note):
        train_base.main(['--data_name', 'cifar10', '--net_name', 'resnet20', '--img_root', cifar10_root,
                         '--save_root', str(tmp_path), '--note', note, '--epochs', '2', '--batch_size',
                         '25', '--device', 'cpu', '--deterministic', '--seed', '11'])
        with open(tmp_path / note / 'metrics.csv') as f:
            return [{k: v for k, v in r.items() if k not in ('seconds', 'img_per_s')}
                    for r in csv.DictReader(f)]
    try:
        assert run('a') == run('b')
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
