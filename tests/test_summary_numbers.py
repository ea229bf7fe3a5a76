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
    assert kd_lines(lines) == ['| resnet110 | resnet20 | ST | 4 | 63.00 ± 3.61 / 59.00 ± 4.58 (n=3) |']
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
    assert kd_lines(lines) == ['| resnet110 | resnet20 | ST | 1 | 71.00 ± 1.37 / 71.00 ± 1.37 (n=4) |']
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
    assert kd_lines(lines) == ['| resnet110 | resnet20 | ST | 4 | 75.00 / 72.00 |']
    run = summarize.read_run(os.path.join(root, 'st-s1'))
    assert run['scores']['net'] == {'best': 75.0, 'last': 72.0}
    assert run['epochs_done'] == 4 and run['complete']


def test_last_is_the_last_epoch_not_the_lowest(tmp_path, capsys):
    root = str(tmp_path)
    fake_run(root, 'st-s1', {**KD, 'seed': 1}, [30, 20, 50, 45])
    lines, _ = run_summary(root, capsys)
    assert kd_lines(lines) == ['| resnet110 | resnet20 | ST | 4 | 50.00 / 45.00 |']


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
    assert '| resnet110 | resnet20 | AT | 4 | 41.00 ± 1.41 / 41.00 ± 1.41 (n=2) |' in lines
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
        '| resnet110 | resnet20 | ST (lambda_kd=0.1) | 1 | 61.00 ± 1.41 / 61.00 ± 1.41 (n=2) |',
        '| resnet110 | resnet20 | ST (lambda_kd=0.5) | 1 | 70.00 / 70.00 |']


def test_flags_the_method_ignores_do_not_split_a_group(tmp_path, capsys):
    root = str(tmp_path)
    fake_run(root, 'st-s1', {**KD, 'epochs': 1, 'seed': 1}, [60])
    fake_run(root, 'st-s2', {**KD, 'epochs': 1, 'seed': 2, 'p': 3.0}, [62])  # --p: not read by st
    lines, rows = run_summary(root, capsys)
    assert kd_lines(lines) == ['| resnet110 | resnet20 | ST | 1 | 61.00 ± 1.41 / 61.00 ± 1.41 (n=2) |']


def test_a_flag_the_method_reads_still_splits_a_group(tmp_path, capsys):
    root = str(tmp_path)
    fake_run(root, 'st-s1', {**KD, 'epochs': 1, 'seed': 1}, [60])
    fake_run(root, 'st-s2', {**KD, 'epochs': 1, 'seed': 2, 'T': 2.0}, [62])  # --T: read by st
    lines, _ = run_summary(root, capsys)
    assert sorted(kd_lines(lines)) == ['| resnet110 | resnet20 | ST (T=2.0) | 1 | 62.00 / 62.00 |',
                                       '| resnet110 | resnet20 | ST (T=4.0) | 1 | 60.00 / 60.00 |']


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
        '| resnet110 | resnet20 | ST | 4 | 61.00 ± 1.41 / 56.50 ± 2.12 (n=2) |']
    (warning,) = [line for line in captured.err.splitlines() if 'seed 2' in line]
    assert warning.startswith('warning: ') and 'kept ' + os.path.join(root, 'st-s2-new') in warning


def test_of_two_unfinished_runs_of_one_seed_the_longer_is_kept(tmp_path, capsys):
    root = str(tmp_path)
    fake_run(root, 'st-a', {**KD, 'seed': 2}, [40, 45, 70])   # 3 epochs: kept
    fake_run(root, 'st-b', {**KD, 'seed': 2}, [80])           # 1 epoch
    lines, rows = run_summary(root, capsys)
    assert kd_lines(lines) == ['| resnet110 | resnet20 | ST | 4 | 70.00 / 70.00 * |']
    assert rows[0]['n'] == '1' and rows[0]['runs'] == os.path.join(root, 'st-a')


# ----------------------------------------------------------------------------- failed runs

def test_a_failed_seed_is_left_out_of_the_numbers_and_counted(tmp_path, capsys):
    root = str(tmp_path)
    fake_run(root, 'st-s1', {**KD, 'seed': 1}, [50, 60, 57, 55])
    fake_run(root, 'st-s2', {**KD, 'seed': 2}, [62, 61, 59, 58])
    fake_run(root, 'st-s3', {**KD, 'seed': 3}, [99, 99], error='loss is NaN at epoch 3')
    lines, rows = run_summary(root, capsys)
    # seeds 1 and 2 only: best 60, 62 -> 61 ± 1.41; last 55, 58 -> 56.5 ± 2.12
    assert kd_lines(lines) == ['| resnet110 | resnet20 | ST | 4 | 61.00 ± 1.41 / 56.50 ± 2.12 (n=2) (1 failed) |']
    assert rows[0]['n'] == '2' and rows[0]['failed'] == '1' and rows[0]['status'] == 'failed'
    assert float(rows[0]['best_mean']) == pytest.approx(61.0)


# ----------------------------------------------------------------------------- damaged runs

def summary_with_warnings(root, capsys):
    summarize.summary([root, '--csv', os.path.join(root, 'summary.csv')])
    captured = capsys.readouterr()
    with open(os.path.join(root, 'summary.csv')) as f:
        rows = list(csv.DictReader(f))
    return captured.out.splitlines(), rows, captured.err.splitlines()


def two_healthy_seeds(root):
    """Seeds 1 and 2: best 60, 62 -> 61 ± 1.41; last 55, 58 -> 56.5 ± 2.12."""
    fake_run(root, 'st-s1', {**KD, 'seed': 1}, [50, 60, 57, 55])
    fake_run(root, 'st-s2', {**KD, 'seed': 2}, [62, 61, 59, 58])


HEALTHY_LINE = '| resnet110 | resnet20 | ST | 4 | 61.00 ± 1.41 / 56.50 ± 2.12 (n=2) |'


def assert_named_and_left_out(root, capsys, damaged, *reason):
    """The summary's numbers are the two healthy seeds', and one warning line
    names the damaged run's directory, its file and each word of `reason`."""
    lines, rows, warnings = summary_with_warnings(root, capsys)
    assert kd_lines(lines) == [HEALTHY_LINE]
    assert rows[0]['n'] == '2' and damaged not in rows[0]['runs'].split()
    (warning,) = warnings
    assert warning.startswith(f'warning: skipped {damaged}: metrics.csv'), warning
    for word in reason:
        assert word in warning, (word, warning)
    assert lines[-1].startswith('2 runs (1 more skipped: damaged or unreadable, named above)')


def test_a_last_row_cut_off_mid_line_is_named_and_left_out(tmp_path, capsys):
    root = str(tmp_path)
    two_healthy_seeds(root)
    # killed while appending epoch 3's row: '57' of '57.25' reached the file
    d = fake_run(root, 'st-s3', {**KD, 'seed': 3}, [70, 71])
    with open(os.path.join(d, 'metrics.csv'), 'a') as f:
        f.write('main,0,3,0.1,57')
    assert_named_and_left_out(root, capsys, d, 'last row is cut off', "'main,0,3,0.1,57'")


@pytest.mark.parametrize('value', ['nan', 'inf', '-inf'])
def test_a_run_whose_top1_is_not_finite_is_named_and_left_out(tmp_path, capsys, value):
    root = str(tmp_path)
    two_healthy_seeds(root)
    d = fake_run(root, 'st-s3', {**KD, 'seed': 3}, [40, 50, value, 64])
    assert_named_and_left_out(root, capsys, d, f'test_top1 is {value} at main epoch 3', 'not a finite')


@pytest.mark.parametrize('damage, reason', [
    ('empty', 'metrics.csv is empty'),                       # truncated, never rewritten
    ('header only', 'holds no epoch though checkpoint.pth.tar exists'),
    ('repeated epoch', 'main epochs are 1, 2, 1, 2, 3, 4, not 1, 2, ... in order'),
    ('short row', 'the row of main epoch 2 has fewer fields than the header'),
])
def test_a_history_that_lost_or_repeated_rows_is_named_and_left_out(tmp_path, capsys, damage, reason):
    root = str(tmp_path)
    two_healthy_seeds(root)
    d = fake_run(root, 'st-s3', {**KD, 'seed': 3}, [70, 71, 72, 73], complete=False)
    open(os.path.join(d, 'checkpoint.pth.tar'), 'wb').close()  # it ran epochs: there is a checkpoint
    path = os.path.join(d, 'metrics.csv')
    header = 'phase,phase_index,epoch,lr,test_top1\r\n'
    text = {'empty': '', 'header only': header,
            'repeated epoch': header + 'main,0,1,0.1,70\r\nmain,0,2,0.1,71\r\n' +
                              open(path, newline='').read()[len(header):],
            'short row': header + 'main,0,1,0.1,70\r\nmain,0,2,0.1\r\nmain,0,3,0.1,72\r\n'}[damage]
    with open(path, 'w', newline='') as f:
        f.write(text)
    assert_named_and_left_out(root, capsys, d, reason)


@pytest.mark.parametrize('flag', ['lr_decay_epochs', 't_name', 's_name', 'kd_mode', 'data_name', 'epochs',
                                  'seed', 'protocol'])
@pytest.mark.parametrize('value', [[150, 180, 210], {'a': 1}])
def test_list_or_dict_flags_in_args_json_never_crash_the_summary(tmp_path, capsys, flag, value):
    root = str(tmp_path)
    two_healthy_seeds(root)
    odd = fake_run(root, 'st-odd', {**KD, 'seed': 3, flag: value}, [40, 50, 60, 64])
    lines, rows, warnings = summary_with_warnings(root, capsys)
    text = json.dumps(value, sort_keys=True)
    # the run is somewhere: in the tables and the CSV, or named in a warning
    shown = any(odd in r['runs'].split() for r in rows)
    assert shown or any(odd in w and text in w for w in warnings), (lines, warnings)
    if flag in ('t_name', 's_name', 'epochs'):  # shown as its JSON text
        assert any(text in line and '64.00' in line for line in lines), lines
    if flag == 'lr_decay_epochs':
        assert '| resnet110 | resnet20 | ST (lr_decay_epochs=None) | 4 | 61.00 ± 1.41 / 56.50 ± 2.12 (n=2) |' \
            in lines


# ----------------------------------------------------------------------------- epochs, captions

def test_the_epochs_column_is_the_length_of_the_schedule(tmp_path, capsys):
    root = str(tmp_path)
    fake_run(root, 'st-s1', {**KD, 'seed': 1}, [50, 60])                    # 2 of 4 epochs so far
    fake_run(root, 'st-c100', {**KD, 'data_name': 'cifar100', 'epochs': 3, 'seed': 1}, [20, 30, 25])
    lines, rows, _ = summary_with_warnings(root, capsys)
    assert '| Teacher | Student | Name | Epochs | CIFAR10 | CIFAR100 |' in lines
    # the planned schedule, not the epochs done; each dataset's where they differ
    assert kd_lines(lines) == ['| resnet110 | resnet20 | ST | 4 (CIFAR10), 3 (CIFAR100) | 60.00 / 60.00 * '
                               '| 30.00 / 25.00 |']
    assert {r['dataset']: r['epochs'] for r in rows} == {'cifar10': '4', 'cifar100': '3'}
    assert list(rows[0]).index('epochs') < list(rows[0]).index('best_mean')  # beside the results


def test_each_table_has_a_caption_saying_what_it_holds(tmp_path, capsys):
    root = str(tmp_path)
    fake_run(root, 'st-s1', {**KD, 'seed': 1}, [50, 60, 57, 55])
    fake_run(root, 'st-s2', {**KD, 'seed': 2}, [62, 61, 59, 58])
    fake_run(root, 'base-r20', {**COMMON, 'net_name': 'resnet20', 'seed': 1}, [40, 41, 42, 43],
             script='train_base.py')
    dml = fake_run(root, 'dml', {**COMMON, 'net1_name': 'resnet20', 'net2_name': 'resnet20', 'seed': 1},
                   [], script='train_dml.py')
    with open(os.path.join(dml, 'metrics.csv'), 'w') as f:
        f.write('phase,phase_index,epoch,test_net1_top1,test_net2_top1\n' +
                ''.join(f'main,0,{e},{50 + e},{60 + e}\n' for e in range(1, 5)))
    crd = {'data_name': 'cifar100', 'protocol': 'crd', 'epochs': 2}
    fake_run(root, 'crd-base', {**crd, 'net_name': 'resnet56', 'seed': 1}, [70, 72], script='train_base.py')
    fake_run(root, 'crd-r44', {**crd, 'net_name': 'resnet44', 'seed': 1}, [60, 61], script='train_base.py')
    fake_run(root, 'crd-kd', {**crd, 't_name': 'resnet56', 's_name': 'resnet20', 'kd_mode': 'st',
                              'seed': 1}, [68, 69])
    summarize.summary([root, '--published'])
    lines = capsys.readouterr().out.splitlines()
    headers = [i for i, line in enumerate(lines) if line.startswith('|---|')]
    # resnet110 -> resnet20, DML, the benchmark's, its baselines in no pair; then (--published)
    # ours beside the published numbers: the benchmark's, the seed's
    assert len(headers) == 6
    for number, i in enumerate(headers, start=1):
        assert lines[i - 2] == '' and lines[i - 1].startswith('| ')
        caption = lines[i - 3]
        assert caption.startswith(f'Table {number}. '), caption
        assert '"best / last"' in caption, caption
        assert ('mean ± std over the n seeds' if number <= 4 else 'Ours beside the published numbers') \
            in caption, caption
    captions = [lines[i - 3] for i in headers]
    assert 'resnet110 → resnet20' in captions[0] and 'Deep mutual learning' in captions[1]
    assert 'CIFAR-100 benchmark' in captions[2] and 'Rows "(published)"' in captions[2]
    assert 'CIFAR-100 benchmark' in captions[4] and "the seed's tables" in captions[5]
    assert '| KD (published) | 240 | 70.66 |' in lines   # the published numbers' epochs beside them
    assert '| KD | 2 | 69.00 / 69.00 |' in lines
