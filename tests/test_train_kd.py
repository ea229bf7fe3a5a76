"""Every --kd_mode through train_kd.py's real entry point on a tiny dataset,
with teacher and student checkpoints saved by train_base.py."""
import csv
import json
import math
import re

import pytest
import torch

import train_kd
from conftest import distill_argv
from kd_losses import METHODS

# Settings that make each method's run tiny (applied where the method has the flag).
TINY = {'init_epochs': 1, 'para_epochs': 1, 'warmup_epochs': 0, 'nce_n': 16, 'feat_dim': 16}
# KD weights meant for trained networks that blow a one-epoch run on the tiny data up
# (SemCKD's 400 against the tiny teacher's large maps): these runs give their own.
TINY_LAMBDA = {'semckd': 1.0}


def kd_args(base_run, save_root, mode, epochs=1, extra=()):
    args = distill_argv(base_run, save_root, mode, mode, epochs, 32, ['--print_freq', '2'])
    for flag, value in TINY.items():
        if flag in METHODS[mode].flags:
            args += [f'--{flag}', str(value)]
    if mode in TINY_LAMBDA and '--lambda_kd' not in extra:
        args += ['--lambda_kd', str(TINY_LAMBDA[mode])]
    return args + list(extra)


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# The seed's hyperparameters on CIFAR-10 (its README and scripts; README.md's methods
# table), written out here: a run that leaves a flag out must train with these.
SEED_DEFAULTS = {
    'ab': {'lambda_kd': 10.0, 'm': 2.0, 'init_epochs': 50},
    'afd': {'lambda_kd': 500.0, 'att_f': 1.0},
    'at': {'lambda_kd': 1000.0, 'p': 2.0},
    'bss': {'lambda_kd': 2.0, 'T': 3.0, 'attack_size': 32, 'warmup_epochs': 10},
    'cc': {'lambda_kd': 100.0, 'gamma': 0.4, 'P_order': 2},
    'crd': {'lambda_kd': 0.2, 'feat_dim': 128, 'nce_n': 16384, 'nce_t': 0.1, 'nce_mom': 0.5,
            'mode': 'exact'},
    'fitnet': {'lambda_kd': 0.1},
    'fsp': {'lambda_kd': 1.0, 'init_epochs': 50},
    'ft': {'lambda_kd': 200.0, 'k': 0.5, 'para_epochs': 30},
    'irg': {'lambda_kd': 1.0, 'w_irg_vert': 0.1, 'w_irg_edge': 5.0, 'w_irg_tran': 5.0},
    'logits': {'lambda_kd': 0.1},
    'lwm': {'lambda_kd': 0.4},
    'nst': {'lambda_kd': 10.0},
    'ofd': {'lambda_kd': 0.5},
    'pkt': {'lambda_kd': 10000.0},
    'rkd': {'lambda_kd': 1.0, 'w_dist': 25.0, 'w_angle': 50.0},
    'sobolev': {'lambda_kd': 20.0},
    'sp': {'lambda_kd': 3000.0},
    'st': {'lambda_kd': 0.1, 'T': 4.0},
    'vid': {'lambda_kd': 1.0, 'sf': 1.0, 'init_var': 5.0},
}


def logged_setting(log, name, value, source):
    """The start-of-run line `name = value (source)`; the source of a default is
    '[seed ]default for MODE on cifar10'."""
    return re.search(rf'^\s*{re.escape(name)} = {re.escape(str(value))} \({source}\)$', log, re.M)


def student_weights(run_dir):
    return torch.load(run_dir / 'checkpoint.pth.tar', weights_only=True)['net']


@pytest.fixture(scope='module')
def ce_only_runs(base_run, tmp_path_factory):
    """Students trained with --lambda_kd 0 (CE alone), run on demand and kept: one
    shared run of a method without pre-training phases (every such mode then takes
    exactly the same steps), or one of the mode itself."""
    cache = {}

    def get(mode, ce_weight):
        key = (mode, ce_weight)
        if key not in cache:
            root = tmp_path_factory.mktemp(f'ce_only_{mode}')
            train_kd.main(kd_args(base_run, root, mode,
                                  extra=['--lambda_kd', '0', '--ce_weight', str(ce_weight)]))
            cache[key] = student_weights(root / mode)
        return cache[key]
    return get


@pytest.mark.parametrize('mode', sorted(METHODS))
def test_every_mode_trains_and_evaluates(base_run, tmp_path, mode, ce_only_runs):
    train_kd.main(kd_args(base_run, tmp_path, mode))
    run_dir = tmp_path / mode
    for name in ('checkpoint.pth.tar', 'model_best.pth.tar', 'log.txt', 'metrics.csv', 'args.json'):
        assert (run_dir / name).is_file(), name
    rows = read_rows(run_dir / 'metrics.csv')
    main = [r for r in rows if r['phase'] == 'main']
    assert len(main) == 1
    for r in rows:
        for key in ('train_loss', 'train_ce', 'train_kd', 'test_loss', 'test_top1'):
            if r.get(key, '') != '':
                assert math.isfinite(float(r[key])), (key, r)
    assert float(main[0]['kd_weight']) >= 0 and 0 <= float(main[0]['test_top1']) <= 100
    ckpt = torch.load(run_dir / 'checkpoint.pth.tar', weights_only=True)
    assert ckpt['epoch'] == 1 and 'distiller' in ckpt
    init = torch.load(base_run['initial'], weights_only=True)['net']
    moved = max((ckpt['net'][k] - v).abs().max() for k, v in init.items() if v.is_floating_point())
    assert moved > 1e-4, 'the student did not train'
    log = (run_dir / 'log.txt').read_text()
    # the value each setting took, and why: the seed's default unless the test gave it
    default = rf'(seed )?default for {mode} on cifar10'
    for name, value in SEED_DEFAULTS.get(mode, {}).items():
        if name in TINY:
            assert logged_setting(log, name, TINY[name], 'command line'), name
        else:
            assert logged_setting(log, name, value, default), (name, value)
    if mode in SEED_DEFAULTS:
        # the default lambda is what the main schedule trains with (its KD weight in the
        # one epoch: 1, or 0 after AB's and FSP's initialisation phase)
        assert float(main[0]['kd_weight']) == pytest.approx(
            0.0 if mode in ('ab', 'fsp') else SEED_DEFAULTS[mode]['lambda_kd'])
    elif mode in TINY_LAMBDA:
        assert logged_setting(log, 'lambda_kd', TINY_LAMBDA[mode], 'command line')
    else:  # a method the seed does not have: its own default is logged
        assert re.search(rf'^\s*lambda_kd = \S+ \({default}\)$', log, re.M)
    # The KD term must change what the student learns: compare with the same run
    # with --lambda_kd 0. Modes with pre-training phases (AB and FSP, whose KD lives
    # in the initialisation phase; FT's paraphraser) or no KD in the main epoch are
    # compared with their own CE-only run; every other mode with one shared run.
    # (A method whose student is wrapped, e.g. with another head, has other weights
    # than the shared run's: it is compared with its own CE-only run too; so is a
    # two-view mode, whose CE reads both views.)
    pretrained = any(r['phase'] != 'main' for r in rows)
    ce_weight = float(json.load(open(run_dir / 'args.json'))['args'].get('ce_weight', 1.0))
    own = pretrained or float(main[0]['kd_weight']) == 0 or len(METHODS[mode].views) > 1
    ce_only = ce_only_runs(mode if own else 'logits', ce_weight)
    if set(ce_only) != set(ckpt['net']):
        ce_only = ce_only_runs(mode, ce_weight)
    kd_effect = max((ckpt['net'][k].float() - v.float()).abs().max()
                    for k, v in ce_only.items() if v.is_floating_point())
    assert kd_effect > 1e-4, f'{mode}: the KD term did not change the student ({kd_effect:.3g})'


def test_lambda_from_the_command_line_wins_and_is_logged(base_run, tmp_path):
    train_kd.main(kd_args(base_run, tmp_path, 'st', extra=['--lambda_kd', '0.7', '--p', '3']))
    log = (tmp_path / 'st' / 'log.txt').read_text()
    assert 'lambda_kd = 0.7 (command line)' in log
    assert 'T = 4.0 (default for st on cifar10)' in log
    assert 'ignored (not read by st): --p' in log
    assert float(read_rows(tmp_path / 'st' / 'metrics.csv')[0]['kd_weight']) == pytest.approx(0.7)


@pytest.mark.parametrize('mode', ['ab', 'fsp'])
def test_initialisation_stage_then_ce_only(base_run, tmp_path, mode):
    train_kd.main(kd_args(base_run, tmp_path, mode, epochs=2, extra=['--init_epochs', '2']))
    rows = read_rows(tmp_path / mode / 'metrics.csv')
    assert [r['phase'] for r in rows] == ['init', 'init', 'main', 'main']
    assert all(float(r['train_loss']) > 0 for r in rows[:2])       # the KD loss alone
    assert all(r['test_top1'] == '' for r in rows[:2])
    assert all(float(r['kd_weight']) == 0 and float(r['train_kd']) == 0 for r in rows[2:])
    assert [float(r['lr']) for r in rows] == pytest.approx([0.01, 0.001, 0.1, 0.01])


def test_ft_pretrains_the_paraphraser_first(base_run, tmp_path):
    train_kd.main(kd_args(base_run, tmp_path, 'ft', extra=['--para_epochs', '2']))
    rows = read_rows(tmp_path / 'ft' / 'metrics.csv')
    assert [r['phase'] for r in rows] == ['paraphraser', 'paraphraser', 'main']
    assert float(rows[1]['train_loss']) < float(rows[0]['train_loss'])  # it learns to reconstruct
    assert float(rows[2]['train_kd']) > 0


def test_bss_schedule(base_run, tmp_path):
    train_kd.main(kd_args(base_run, tmp_path, 'bss', epochs=5, extra=['--warmup_epochs', '2']))
    rows = read_rows(tmp_path / 'bss' / 'metrics.csv')
    weights = [float(r['kd_weight']) for r in rows]
    lam = METHODS['bss'].defaults['lambda_kd']
    # warm-up, then lambda * (1 - 5/4 * (epoch - 1) / epochs), zero in the last 20%
    assert weights == pytest.approx([0, 0, lam * 0.5, lam * 0.25, 0])
    kd = [float(r['train_kd']) for r in rows]
    assert kd[0] == kd[1] == kd[4] == 0 and kd[2] >= 0


@pytest.mark.parametrize('mode', sorted(METHODS))
def test_every_mode_trains_on_the_fast_path(base_run, tmp_path, mode):
    """bf16 autocast and channels-last (the CUDA defaults) run on CPU too:
    every method's loss works with them and stays finite and float32."""
    extra = ['--amp', '--channels_last', '--batch_size', '50']
    if mode == 'bss':
        extra += ['--attack_size', '4']  # bf16 on CPU is slow
    train_kd.main(kd_args(base_run, tmp_path, mode, extra=extra))
    rows = read_rows(tmp_path / mode / 'metrics.csv')
    for r in rows:
        for key in ('train_loss', 'train_ce', 'train_kd', 'test_loss'):
            if r.get(key, '') != '':
                assert math.isfinite(float(r[key])), (key, r)
    args = __import__('json').load(open(tmp_path / mode / 'args.json'))['args']
    assert args['amp'] is True and args['channels_last'] is True
