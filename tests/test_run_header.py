"""log.txt opens with the resolved schedule, each value with where it came
from, the method's settings and stages; a warm-up or pre-training stage
that spans half of --epochs or more is warned about, naming its flag."""
import argparse
import os

import pytest

import train_base
import train_dml
import train_kd
import utils
from conftest import StopRun, distill_argv
from kd_losses import METHODS, Flag, Method
from utils import lr_at


@pytest.fixture
def stop_before_training(monkeypatch):
    """The scripts run up to their first epoch (run directory, log.txt, data,
    networks), then stop."""
    def stop(*args, **kwargs):
        raise StopRun
    monkeypatch.setattr(utils, 'fit', stop)


def log_lines(save_root, note):
    with open(os.path.join(save_root, note, 'log.txt')) as f:
        return f.read().splitlines()


def decays(epochs):
    """The epochs after which utils.lr_at lowers the seed schedule's lr."""
    return [e for e in range(1, epochs) if lr_at(e + 1, epochs, 1.0) < lr_at(e, epochs, 1.0)]


def test_train_base_log_opens_with_the_schedule(base_run, tmp_path, stop_before_training):
    with pytest.raises(StopRun):
        train_base.main(['--data_name', 'cifar10', '--net_name', 'resnet20', '--img_root',
                         base_run['img_root'], '--save_root', str(tmp_path), '--note', 'b',
                         '--epochs', '8', '--batch_size', '50', '--lr_decay_rate', '0.2',
                         '--device', 'cpu', '--no_download'])
    lines = log_lines(tmp_path, 'b')
    assert lines[0].startswith('command: python train_base.py')
    assert decays(8) == [4, 6]
    assert lines[1:13] == [
        'schedule: --protocol seed (default)',
        '  epochs = 8 (command line)',
        '  batch_size = 50 (command line)',
        '  lr = 0.1 (seed default)',
        '  lr_decay_epochs = 4,6 (seed default: 50% and 75% of --epochs, rounded up)',
        '  lr_decay_rate = 0.2 (command line)',
        '  momentum = 0.9 (seed default)',
        '  nesterov = True (seed default)',
        '  weight_decay = 0.0001 (seed default)',
        '  amp = off: float32 (default on the CPU)',
        '  channels_last = off (default on the CPU)',
        '  compile = off (default)']


def test_train_kd_log_under_the_crd_protocol(base_run, tmp_path, stop_before_training):
    argv = distill_argv(base_run, tmp_path, 'k', 'st', epochs=24,
                        extra=['--protocol', 'crd', '--compile', 'off', '--amp'])
    argv.remove('--batch_size')
    argv.remove('50')
    with pytest.raises(StopRun):
        train_kd.main(argv)
    lines = log_lines(tmp_path, 'k')
    assert lines[1:14] == [
        'schedule: --protocol crd (command line)',
        '  epochs = 24 (command line)',
        '  batch_size = 64 (--protocol crd default)',
        '  lr = 0.05 (--protocol crd default)',
        '  lr_decay_epochs = 15,18,21 (--protocol crd default, 150,180,210 of 240 epochs scaled to 24)',
        '  lr_decay_rate = 0.1 (--protocol crd default)',
        '  momentum = 0.9 (--protocol crd default)',
        '  nesterov = False (--protocol crd default)',
        '  weight_decay = 0.0005 (--protocol crd default)',
        '  amp = on: bf16 autocast, float32 losses (command line)',
        '  channels_last = off (default on the CPU)',
        '  compile = off (command line)',
        '  optimizer = sgd (default)']
    method = lines.index(next(l for l in lines if l.startswith('kd_mode st ')))
    assert method == 14  # the method's block follows, then the data
    assert '  ce_weight = 0.1 (default for st on cifar10 under --protocol crd)' in lines[method:]
    stages = lines.index('  stages: main 24 epochs (--epochs)')
    assert stages < lines.index(next(l for l in lines if l.startswith('cifar10: 100 training')))


def test_the_crd_protocol_lr_of_a_small_student_says_so():
    args, sources, _ = train_kd.parse_args([
        '--data_name', 'cifar100', '--protocol', 'crd', '--t_name', 'resnet32x4', '--s_name',
        'MobileNetV2', '--kd_mode', 'st', '--s_init', '-', '--t_model', '-', '--device', 'cpu'])
    assert args.lr == 0.01 and sources['lr'] == '--protocol crd default for a MobileNetV2 student'
    assert sources['epochs'] == '--protocol crd default' and sources['protocol'] == 'command line'


def test_a_warm_up_longer_than_the_run_is_warned_in_the_log_and_on_the_terminal(
        base_run, tmp_path, stop_before_training, capsys):
    with pytest.raises(StopRun):
        train_kd.main(distill_argv(base_run, tmp_path, 'd', 'dkd', epochs=10))
    warning = ('warning: --dkd_warmup 20 spans half or more of the 10-epoch run: the KD weight '
               'never reaches full strength in this run (at best in its last epoch); lower '
               '--dkd_warmup (or raise --epochs)')
    lines = log_lines(tmp_path, 'd')
    assert warning in lines
    assert '  warm-up: the KD weight, over the first 20 epochs (--dkd_warmup)' in lines
    assert warning in capsys.readouterr().out.splitlines()


def args_for(mode, epochs, **given):
    """The resolved flags of `mode` for an `epochs`-epoch run on CIFAR-10 (`given` on the command line)."""
    argv = ['--data_name', 'cifar10', '--t_name', 'resnet20', '--s_name', 'resnet20', '--kd_mode',
            mode, '--s_init', '-', '--t_model', '-', '--device', 'cpu', '--epochs', str(epochs)]
    for name, value in given.items():
        argv += [f'--{name}', str(value)]
    return train_kd.parse_args(argv)[0]


@pytest.mark.parametrize('mode, epochs, given, warning', [
    ('reviewkd', 30, {}, "--reviewkd_warmup 20 spans half or more of the 30-epoch run: the KD weight "
                         "reaches full strength only after 20 of the run's 30 epochs; lower "
                         "--reviewkd_warmup (or raise --epochs)"),
    ('ctkd', 10, {}, "--ctkd_ramp_epochs 10 spans half or more of the 10-epoch run: the temperature "
                     "curriculum's gradient reversal never reaches full strength in this run (at best "
                     "in its last epoch); lower --ctkd_ramp_epochs (or raise --epochs)"),
    ('bss', 20, {'warmup_epochs': 12}, "--warmup_epochs 12 spans half or more of the 20-epoch run: "
                                       "the KD term reaches full strength only after 12 of the run's "
                                       "20 epochs; lower --warmup_epochs (or raise --epochs)"),
    ('ab', 10, {'init_epochs': 5}, "the init phase (--init_epochs 5) lasts half or more of the "
                                   "10-epoch main schedule: the stage takes 5 of the run's 15 epochs; "
                                   "lower --init_epochs (or raise --epochs)"),
    ('ft', 6, {'para_epochs': 3}, "the paraphraser phase (--para_epochs 3) lasts half or more of "
                                  "the 6-epoch main schedule: the stage takes 3 of the run's 9 "
                                  "epochs; lower --para_epochs (or raise --epochs)"),
])
def test_each_long_stage_is_warned_naming_its_flag(mode, epochs, given, warning):
    assert train_kd.stages(METHODS[mode], args_for(mode, epochs, **given))[1] == [warning]


@pytest.mark.parametrize('mode, epochs', [('dkd', 200), ('dkd', 41), ('ctkd', 21), ('bss', 10),
                                          ('ab', 10), ('ft', 10), ('st', 1), ('crd', 2)])
def test_stages_within_half_the_run_are_not_warned(mode, epochs):
    assert train_kd.stages(METHODS[mode], args_for(mode, epochs))[1] == []


def test_stages_list_the_phases_and_warm_ups_in_epochs():
    lines, _ = train_kd.stages(METHODS['ab'], args_for('ab', 200))
    assert lines == ['  stages: init 50 epochs (--init_epochs), then main 200 epochs (--epochs)']
    lines, _ = train_kd.stages(METHODS['dkd'], args_for('dkd', 100, dkd_warmup=0))
    assert lines == ['  stages: main 100 epochs (--epochs)',
                     '  warm-up: none, the KD weight at full strength from the start (--dkd_warmup 0)']


def test_a_new_method_declaring_its_warm_up_flag_is_warned_without_other_changes():
    method = Method(name='ramped', title='t', paper='p', transfers='x', build=None,
                    defaults={'lambda_kd': 1.0, 'ramp': 6},
                    flags={'ramp': Flag(int, 'epochs of the ramp', warms_up='the ramped loss')})
    args = argparse.Namespace(epochs=12, lambda_kd=1.0, ramp=6)
    lines, warnings = train_kd.stages(method, args)
    assert '  warm-up: the ramped loss, over the first 6 epochs (--ramp)' in lines
    assert warnings == ["--ramp 6 spans half or more of the 12-epoch run: the ramped loss reaches "
                        "full strength only after 6 of the run's 12 epochs; lower --ramp (or raise "
                        "--epochs)"]
    args.ramp = 5
    assert train_kd.stages(method, args)[1] == []


def test_train_dml_log_opens_with_the_schedule(base_run, tmp_path, stop_before_training):
    with pytest.raises(StopRun):
        train_dml.main(['--data_name', 'cifar10', '--net1_name', 'resnet20', '--net2_name', 'resnet20',
                        '--net1_init', 'random', '--net2_init', 'random', '--img_root',
                        base_run['img_root'], '--save_root', str(tmp_path), '--note', 'm',
                        '--epochs', '3', '--batch_size', '50', '--device', 'cpu', '--no_download',
                        '--no-nesterov'])
    lines = log_lines(tmp_path, 'm')
    assert decays(3) == [2]  # the decay after epoch 3 ends the run
    assert lines[1:3] == ['schedule: --protocol seed (default)', '  epochs = 3 (command line)']
    assert '  lr_decay_epochs = 2,3 (seed default: 50% and 75% of --epochs, rounded up)' in lines[1:14]
    assert '  nesterov = False (command line)' in lines[1:14]
    assert lines[13] == '  lambda_kd = 1.0 (seed default)'
