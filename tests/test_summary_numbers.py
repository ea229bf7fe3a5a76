"""The summary's numbers (python summarize.py ROOT) against hand computations:
mean and sample standard deviation over seeds, best / last by the reporting
rule (best = max over the main phase's epochs, last = its last epoch), the
mark of unfinished runs, and what counts as one experiment (seeds, paths and
flags the method does not read do not split it; two runs of one seed are one
replicate; a failed run's numbers are left out)."""
import csv
import json
import math
import os

import pytest

import summarize

COMMON = {'data_name': 'cifar10', 'epochs': 4, 'lr': 0.1, 'batch_size': 128}
KD = {**COMMON, 't_name': 'resnet110', 's_name': 'resnet20', 'kd_mode': 'st', 'lambda_kd': 0.1,
      'T': 4.0, 'p': None}


def fake_run(root, note, args, main_top1, pre_rows=(), script='train_kd.py', complete=None,
             error=None):
    """A run directory as the training scripts write it: args.json and metrics.csv,
    optionally after pre-training rows (phase 'init') that carry a test accuracy;
    complete.json once every epoch is done (or as `complete` says), and a log.txt
    ending in `error: <error>` for a run that failed."""
    d = os.path.join(root, note)
    os.makedirs(d)
    if complete is None:
        complete = len(main_top1) == args['epochs']
    if complete:
        with open(os.path.join(d, 'complete.json'), 'w') as f:
            json.dump({'epochs': args['epochs']}, f)
    if error:
        with open(os.path.join(d, 'log.txt'), 'w') as f:
            f.write(f'command: python train_kd.py\nepoch 1 ...\nerror: {error}\n')
    with open(os.path.join(d, 'args.json'), 'w') as f:
        json.dump({'script': script, 'args': {**args, 'note': note, 'save_root': root}}, f)
    with open(os.path.join(d, 'metrics.csv'), 'w', newline='') as f:
        w = csv.writer(f)
        w.writerow(['phase', 'phase_index', 'epoch', 'lr', 'test_top1'])
        for e, v in enumerate(pre_rows, start=1):
            w.writerow(['init', 0, e, 0.01, v])
        for e, v in enumerate(main_top1, start=1):
            w.writerow(['main', 1 if pre_rows else 0, e, 0.1, v])
    return d


def run_summary(root, capsys):
    summarize.summary([root, '--csv', os.path.join(root, 'summary.csv')])
    out = capsys.readouterr().out
    with open(os.path.join(root, 'summary.csv')) as f:
        rows = list(csv.DictReader(f))
    return out.splitlines(), rows


def kd_lines(lines):
    return [line for line in lines if line.startswith('| resnet110 | resnet20 | ST')]


# ----------------------------------------------------------------------------- mean ± sample std

def test_three_seeds_mean_and_sample_standard_deviation(tmp_path, capsys):
    root = str(tmp_path)
    # best per seed (max over epochs): 60, 62, 67; last: 55, 58, 64
    fake_run(root, 'st-s1', {**KD, 'seed': 1}, [50, 60, 57, 55])
    fake_run(root, 'st-s2', {**KD, 'seed': 2}, [62, 61, 59, 58])
    fake_run(root, 'st-s3', {**KD, 'seed': 3}, [40, 50, 67, 64])
    # by hand: best mean 63, squared deviations 9 + 1 + 16 = 26, sample variance 26/2 = 13
    #          last mean 59, squared deviations 16 + 1 + 25 = 42, sample variance 42/2 = 21
    best_std, last_std = math.sqrt(13), math.sqrt(21)   # 3.61, 4.58 (population: 2.94, 3.74)
    lines, rows = run_summary(root, capsys)
    assert kd_lines(lines) == ['| resnet110 | resnet20 | ST | 63.00 ± 3.61 / 59.00 ± 4.58 (n=3) |']
    (row,) = rows
    assert row['n'] == '3' and row['complete'] == 'True'
    assert float(row['best_mean']) == pytest.approx(63.0)
    assert float(row['best_std']) == pytest.approx(best_std)
    assert float(row['last_mean']) == pytest.approx(59.0)
    assert float(row['last_std']) == pytest.approx(last_std)
    assert len(row['runs'].split()) == 3


def test_four_seeds_with_non_integer_numbers(tmp_path, capsys):
    root = str(tmp_path)
    bests = [71.25, 70.5, 72.75, 69.5]   # one epoch each: best = last
    for seed, v in enumerate(bests, start=1):
        fake_run(root, f'st-s{seed}', {**KD, 'epochs': 1, 'seed': seed}, [v])
    mean = (71.25 + 70.5 + 72.75 + 69.5) / 4                       # 71.0
    # deviations 0.25, -0.5, 1.75, -1.5: squares 0.0625 + 0.25 + 3.0625 + 2.25 = 5.625
    var = 5.625 / 3                                                  # 1.875
    lines, rows = run_summary(root, capsys)
    std = math.sqrt(var)                                             # 1.3693
    assert kd_lines(lines) == ['| resnet110 | resnet20 | ST | 71.00 ± 1.37 / 71.00 ± 1.37 (n=4) |']
    assert float(rows[0]['best_std']) == pytest.approx(std)
    assert float(rows[0]['best_mean']) == pytest.approx(mean)


def test_mean_std_by_hand():
    m, s = summarize.mean_std([60.0, 62.0, 67.0])
    assert m == pytest.approx(63.0) and s == pytest.approx(math.sqrt(13.0))
    assert summarize.mean_std([42.0]) == (42.0, 0.0)
    assert summarize.mean_std([1.0, 3.0])[1] == pytest.approx(math.sqrt(2.0))  # not 1 (population)


# ----------------------------------------------------------------------------- best / last

def test_best_and_last_come_from_the_main_phase_only(tmp_path, capsys):
    root = str(tmp_path)
    # an initialisation phase whose rows carry a (stray) higher accuracy: not the result
    fake_run(root, 'st-s1', {**KD, 'seed': 1}, [40, 75, 70, 72], pre_rows=[99.0, 98.0])
    lines, rows = run_summary(root, capsys)
    # best = max over the main epochs (75, epoch 2), last = the last main epoch (72)
    assert kd_lines(lines) == ['| resnet110 | resnet20 | ST | 75.00 / 72.00 |']
    run = summarize.read_run(os.path.join(root, 'st-s1'))
    assert run['scores']['net'] == {'best': 75.0, 'last': 72.0}
    assert run['epochs_done'] == 4 and run['complete']


def test_last_is_the_last_epoch_not_the_lowest(tmp_path, capsys):
    root = str(tmp_path)
    fake_run(root, 'st-s1', {**KD, 'seed': 1}, [30, 20, 50, 45])
    lines, _ = run_summary(root, capsys)
    assert kd_lines(lines) == ['| resnet110 | resnet20 | ST | 50.00 / 45.00 |']


# ----------------------------------------------------------------------------- unfinished runs

def test_a_group_with_an_unfinished_seed_is_marked(tmp_path, capsys):
    root = str(tmp_path)
    fake_run(root, 'st-s1', {**KD, 'seed': 1}, [50, 60, 57, 55])
    fake_run(root, 'st-s2', {**KD, 'seed': 2}, [62, 61, 59, 58])
    fake_run(root, 'st-s3', {**KD, 'seed': 3}, [40, 50])           # 2 of 4 epochs so far
    at = {**KD, 'kd_mode': 'at', 'T': None, 'p': 2.0}
    fake_run(root, 'at-s1', {**at, 'seed': 1}, [10, 20, 30, 40])
    fake_run(root, 'at-s2', {**at, 'seed': 2}, [12, 22, 32, 42])
    lines, rows = run_summary(root, capsys)
    (st_line,) = kd_lines(lines)
    assert st_line.endswith(' (n=3) * |'), st_line                 # unfinished: marked
    # the finished group: no mark; best (40, 42) and last (40, 42): 41 ± sqrt(2)
    assert '| resnet110 | resnet20 | AT | 41.00 ± 1.41 / 41.00 ± 1.41 (n=2) |' in lines
    complete = {r['name']: r['complete'] for r in rows}
    assert complete == {'ST': 'False', 'AT': 'True'}


# ----------------------------------------------------------------------------- grouping

def test_seeds_and_paths_do_not_split_a_group_but_a_setting_does(tmp_path, capsys):
    root = str(tmp_path)
    one_epoch = {**KD, 'epochs': 1}
    fake_run(root, 'a', {**one_epoch, 'seed': 1, 'device': 'cuda', 'img_root': '/data'}, [60])
    fake_run(root, 'b', {**one_epoch, 'seed': 2, 'device': 'cpu', 'img_root': '/other'}, [62])
    fake_run(root, 'c', {**one_epoch, 'seed': 1, 'lambda_kd': 0.5}, [70])
    lines, rows = run_summary(root, capsys)
    assert sorted(kd_lines(lines)) == [
        '| resnet110 | resnet20 | ST (lambda_kd=0.1) | 61.00 ± 1.41 / 61.00 ± 1.41 (n=2) |',
        '| resnet110 | resnet20 | ST (lambda_kd=0.5) | 70.00 / 70.00 |']


def test_flags_the_method_ignores_do_not_split_a_group(tmp_path, capsys):
    root = str(tmp_path)
    fake_run(root, 'st-s1', {**KD, 'epochs': 1, 'seed': 1}, [60])
    fake_run(root, 'st-s2', {**KD, 'epochs': 1, 'seed': 2, 'p': 3.0}, [62])  # --p: not read by st
    lines, rows = run_summary(root, capsys)
    assert kd_lines(lines) == ['| resnet110 | resnet20 | ST | 61.00 ± 1.41 / 61.00 ± 1.41 (n=2) |']


def test_a_flag_the_method_reads_still_splits_a_group(tmp_path, capsys):
    root = str(tmp_path)
    fake_run(root, 'st-s1', {**KD, 'epochs': 1, 'seed': 1}, [60])
    fake_run(root, 'st-s2', {**KD, 'epochs': 1, 'seed': 2, 'T': 2.0}, [62])  # --T: read by st
    lines, _ = run_summary(root, capsys)
    assert sorted(kd_lines(lines)) == ['| resnet110 | resnet20 | ST (T=2.0) | 62.00 / 62.00 |',
                                       '| resnet110 | resnet20 | ST (T=4.0) | 60.00 / 60.00 |']


# ----------------------------------------------------------------------------- one replicate per seed

def test_two_runs_of_one_seed_are_one_replicate_the_finished_one(tmp_path, capsys):
    root = str(tmp_path)
    # the same experiment twice with seed 2 (e.g. two save roots): n must stay 1 per seed
    fake_run(root, 'st-s2-old', {**KD, 'seed': 2}, [90, 91])                 # 2 of 4 epochs
    fake_run(root, 'st-s2-new', {**KD, 'seed': 2}, [50, 60, 57, 55])         # finished
    fake_run(root, 'st-s3', {**KD, 'seed': 3}, [62, 61, 59, 58])
    summarize.summary([root, '--csv', os.path.join(root, 'summary.csv')])
    captured = capsys.readouterr()
    # kept: the finished seed-2 run (best 60, last 55) and seed 3 (62, 58): 61 ± 1.41 / 56.5 ± 2.12
    assert kd_lines(captured.out.splitlines()) == [
        '| resnet110 | resnet20 | ST | 61.00 ± 1.41 / 56.50 ± 2.12 (n=2) |']
    (warning,) = [line for line in captured.err.splitlines() if 'seed 2' in line]
    assert warning.startswith('warning: ') and 'kept ' + os.path.join(root, 'st-s2-new') in warning


def test_of_two_unfinished_runs_of_one_seed_the_longer_is_kept(tmp_path, capsys):
    root = str(tmp_path)
    fake_run(root, 'st-a', {**KD, 'seed': 2}, [40, 45, 70])   # 3 epochs: kept
    fake_run(root, 'st-b', {**KD, 'seed': 2}, [80])           # 1 epoch
    lines, rows = run_summary(root, capsys)
    assert kd_lines(lines) == ['| resnet110 | resnet20 | ST | 70.00 / 70.00 * |']
    assert rows[0]['n'] == '1' and rows[0]['runs'] == os.path.join(root, 'st-a')


# ----------------------------------------------------------------------------- failed runs

def test_a_failed_seed_is_left_out_of_the_numbers_and_counted(tmp_path, capsys):
    root = str(tmp_path)
    fake_run(root, 'st-s1', {**KD, 'seed': 1}, [50, 60, 57, 55])
    fake_run(root, 'st-s2', {**KD, 'seed': 2}, [62, 61, 59, 58])
    fake_run(root, 'st-s3', {**KD, 'seed': 3}, [99, 99], error='loss is NaN at epoch 3')
    lines, rows = run_summary(root, capsys)
    # seeds 1 and 2 only: best 60, 62 -> 61 ± 1.41; last 55, 58 -> 56.5 ± 2.12
    assert kd_lines(lines) == ['| resnet110 | resnet20 | ST | 61.00 ± 1.41 / 56.50 ± 2.12 (n=2) (1 failed) |']
    assert rows[0]['n'] == '2' and rows[0]['failed'] == '1' and rows[0]['status'] == 'failed'
    assert float(rows[0]['best_mean']) == pytest.approx(61.0)
