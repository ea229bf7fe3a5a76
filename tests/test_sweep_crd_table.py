"""The CIFAR-100 benchmark table of the sweep (TABLE=crd) and what decides its
rows: `python -m kd_losses --applies TEACHER STUDENT` says which modes can
distil one network into another without training, and the sweep runs exactly
those, with the benchmark's protocol, skipping the others with the reason."""
import os
import shlex
import subprocess

import pytest
import torch

import train_base
import train_kd
from errors import UserError
from kd_losses import METHODS
from kd_losses.__main__ import applicability, main as kd_losses_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'example_train_script.sh')
BENCHMARK_PAIRS = [
    ('resnet56', 'resnet20'), ('resnet110', 'resnet20'), ('resnet110', 'resnet32'),
    ('resnet32x4', 'resnet8x4'), ('wrn_40_2', 'wrn_16_2'), ('wrn_40_2', 'wrn_40_1'), ('vgg13', 'vgg8'),
    ('vgg13', 'MobileNetV2'), ('ResNet50', 'MobileNetV2'), ('ResNet50', 'vgg8'),
    ('resnet32x4', 'ShuffleV1'), ('resnet32x4', 'ShuffleV2'), ('wrn_40_2', 'ShuffleV1')]


def crd_args(teacher, student, mode, *extra):
    args, _, _ = train_kd.parse_args(['--data_name', 'cifar100', '--protocol', 'crd', '--t_name', teacher,
                                      '--s_name', student, '--kd_mode', mode, '--s_init', '-',
                                      '--t_model', '-', '--device', 'cpu', *extra])
    return args


# ----------------------------------------------------------------------------- --applies

def test_applies_agrees_with_building_the_run():
    """For a pair whose stages differ in width, --applies (meta networks) says
    no exactly for the modes train_kd.py's own build refuses (real networks)."""
    teacher, student = 'wrn_40_2', 'wrn_40_1'
    said = applicability(teacher, student)
    assert set(said) == set(METHODS)
    labels = torch.arange(50000) % 100
    for mode, reason in said.items():
        try:
            train_kd.build_distillation(crd_args(teacher, student, mode), torch.device('cpu'), 50000,
                                        labels, load_weights=False)
            refused = None
        except UserError as e:
            refused = str(e)
        assert (reason is None) == (refused is None), (mode, reason, refused)
        if reason is not None:
            assert reason in refused  # the same ConfigError, without the mode's prefix
    assert said['st'] is None and said['crd'] is None   # the benchmark's published rows
    assert said['fsp'] is not None and 'rb1' in said['fsp']  # FSP needs equal channels


def test_applies_prints_one_line_per_pair_and_why(capsys):
    kd_losses_main(['--applies', 'wrn_40_2', 'wrn_40_1', 'resnet56', 'resnet20', '--why'])
    lines = capsys.readouterr().out.splitlines()
    said = applicability('wrn_40_2', 'wrn_40_1')
    skipped = [m for m, r in said.items() if r is not None]
    assert lines[0] == ' '.join(m for m, r in said.items() if r is None)
    assert lines[1:1 + len(skipped)] == [f'# skipped: {m} does not apply to wrn_40_2->wrn_40_1: {said[m]}'
                                         for m in skipped]
    assert lines[1 + len(skipped):] == [' '.join(sorted(METHODS))]  # resnet56 -> resnet20: every mode


@pytest.mark.parametrize('argv, message', [
    (['--applies', 'resnet56'], 'TEACHER STUDENT pairs'),
    (['--applies', 'resnet56', 'resnet21'], "unknown network 'resnet21'; networks: resnet20 resnet110"),
    (['--why'], 'go with --applies')])
def test_applies_bad_input_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        kd_losses_main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith('error: ') and message in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- the sweep's table

def dry_run(**env):
    # one process per KD run (tests/test_sweep_shared.py covers SHARE_TEACHER=1)
    p = subprocess.run(['bash', SCRIPT], env={**os.environ, 'DRY_RUN': '1', 'TABLE': 'crd',
                                              'SHARE_TEACHER': '0', **env},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.splitlines()
    return [shlex.split(line) for line in lines if line and not line.startswith('#')], lines


def flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def short(net):
    return 'r' + net[len('resnet'):] if net.startswith('resnet') else net


def test_the_benchmark_table_runs_every_applicable_mode_of_its_13_pairs(tmp_path):
    cmds, lines = dry_run(RESULTS=str(tmp_path), SEEDS='1 2')
    base = [c for c in cmds if c[2] == 'train_base.py']
    kd = [c for c in cmds if c[2] == 'train_kd.py' and '--optimizer' not in c]
    dot = [c for c in cmds if c[2] == 'train_kd.py' and '--optimizer' in c]
    assert sorted(cmds) == sorted(base + kd + dot) and cmds[:len(base)] == base  # baselines first (they
    # teach); no DML in the benchmark. KD with DOT where mdistiller runs it (configs/cifar100/dot/*.yaml):
    assert [(flag(c, '--t_name'), flag(c, '--s_name'), flag(c, '--kd_mode'), flag(c, '--optimizer'),
             flag(c, '--note')) for c in dot] == [
        (t, s, 'st', 'dot', f'st_dot-c100-{short(t)}-{short(s)}-crd-s{seed}') for seed in '12'
        for t, s in (('resnet32x4', 'resnet8x4'), ('vgg13', 'vgg8'), ('resnet32x4', 'ShuffleV2'))]
    nets = sorted({n for p in BENCHMARK_PAIRS for n in p})
    assert sorted(flag(c, '--net_name') for c in base) == sorted(nets * 2)
    pairs = list(dict.fromkeys((flag(c, '--t_name'), flag(c, '--s_name')) for c in kd))
    assert pairs == BENCHMARK_PAIRS
    # each pair: every registered mode either runs (once per seed) or is skipped
    # once with its reason (test_applies_agrees_with_building_the_run checks the reasons)
    skipped = [line for line in lines if line.startswith('# skipped: ')]
    assert len(skipped) + len(kd) // 2 == len(BENCHMARK_PAIRS) * len(METHODS)
    for t, s in BENCHMARK_PAIRS:
        for seed in '12':
            ran = [flag(c, '--kd_mode') for c in kd
                   if (flag(c, '--t_name'), flag(c, '--s_name'), flag(c, '--seed')) == (t, s, seed)]
            why = {line.split(' ')[2]: line.split(f' to {t}->{s}: ', 1)[1] for line in skipped
                   if f' to {t}->{s}: ' in line}
            assert sorted(ran + list(why)) == sorted(METHODS) and not set(ran) & set(why), (t, s)
            assert 'st' in ran and 'crd' in ran and all(why.values()), (t, s)  # the published rows run
    for c in base + kd:
        assert flag(c, '--data_name') == 'cifar100' and flag(c, '--protocol') == 'crd'
        assert flag(c, '--epochs') == '240' and '--lr_decay_epochs' not in c
        assert flag(c, '--note').endswith(f"-crd-s{flag(c, '--seed')}")  # apart from the seed table's
    # the benchmark's schedule and loss weights, as train_kd.py resolves the commands
    for c in kd[::7]:
        args = train_kd.parse_args(c[3:] + ['--device', 'cpu'])[0]
        small = args.s_name in ('MobileNetV2', 'ShuffleV1', 'ShuffleV2')
        # the benchmark's lr, or the method's own official one (MLKD: 0.025) for the larger students
        lr = 0.01 if small else METHODS[args.kd_mode].schedule_defaults.get('crd', {}).get('lr', 0.05)
        assert (args.batch_size, args.lr, args.lr_decay_epochs, args.weight_decay, args.nesterov) == \
            (64, lr, [150, 180, 210], 5e-4, False)
        # the protocol's weight, or the pair's own where an official config sets one
        expected = METHODS[args.kd_mode].resolve('cifar100', 'crd', args.t_name, args.s_name)
        assert args.lambda_kd == expected['lambda_kd'].value


def test_a_shorter_benchmark_schedule_keeps_its_shape_and_its_runs_apart(tmp_path):
    cmds, _ = dry_run(RESULTS=str(tmp_path), PAIRS='wrn_40_2:wrn_40_1', MODES='', EPOCHS='30')
    assert [flag(c, '--net_name') for c in cmds] == ['wrn_40_1', 'wrn_40_2']
    for c in cmds:
        assert flag(c, '--epochs') == '30' and '--lr_decay_epochs' not in c
        assert flag(c, '--note').endswith('-crd-s2-e30')
    # the protocol keeps its decays at the same fractions of 30 epochs as 150, 180, 210 of 240
    args = train_base.parse_args(cmds[0][3:] + ['--device', 'cpu'])
    assert args.lr_decay_epochs == [19, 23, 26] and args.epochs == 30
    cmds, _ = dry_run(RESULTS=str(tmp_path), PAIRS='wrn_40_2:wrn_40_1', MODES='', EPOCHS='1')
    args = train_base.parse_args(cmds[0][3:] + ['--device', 'cpu'])
    assert args.epochs == 1 and args.lr_decay_epochs == [1, 1, 1]  # a one-epoch check run keeps lr


# ----------------------------------------------------------------------------- SCHEDULES=authors

def test_own_epochs_lists_the_modes_whose_authors_train_a_pair_longer(capsys):
    kd_losses_main(['--own_epochs', 'vgg13', 'MobileNetV2', 'resnet32x4', 'resnet8x4', 'resnet32x4', 'ShuffleV2'])
    assert capsys.readouterr().out.splitlines() == ['mlkd:480', '', 'mlkd:960']
    kd_losses_main(['--own_epochs', 'vgg13', 'MobileNetV2', '--protocol', 'seed'])  # crd's configs only
    assert capsys.readouterr().out == '\n'


def test_authors_schedules_give_those_runs_their_length_and_leave_the_rest(tmp_path):
    pairs = 'vgg13:MobileNetV2 resnet32x4:resnet8x4 resnet32x4:ShuffleV2'
    table, _ = dry_run(RESULTS=str(tmp_path), PAIRS=pairs, MODES='mlkd st', SHARE_TEACHER='1')
    authors, _ = dry_run(RESULTS=str(tmp_path), PAIRS=pairs, MODES='mlkd st', SHARE_TEACHER='1',
                         SCHEDULES='authors')
    own = {(flag(c, '--t_name'), flag(c, '--s_name')): c for c in authors
           if c[2] == 'train_kd.py' and flag(c, '--kd_mode') == 'mlkd'}
    assert sorted(own) == sorted(tuple(p.split(':')) for p in pairs.split())
    for (teacher, student), length in ((('vgg13', 'MobileNetV2'), 480), (('resnet32x4', 'ShuffleV2'), 960)):
        c = own[(teacher, student)]
        assert '--epochs' not in c and flag(c, '--protocol') == 'crd'
        assert flag(c, '--note') == f'mlkd-c100-{short(teacher)}-{student}-crd-s2-e{length}'
        args = train_kd.parse_args(c[3:] + ['--device', 'cpu'])[0]   # the authors' schedule resolves
        assert (args.epochs, args.lr, args.lr_decay_epochs) == (length, 0.01, [150, 180, 210])
        assert c[c.index('--s_init') + 1] == (f'{tmp_path}/base/base-c100-{student}-crd-s2/'
                                              f'initial_{student}.pth.tar')  # the table's own baselines
    # every other command is the table's, unchanged
    longer = [own[('vgg13', 'MobileNetV2')], own[('resnet32x4', 'ShuffleV2')]]
    assert sorted(c for c in authors if c not in longer) == \
        sorted(c for c in table if not (c[2] == 'train_kd.py' and flag(c, '--kd_mode') == 'mlkd'
                                        and flag(c, '--s_name') != 'resnet8x4'))


@pytest.mark.parametrize('env', [{'TABLE': 'seed'}, {'EPOCHS': '30'}])
def test_authors_schedules_need_the_benchmark_at_its_length(env):
    p = subprocess.run(['bash', SCRIPT], env={**os.environ, 'DRY_RUN': '1', 'TABLE': 'crd',
                                              'SCHEDULES': 'authors', **env},
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 2 and p.stdout == '' and len(p.stderr.splitlines()) == 1, p.stderr
    assert p.stderr.startswith('error: SCHEDULES=authors') and 'TABLE=crd' in p.stderr
