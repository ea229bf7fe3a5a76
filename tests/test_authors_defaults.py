"""Each method's defaults are its authors' setting, cited: the values the
official repositories set (written here as the literal cited values, with
the file they come from), the per-pair settings under --protocol crd
(MLKD's per-pair schedules too) and their precedence, the log line naming each value's source, the registry's
checks of pair_defaults, and `python -m kd_losses --defaults MODE --pair T:S`."""
import dataclasses
import os

import pytest

import kd_losses.dkd
import kd_losses.st
import train_kd
import utils
from flags import schedule_lines
from conftest import StopRun, distill_argv
from kd_losses import METHODS, Flag, Method, PairSetting, register
from kd_losses.__main__ import main as kd_losses_main
from kd_losses.registry import COMMON_DEFAULTS


def one_line(text):
    return ' '.join(text.split())


def resolved(mode, teacher='resnet56', student='resnet20', protocol='crd', extra=()):
    """(args, sources) of a train_kd.py run of `mode`, as parse_args resolves them."""
    args, sources, _ = train_kd.parse_args([
        '--data_name', 'cifar100', '--protocol', protocol, '--t_name', teacher, '--s_name', student,
        '--kd_mode', mode, '--s_init', '-', '--t_model', '-', '--device', 'cpu', *extra])
    return args, sources


# ----------------------------------------------------------------------------- logit standardisation

@pytest.mark.parametrize('protocol', ['seed', 'crd'])
def test_st_with_logit_stand_is_the_authors_setting(protocol):
    # sunshangquan/logit-standardization-KD mdistiller/engine/cfg.py lines 62-65:
    # KD.TEMPERATURE 2, KD.LOSS.CE_WEIGHT 0.1, KD.LOSS.KD_WEIGHT 9 (tools/train.py
    # lines 103-104 and 112-114 set the same for KD under --logit-stand)
    args, sources = resolved('st', protocol=protocol, extra=['--logit_stand'])
    assert (args.T, args.ce_weight, args.lambda_kd) == (2.0, 0.1, 9.0)
    assert sources['ce_weight'] == 'default for st with --logit_stand'
    assert 'mdistiller/engine/cfg.py lines 62-65' in one_line(kd_losses.st.__doc__)


@pytest.mark.parametrize('protocol', ['seed', 'crd'])
def test_dkd_with_logit_stand_is_the_authors_setting(protocol):
    # logit-standardization-KD tools/train.py lines 103-104 (--base-temp 2, --kd-weight 9)
    # and 115-118 (DKD: ALPHA and BETA times the KD weight, T the base temperature);
    # mdistiller/engine/cfg.py line 164 (DKD.CE_WEIGHT 1.0)
    args, sources = resolved('dkd', protocol=protocol, extra=['--logit_stand'])
    assert (args.T, args.lambda_kd, args.ce_weight, args.dkd_alpha) == (2.0, 9.0, 1.0, 1.0)
    assert sources['T'] == sources['lambda_kd'] == 'default for dkd with --logit_stand'
    assert 'tools/train.py lines 103-104 (--base-temp 2, --kd-weight 9) and 115-118' in \
        one_line(kd_losses.dkd.__doc__)
    # off, DKD's own configuration (mdistiller engine/cfg.py lines 163-167: T 4, weight 1)
    off, _ = resolved('dkd', protocol=protocol)
    assert (off.T, off.lambda_kd) == (4.0, 1.0)


def test_a_flag_given_wins_over_the_switch():
    args, sources = resolved('st', extra=['--logit_stand', '--T', '3', '--ce_weight', '1'])
    assert (args.T, args.ce_weight, args.lambda_kd) == (3.0, 1.0, 9.0)
    assert sources['T'] == sources['ce_weight'] == 'command line'


# ----------------------------------------------------------------------------- per-pair values

# megvii-research/mdistiller configs/cifar100/dkd/*.yaml, line 19 `DKD: BETA` where
# set; the others keep engine/cfg.py line 165, BETA 8.0
DKD_BETA = {
    'resnet56:resnet20': 2.0,     # res56_res20.yaml
    'resnet110:resnet32': 2.0,    # res110_res32.yaml
    'vgg13:vgg8': 6.0,            # vgg13_vgg8.yaml
    'vgg13:MobileNetV2': 6.0,     # vgg13_mv2.yaml
    'wrn_40_2:wrn_16_2': 6.0,     # wrn40_2_wrn_16_2.yaml
    'wrn_40_2:wrn_40_1': 6.0,     # wrn40_2_wrn_40_1.yaml
    'resnet32x4:resnet8x4': 8.0,  # res32x4_res8x4.yaml (no override)
    'resnet32x4:ShuffleV1': 8.0,  # res32x4_shuv1.yaml
    'resnet32x4:ShuffleV2': 8.0,  # res32x4_shuv2.yaml
    'ResNet50:MobileNetV2': 8.0,  # res50_mv2.yaml
    'wrn_40_2:ShuffleV1': 8.0,    # wrn40_2_shuv1.yaml
}
# GzyAftermath/CAT-KD configs/cifar100/CAT_KD/*.yaml: CAT_loss_weight, CAM_RESOLUTION, IF_NORMALIZE
CATKD = {
    'resnet56:resnet20': (0.7, 2, False),      # res56_res20.yaml
    'resnet110:resnet32': (1.8, 2, False),     # res110_res32.yaml
    'resnet32x4:resnet8x4': (15.0, 2, False),  # res32x4_res8x4.yaml
    'resnet32x4:ShuffleV1': (600.0, 4, True),  # res32x4_shuv1.yaml
    'resnet32x4:ShuffleV2': (600.0, 4, True),  # res32x4_shuv2.yaml
    'ResNet50:MobileNetV2': (40.0, 2, True),   # res50_mv2.yaml
    'vgg13:vgg8': (4.5, 2, False),             # vgg13_vgg8.yaml
    'vgg13:MobileNetV2': (15.0, 2, True),      # vgg13_mv2.yaml
    'wrn_40_2:wrn_16_2': (12.0, 2, False),     # wrn_40_2_wrn_16_2.yaml
    'wrn_40_2:wrn_40_1': (1.5, 2, False),      # wrn_40_2_wrn_40_1.yaml
    'wrn_40_2:ShuffleV1': (80.0, 4, True),     # wrn40_2_shuv1.yaml
}
# dvlab-research/ReviewKD CIFAR-100/script/reviewKD.sh, --kd-loss-weight per line
REVIEWKD = {
    'wrn_40_2:wrn_16_2': 5.0,     # line 1
    'wrn_40_2:wrn_40_1': 5.0,     # line 3
    'wrn_40_2:ShuffleV1': 5.0,    # line 5
    'resnet32x4:resnet8x4': 5.0,  # line 7
    'resnet32x4:ShuffleV1': 5.0,  # line 9
    'resnet32x4:ShuffleV2': 8.0,  # line 11
    'resnet56:resnet20': 0.6,     # line 13
    'resnet110:resnet32': 1.0,    # line 15
}


def test_the_pair_values_are_the_official_configs():
    assert {k: p.values for k, p in METHODS['dkd'].pair_defaults.items()} == \
        {k: {'dkd_beta': v} for k, v in DKD_BETA.items()}
    assert {k: p.values for k, p in METHODS['catkd'].pair_defaults.items()} == \
        {k: {'lambda_kd': b, 'cat_resolution': r, 'cat_normalize': n} for k, (b, r, n) in CATKD.items()}
    assert {k: p.values for k, p in METHODS['reviewkd'].pair_defaults.items()} == \
        {k: {'lambda_kd': v} for k, v in REVIEWKD.items()}
    assert METHODS['dkd'].pair_defaults['vgg13:MobileNetV2'].source == \
        'mdistiller configs/cifar100/dkd/vgg13_mv2.yaml line 19'
    assert METHODS['reviewkd'].pair_defaults['resnet56:resnet20'].source == \
        'ReviewKD CIFAR-100/script/reviewKD.sh line 13'
    # every method with per-pair values names a file for each
    for m in METHODS.values():
        for key, setting in m.pair_defaults.items():
            assert setting.source and ('.yaml' in setting.source or '.sh' in setting.source), (m.name, key)


@pytest.mark.parametrize('pair, beta', sorted(DKD_BETA.items()))
def test_protocol_crd_takes_the_pairs_beta(pair, beta):
    teacher, student = pair.split(':')
    args, sources = resolved('dkd', teacher, student)
    assert args.dkd_beta == beta
    assert sources['dkd_beta'].startswith(f'default for dkd on cifar100 under --protocol crd for '
                                          f'{teacher}->{student} (mdistiller configs/cifar100/dkd/')


def test_catkd_resnet32x4_to_resnet8x4_takes_its_own_weight():
    args, sources = resolved('catkd', 'resnet32x4', 'resnet8x4')
    assert (args.lambda_kd, args.cat_resolution, args.cat_normalize) == (15.0, 2, False)
    assert sources['lambda_kd'].endswith('(CAT-KD configs/cifar100/CAT_KD/res32x4_res8x4.yaml)')
    # a benchmark pair with no official config keeps the protocol's (resnet56 -> resnet20's)
    args, sources = resolved('catkd', 'resnet110', 'resnet20')
    assert args.lambda_kd == 0.7 and sources['lambda_kd'] == \
        'default for catkd on cifar100 under --protocol crd'


def test_pair_values_hold_under_protocol_crd_only():
    args, sources = resolved('dkd', 'resnet56', 'resnet20', protocol='seed')
    assert args.dkd_beta == 8.0 and sources['dkd_beta'] == 'default for dkd on cifar100'
    args, _ = resolved('reviewkd', 'resnet56', 'resnet20', protocol='seed')
    assert args.lambda_kd == 5.0


def test_the_command_line_wins_over_the_pair_and_a_switch_keeps_the_pairs_beta():
    args, sources = resolved('dkd', extra=['--dkd_beta', '5'])
    assert args.dkd_beta == 5.0 and sources['dkd_beta'] == 'command line'
    args, sources = resolved('dkd', extra=['--logit_stand'])  # the switch sets T and the weight only
    assert (args.dkd_beta, args.T, args.lambda_kd) == (2.0, 2.0, 9.0)
    assert 'res56_res20.yaml' in sources['dkd_beta']


def test_precedence_switch_pair_protocol_dataset_method():
    """One setting given at every level: each level wins over those below it."""
    levels = dict(defaults={'lambda_kd': 1.0, 'on': False},
                  dataset_defaults={'cifar100': {'lambda_kd': 2.0}},
                  protocol_defaults={'crd': {'lambda_kd': 3.0}},
                  pair_defaults={'resnet56:resnet20': PairSetting({'lambda_kd': 4.0}, 'x.yaml')},
                  switch_defaults={'on': {'lambda_kd': 5.0}})
    flags = {'on': Flag(bool, 'a switch')}

    def value(given=(), pair=('resnet56', 'resnet20'), protocol='crd', **drop):
        m = Method(name='prec', title='', paper='', transfers='', build=None, flags=flags,
                   **{k: v for k, v in levels.items() if k not in drop})
        return m.resolve('cifar100', protocol, *pair, given)['lambda_kd']

    assert value({'on': True}).value == 5.0 and value({'on': True}).level == 'switch'
    assert value().value == 4.0 and value().where.endswith('for resnet56->resnet20 (x.yaml)')
    assert value(pair=('resnet32x4', 'resnet8x4')).value == 3.0
    assert value(protocol='seed').value == 2.0
    assert value(protocol='seed', dataset_defaults=None).value == 1.0
    assert Method(name='p', title='', paper='', transfers='', build=None, defaults={'lambda_kd': 1}) \
        .resolve('cifar10')['ce_weight'].value == COMMON_DEFAULTS['ce_weight']


def test_a_pairs_number_of_epochs_scales_as_the_protocols(monkeypatch):
    """A pair's epochs are meant for the protocol's 240-epoch schedule: 60 of
    them are 30 of a 120-epoch run, and the source says so."""
    pair = PairSetting({'init_epochs': 60}, 'some-repo r32x4_r8x4.sh line 3')
    monkeypatch.setitem(METHODS, 'ab', dataclasses.replace(
        METHODS['ab'], pair_defaults={'resnet32x4:resnet8x4': pair}))
    args, sources = resolved('ab', 'resnet32x4', 'resnet8x4', extra=['--epochs', '120'])
    assert args.init_epochs == 30
    assert sources['init_epochs'] == ('default for ab on cifar100 under --protocol crd for '
                                      'resnet32x4->resnet8x4 (some-repo r32x4_r8x4.sh line 3), '
                                      '60 of 240 epochs scaled to 120')


# ----------------------------------------------------------------------------- the log

@pytest.fixture
def stop_before_training(monkeypatch):
    def stop(*args, **kwargs):
        raise StopRun
    monkeypatch.setattr(utils, 'fit', stop)


def test_the_log_names_the_source_of_each_pair_value(base_run, tmp_path, stop_before_training,
                                                      monkeypatch):
    """The tiny run is resnet20 -> resnet20, so DKD is given a pair setting
    for it here."""
    pair = PairSetting({'dkd_beta': 3.0}, 'some-repo configs/r20_r20.yaml line 7')
    monkeypatch.setitem(METHODS, 'dkd', dataclasses.replace(
        METHODS['dkd'], pair_defaults={'resnet20:resnet20': pair}))
    with pytest.raises(StopRun):
        train_kd.main(distill_argv(base_run, tmp_path, 'p', 'dkd', epochs=24,
                                   extra=['--protocol', 'crd', '--compile', 'off']))
    with open(os.path.join(tmp_path, 'p', 'log.txt')) as f:
        lines = f.read().splitlines()
    where = ('default for dkd on cifar10 under --protocol crd for resnet20->resnet20 '
             '(some-repo configs/r20_r20.yaml line 7)')
    assert f'  dkd_beta = 3.0 ({where})' in lines
    assert '  dkd_alpha = 1.0 (default for dkd on cifar10 under --protocol crd)' in lines


# ----------------------------------------------------------------------------- a pair's own schedule

# MLKD's official schedules (Jin-Ying/Multi-Level-Logit-Distillation
# configs/cifar100/ours/*.yaml): 240 epochs at lr 0.025 except these students,
# at lr 0.01 for longer, every one with its decays at 150, 180, 210.
MLKD_LONGER = {('vgg13', 'MobileNetV2'): 480, ('ResNet50', 'MobileNetV2'): 480,
               ('wrn_40_2', 'ShuffleV1'): 480, ('resnet32x4', 'ShuffleV1'): 960,
               ('resnet32x4', 'ShuffleV2'): 960}
BENCHMARK_PAIRS = [('resnet56', 'resnet20'), ('resnet110', 'resnet20'), ('resnet110', 'resnet32'),
                   ('resnet32x4', 'resnet8x4'), ('wrn_40_2', 'wrn_16_2'), ('wrn_40_2', 'wrn_40_1'),
                   ('vgg13', 'vgg8'), ('vgg13', 'MobileNetV2'), ('ResNet50', 'MobileNetV2'),
                   ('ResNet50', 'vgg8'), ('resnet32x4', 'ShuffleV1'), ('resnet32x4', 'ShuffleV2'),
                   ('wrn_40_2', 'ShuffleV1')]


@pytest.mark.parametrize('teacher, student', BENCHMARK_PAIRS)
def test_mlkd_takes_its_official_schedule_of_each_pair_under_protocol_crd(teacher, student):
    args, sources = resolved('mlkd', teacher, student)
    longer = MLKD_LONGER.get((teacher, student))
    small = student in ('MobileNetV2', 'ShuffleV1', 'ShuffleV2')
    assert (args.epochs, args.lr, args.lr_decay_epochs, args.batch_size) == \
        (longer or 240, 0.01 if small else 0.025, [150, 180, 210], 64)
    if longer:  # the log names the pair's config for each value
        config = {'vgg13': 'vgg13', 'ResNet50': 'res50', 'wrn_40_2': 'wrn40_2', 'resnet32x4': 'res32x4'}[teacher]
        config += '_' + {'MobileNetV2': 'mv2', 'ShuffleV1': 'shuv1', 'ShuffleV2': 'shuv2'}[student]
        for name in ('epochs', 'lr', 'lr_decay_epochs'):
            assert sources[name] == (f'default for mlkd under --protocol crd for {teacher}->{student} '
                                     f'(Multi-Level-Logit-Distillation configs/cifar100/ours/{config}.yaml '
                                     f'lines 11-13)')
        lines = schedule_lines(args, sources)
        assert f'  epochs = {longer} ({sources["epochs"]})' in lines
        assert f'  lr_decay_epochs = 150,180,210 ({sources["lr_decay_epochs"]})' in lines
    else:
        assert sources['epochs'] == '--protocol crd default'
    # other modes keep the benchmark's schedule for the same pair
    st, _ = resolved('st', teacher, student)
    assert (st.epochs, st.lr) == (240, 0.01 if small else 0.05)


def test_a_pairs_schedule_gives_way_to_the_command_line_and_holds_under_crd_only():
    pair = ('resnet32x4', 'ShuffleV2')
    # another length: the benchmark's decays scaled to it (the pair's are for 960 epochs)
    args, sources = resolved('mlkd', *pair, extra=['--epochs', '30'])
    assert (args.epochs, args.lr_decay_epochs, args.lr) == (30, [19, 23, 26], 0.01)
    assert sources['epochs'] == 'command line' and 'scaled to 30' in sources['lr_decay_epochs']
    # the pair's own length given: its decays hold
    args, _ = resolved('mlkd', *pair, extra=['--epochs', '960'])
    assert args.lr_decay_epochs == [150, 180, 210]
    args, sources = resolved('mlkd', *pair, extra=['--lr_decay_epochs', '100,200', '--lr', '0.02'])
    assert (args.epochs, args.lr_decay_epochs, args.lr) == (960, [100, 200], 0.02)
    assert sources['lr'] == sources['lr_decay_epochs'] == 'command line'
    args, _ = resolved('mlkd', *pair, protocol='seed')
    assert (args.epochs, args.lr) == (200, 0.1)


def test_the_cli_prints_a_pairs_schedule(capsys):
    kd_losses_main(['--defaults', 'mlkd', '--pair', 'resnet32x4:ShuffleV1'])
    out = capsys.readouterr().out.splitlines()
    args, sources = resolved('mlkd', 'resnet32x4', 'ShuffleV1')
    start = out.index("schedule, over --protocol crd's when the flag is left out:")
    assert out[start + 1:start + 4] == [f'  {name} = {getattr(args, name)} ({sources[name]})'
                                        for name in ('epochs', 'lr', 'lr_decay_epochs')]
    kd_losses_main(['--defaults', 'mlkd', '--pair', 'resnet32x4:resnet8x4'])
    out = capsys.readouterr().out.splitlines()
    start = out.index("schedule, over --protocol crd's when the flag is left out:")
    assert out[start + 1] == '  lr = 0.025 (default for mlkd under --protocol crd)'
    assert out[start + 2] == 'with --logit_stand:'


# ----------------------------------------------------------------------------- the registry's checks

@pytest.mark.parametrize('pairs, message', [
    ({'resnet56->resnet20': PairSetting({'lambda_kd': 1.0}, 'a.yaml')}, 'not TEACHER:STUDENT'),
    ({'resnet56:resnet21': PairSetting({'lambda_kd': 1.0}, 'a.yaml')}, 'not TEACHER:STUDENT'),
    ({'resnet56:resnet20': PairSetting({'beta': 1.0}, 'a.yaml')}, 'undeclared flags'),
    ({'resnet56:resnet20': PairSetting({'lambda_kd': 1.0}, '')}, 'and a source'),
    ({'resnet56:resnet20': PairSetting({}, 'a.yaml')}, 'values (or a schedule) and a source'),
    ({'resnet56:resnet20': PairSetting({}, 'a.yaml', schedule={'lr_decay_epochs': [150]})},
     'lr decays without the epochs'),
    ({'resnet56:resnet20': {'lambda_kd': 1.0}}, 'must be a PairSetting'),
])
def test_register_refuses_bad_pair_defaults(pairs, message):
    method = Method(name='bad_pairs', title='', paper='', transfers='', build=None,
                    defaults={'lambda_kd': 1.0}, pair_defaults=pairs)
    with pytest.raises(ValueError) as error:
        register(method)
    assert message in str(error.value)
    assert 'bad_pairs' not in METHODS


# ----------------------------------------------------------------------------- python -m kd_losses --defaults

def test_the_cli_prints_each_setting_with_its_value_and_source(capsys):
    kd_losses_main(['--defaults', 'dkd', '--pair', 'resnet56:resnet20'])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == 'dkd on cifar100 under --protocol crd for resnet56->resnet20:'
    assert ('  dkd_beta = 2.0 (default for dkd on cifar100 under --protocol crd for '
            'resnet56->resnet20 (mdistiller configs/cifar100/dkd/res56_res20.yaml line 19))') in out
    # what a run resolves, setting by setting
    args, sources = resolved('dkd')
    block = out[1:out.index('with --logit_stand:')]
    assert block == [f'  {name} = {getattr(args, name)} ({sources[name]})'
                     for name in METHODS['dkd'].defaults_for('cifar100', 'crd')]
    assert out[out.index('with --logit_stand:') + 1:] == [
        '  lambda_kd = 9.0 (default for dkd with --logit_stand)',
        '  T = 2.0 (default for dkd with --logit_stand)']


@pytest.mark.parametrize('argv, message', [
    (['--defaults', 'nope'], "unknown mode 'nope'"),
    (['--defaults', 'dkd', '--pair', 'resnet56'], 'is not TEACHER:STUDENT of known networks'),
    (['--defaults', 'dkd', '--pair', 'resnet56:resnet21'], 'is not TEACHER:STUDENT'),
    (['--pair', 'resnet56:resnet20'], '--pair goes with --defaults'),
    (['--defaults', 'dkd', '--protocol', 'nope'], "--protocol 'nope' is unknown"),
])
def test_the_cli_refuses_bad_input_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        kd_losses_main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith('error: ') and message in err
    assert len(err.splitlines()) == 1
