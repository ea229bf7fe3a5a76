"""The published numbers (published.py) and what the summary does with them:
the data is complete and every number carries its source and protocol;
`summarize.py --published` sets ours beside them (Δ, the protocol differences,
one run said so) on a tiny finished sweep with cells of one seed, several
seeds, failed and unfinished runs; `--report` writes the Markdown report, its
plot, and keeps its tables without matplotlib."""
import csv
import json
import os
import sys

import pytest

import network
import published
import summarize
from kd_losses import METHODS

# ----------------------------------------------------------------------------- the data

REPDISTILLER_ROWS = ('teacher', 'student', 'st', 'fitnet', 'at', 'sp', 'cc', 'vid', 'rkd', 'pkt', 'ab', 'ft',
                     'nst', 'crd')
# The methods the published tables are to cover; those whose sources could not
# be reached must be named as such in published.py's docstring.
COVERED = REPDISTILLER_ROWS + ('fsp', 'dkd', 'reviewkd', 'dist', 'nkd', 'ctkd', 'simkd', 'srrl', 'semckd',
                               'mlkd', 'sdd_kd', 'sdd_dkd', 'st+dot', 'st+logit_stand', 'dkd+logit_stand',
                               'wttm', 'ickd')
UNREACHED = {'crd+st': 'CRD+KD', 'kdsvd': 'KDSVD', 'catkd': 'CAT-KD'}


def records_of(source, method=None):
    return [r for r in published.RECORDS if r.source == source and (method is None or r.method == method)]


def test_every_repdistiller_row_has_its_13_pairs():
    for method in REPDISTILLER_ROWS:
        pairs = [(r.teacher, r.student) for r in records_of(published.REPDISTILLER, method)]
        assert sorted(pairs) == sorted(published.PAIRS), method   # each pair once
    for method in ('wttm', 'dist'):   # WTTM's README: the same 13
        pairs = [(r.teacher, r.student) for r in records_of(published.WTTM, method)]
        assert sorted(pairs) == sorted(published.PAIRS), method
    # FSP: only the same-architecture table, where wrn_40_2 -> wrn_40_1 is N/A
    fsp = {(r.teacher, r.student) for r in records_of(published.REPDISTILLER, 'fsp')}
    assert len(fsp) == 6 and ('wrn_40_2', 'wrn_40_1') not in fsp
    assert fsp <= set(published.PAIRS[:7])


def test_each_method_is_covered_or_named_as_unreached():
    keys = {r.method for r in published.RECORDS}
    assert set(COVERED) <= keys
    for key, name in UNREACHED.items():
        assert key not in keys and name in published.__doc__, key


def test_every_record_has_a_source_a_protocol_and_a_sane_number():
    seen = set()
    for r in published.RECORDS:
        assert r.source.title and r.source.url.startswith('https://') and r.source.name and r.table, r
        assert isinstance(r.protocol, published.Protocol) and r.protocol.basis, r
        assert r.protocol.epoch in (None, 'best', 'last') and r.protocol.runs in (None,) + tuple(range(1, 20))
        assert 0 < r.top1 < 100 and (r.std is None or 0 <= r.std < 5), r
        assert r.dataset in ('cifar10', 'cifar100') and r.benchmark in ('crd', 'seed'), r
        assert r.student in network.NETWORKS and (r.teacher in network.NETWORKS or
                                                 (r.teacher == '-' and r.method == 'student')), r
        key = (r.source, r.table, r.method, r.teacher, r.student, r.dataset, r.net, tuple(r.settings.items()))
        assert key not in seen, key   # one number per cell of a source's table
        seen.add(key)


def test_each_method_key_is_a_registered_mode_a_baseline_or_documented():
    for r in published.RECORDS:
        mode, *switches = r.method.split('+')
        assert mode in METHODS or mode in published.BASELINES + published.SCRIPT_METHODS, r.method
        assert r.net == 'net' or (r.method == 'dml' and r.net in ('net1', 'net2')), r
        assert all(s in published.VARIANT_SWITCHES for s in switches), r.method
        if mode in METHODS:
            assert set(r.settings) <= set(METHODS[mode].flags), r


def test_variant_keys_of_runs():
    assert published.variant_key('st', {'logit_stand': False, 'optimizer': 'sgd'}) == 'st'
    assert published.variant_key('dkd', {'logit_stand': True}) == 'dkd+logit_stand'
    assert published.variant_key('st', {'optimizer': 'dot'}) == 'st+dot'
    assert published.base_mode('ctkd+logit_stand') == 'ctkd'


def test_transcriptions_and_the_reference_source():
    assert published.top1('st+dot', 'resnet32x4', 'ShuffleV2') == 75.55          # mdistiller, DOT
    dkd = published.reference('dkd', 'resnet32x4', 'ShuffleV2')
    assert (dkd.top1, dkd.source) == (77.07, published.MDISTILLER) and 'MobileNet-V2' in dkd.note
    dist = published.reference('dist', 'wrn_40_2', 'wrn_40_1')
    assert (dist.top1, dist.std, dist.protocol.statistic) == (74.43, 0.24, 'mean ± std')
    assert published.top1('st', 'resnet110', 'resnet20', 'cifar10', 'seed') == 92.82   # the seed's README
    assert published.top1('', '-', 'resnet110', 'cifar100', 'seed') == 73.15
    # the method's own source first: CTKD's README, not the re-run quoted by logit standardisation
    assert published.reference('ctkd', 'resnet110', 'resnet20').source == published.CTKD
    assert published.top1('ctkd', 'resnet110', 'resnet20') == 70.99
    assert published.reference('semckd', 'resnet32x4', 'resnet8x4').source == published.SEMCKD
    # SimKD's three projector factors: a run matches its own
    assert published.reference('simkd', 'resnet32x4', 'resnet8x4', args={'simkd_factor': 4}).top1 == 77.88
    assert published.reference('simkd', 'resnet32x4', 'resnet8x4', args={'simkd_factor': 2}).top1 == 78.08
    # every table giving KD there: RepDistiller, mdistiller's DKD and DOT tables, logit standardisation,
    # SemCKD, SimKD
    assert len(published.matching('st', 'resnet32x4', 'resnet8x4')) == 6


def test_mlkd_rows_carry_their_longer_schedule_and_second_view():
    # the logit standardisation README trains MLKD with its configs/cifar100/mlkd/*.yaml:
    # 480 epochs, 960 for resnet32x4 -> ShuffleV2, on a weak and a strong view
    rows = [r for r in records_of(published.LOGIT_STAND) if r.method.startswith('mlkd')]
    assert len(rows) == 28
    for r in rows:
        expected = 960 if (r.teacher, r.student) == ('resnet32x4', 'ShuffleV2') else 480
        assert r.protocol.epochs == expected, r
        assert 'RandAugment' in r.protocol.augmentation and f'{r.teacher}_{r.student}.yaml' in r.protocol.basis
    # the other rows of the same tables keep the benchmark's 240 epochs and one view
    others = [r for r in records_of(published.LOGIT_STAND) if not r.method.startswith('mlkd')]
    assert others and all(r.protocol == published.LOGIT_STAND_PROTOCOL for r in others)
    # a 240-epoch run of ours is marked as a shorter schedule beside it
    record = next(r for r in rows if (r.method, r.student) == ('mlkd', 'ShuffleV2'))
    assert '240 vs 960 epochs' in summarize.protocol_note({'epochs': 240}, record, 3)


def test_protocol_says_what_is_not_stated():
    text = published.DIST_PROTOCOL.describe()
    assert 'epochs not stated' in text and 'mean ± std, runs not stated' in text
    assert published.Protocol(240, 'crop', 'best', 3, 'mean', 'x').describe() == \
        '240 epochs; crop; best epoch; mean of 3 runs'


# ----------------------------------------------------------------------------- a tiny finished sweep

CRD = {'data_name': 'cifar100', 'protocol': 'crd', 'epochs': 2, 'lr': 0.05, 'batch_size': 64}
ENV = {'device': 'cuda:0 (NVIDIA H100 80GB HBM3)', 'versions': {'python': '3.11.7', 'torch': '2.14.1'},
       'git_commit': '0123abcd'}


def fake_run(root, note, args, top1s, script='train_kd.py', complete=None, error=None, env=ENV):
    # top1s: one test top-1 per epoch (DML: a (net1, net2) pair per epoch)
    """A run directory as the training scripts write it (args.json with the
    device, versions and commit records.py writes; metrics.csv; complete.json
    once finished; log.txt ending in an error line for a failed run)."""
    d = os.path.join(root, note)
    os.makedirs(d)
    if complete if complete is not None else len(top1s) == args['epochs']:
        with open(os.path.join(d, 'complete.json'), 'w') as f:
            json.dump({'epochs': args['epochs']}, f)
    if error:
        with open(os.path.join(d, 'log.txt'), 'w') as f:
            f.write(f'command: python {script}\nerror: {error}\n')
    with open(os.path.join(d, 'args.json'), 'w') as f:
        json.dump({'script': script, 'args': {**args, 'note': note}, **env}, f)
    with open(os.path.join(d, 'metrics.csv'), 'w', newline='') as f:
        w = csv.writer(f)
        dml = script == 'train_dml.py'
        w.writerow(['phase', 'phase_index', 'epoch'] + (['test_net1_top1', 'test_net2_top1'] if dml else ['test_top1']))
        for e, v in enumerate(top1s, start=1):
            w.writerow(['main', 0, e] + (list(v) if dml else [v]))
    return d


def tiny_sweep(root):
    """Benchmark runs of resnet32x4 -> resnet8x4: both baselines and KD of one
    seed, CRD of three seeds, a failed DKD run, an unfinished AT run; and a
    seed-table KD run of two seeds on CIFAR-10 (the seed's 200 epochs) and a
    DML run of one."""
    fake_run(root, 'base-r32x4', {**CRD, 'net_name': 'resnet32x4', 'seed': 1}, [70.0, 79.0], 'train_base.py')
    fake_run(root, 'base-r8x4', {**CRD, 'net_name': 'resnet8x4', 'seed': 1}, [70.0, 72.0], 'train_base.py',
             env={'device': 'cpu', 'versions': {'torch': '2.11.0'}, 'git_commit': 'feedbeef'})
    kd = {**CRD, 't_name': 'resnet32x4', 's_name': 'resnet8x4'}
    fake_run(root, 'st-s1', {**kd, 'kd_mode': 'st', 'seed': 1}, [74.0, 73.5])
    for seed, best in ((1, 75.0), (2, 76.0), (3, 77.0)):
        fake_run(root, f'crd-s{seed}', {**kd, 'kd_mode': 'crd', 'seed': seed}, [best, best - 1])
    fake_run(root, 'dkd-s1', {**kd, 'kd_mode': 'dkd', 'seed': 1}, [60.0], error='loss is NaN at epoch 2')
    fake_run(root, 'at-s1', {**kd, 'kd_mode': 'at', 'seed': 1}, [50.0])
    seed_kd = {'data_name': 'cifar10', 'epochs': 200, 't_name': 'resnet110', 's_name': 'resnet20',
               'kd_mode': 'st', 'lambda_kd': 0.1}
    for seed, best in ((1, 92.0), (2, 93.0)):
        fake_run(root, f'seed-st-s{seed}', {**seed_kd, 'seed': seed}, [best - 5, best], complete=True)
    fake_run(root, 'seed-dml', {'data_name': 'cifar10', 'epochs': 200, 'net1_name': 'resnet110',
                                'net2_name': 'resnet20', 'seed': 1}, [(90.0, 91.0), (94.0, 92.5)],
             'train_dml.py', complete=True)


def comparison(lines, caption_start):
    """{(method, pair): row cells} of the comparison table whose caption starts so."""
    start = next(i for i, line in enumerate(lines) if line.startswith('Table ') and caption_start in line)
    header = start + 2
    assert lines[header].startswith('| Method | Teacher→Student | Data | Ours')
    rows = {}
    for line in lines[header + 2:]:
        if not line.startswith('| '):
            break
        cells = [c.strip() for c in line.strip('|').split(' | ')]
        rows[(cells[0], cells[1])] = dict(zip(['ours', 'published', 'delta', 'protocol', 'source'], cells[3:]))
    return rows


def test_published_sets_ours_beside_every_published_number(tmp_path, capsys):
    root = str(tmp_path)
    tiny_sweep(root)
    summarize.summary([root, '--published'])
    lines = capsys.readouterr().out.splitlines()
    rows = comparison(lines, 'CIFAR-100 benchmark (--protocol crd): Ours beside')
    pair = 'resnet32x4→resnet8x4'
    # one seed: said so; Δ against RepDistiller's KD (73.33) at the best epoch
    kd = rows[('KD', pair)]
    assert kd['ours'] == '74.00 / 73.50 (1 run)' and kd['published'] == '73.33' and kd['delta'] == '+0.67'
    assert kd['protocol'].startswith('≠ 2 vs 240 epochs; reflect vs zero padding of the crop')
    assert kd['protocol'].endswith('1 run') and '? runs averaged not stated' in kd['protocol']
    assert kd['source'] == 'RepDistiller README, table 1 (same architecture type)'
    # three seeds: mean 76 ± 1 (sample std), 76 - 75.51 = +0.49 lies within the spread
    crd = rows[('CRD', pair)]
    assert crd['ours'] == '76.00 ± 1.00 / 75.00 ± 1.00 (n=3)'
    assert crd['delta'] == '+0.49 ± 1.00 (within 1 std)' and '1 run' not in crd['protocol']
    # failed: no numbers, no Δ; unfinished: marked, no Δ from a partial run
    assert rows[('DKD', pair)]['ours'] == 'failed' and rows[('DKD', pair)]['delta'] == ''
    assert rows[('DKD', pair)]['published'] == '76.32'                 # mdistiller's README
    assert rows[('AT', pair)]['ours'] == '50.00 / 50.00 * (1 run)' and rows[('AT', pair)]['delta'] == ''
    # published numbers without a run of ours are listed too, with their protocol
    assert rows[('FitNet', pair)]['ours'] == 'not run' and rows[('FitNet', pair)]['published'] == '73.50'
    assert rows[('DIST', pair)]['published'] == '76.31 ± 0.19'
    assert 'epochs not stated' in rows[('DIST', pair)]['protocol']
    assert rows[('SimKD (simkd_factor=4)', pair)]['published'] == '77.88'
    assert rows[('Baseline', 'resnet32x4')]['delta'] == '-0.42'        # 79.00 - 79.42
    # the seed's table: CIFAR-10, two seeds, the seed's 200 epochs: no ≠, only what is not stated
    seed = comparison(lines, "the seed's tables")[('KD', 'resnet110→resnet20')]
    assert seed['published'] == '92.82' and seed['delta'] == '-0.32 ± 0.71 (within 1 std)'
    assert seed['protocol'] == '? runs averaged, best or last epoch not stated'
    dml = comparison(lines, "the seed's tables")
    assert dml[('DML net1', 'resnet110→resnet20')]['published'] == '94.45'            # the seed's DML table
    assert dml[('DML net1', 'resnet110→resnet20')]['delta'] == '-0.45'
    assert dml[('DML net2', 'resnet110→resnet20')]['ours'] == '92.50 / 92.50 (1 run)'
    assert dml[('DML net2', 'resnet110→resnet20')]['delta'] == '-0.42'
    # the sources, with their URLs, under the table
    assert '- RepDistiller README: Contrastive Representation Distillation (Tian et al., ICLR 2020): ' \
           'RepDistiller README, "Benchmark Results on CIFAR-100", https://github.com/HobbitLong/RepDistiller' \
           in lines
    with open(os.path.join(root, 'summary.csv')) as f:
        by_name = {(r['name'], r['table']): r for r in csv.DictReader(f)}
    assert float(by_name[('CRD', 'crd')]['published']) == 75.51
    assert by_name[('ST', 'seed')]['published_source'].startswith('seed README')


def test_without_published_the_tables_are_ours_only(tmp_path, capsys):
    root = str(tmp_path)
    tiny_sweep(root)
    summarize.summary([root])
    out = capsys.readouterr().out
    assert '(published)' not in out and 'Ours beside' not in out


def report_of(tmp_path, capsys):
    root = str(tmp_path / 'results')
    tiny_sweep(root)
    path = str(tmp_path / 'report.md')
    summarize.summary([root, '--report', path])
    out = capsys.readouterr().out
    with open(path) as f:
        return f.read(), out, tmp_path / 'report.png'


def test_the_report_holds_tables_protocols_plot_and_environment(tmp_path, capsys):
    pytest.importorskip('matplotlib')
    text, out, png = report_of(tmp_path, capsys)
    assert f'report written to {tmp_path / "report.md"} (plot: {png})' in out
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and '![ours minus published](report.png)' in text
    for section in ('## Tables', '## Protocols side by side', '## Ours minus published',
                    '## Every published number for the pairs and networks compared', '## Environment of each run'):
        assert section in text
    assert '| KD | resnet32x4→resnet8x4 | CIFAR100 | 74.00 / 73.50 (1 run) | 73.33 | +0.67 |' in text
    assert '| Teacher (published) | 240 | 79.42 |' in text
    protocols = text.split('## Protocols side by side')[1].split('##')[0]
    assert ('| Ours (this results root) | 2, 200 | random crop 32 of the reflect-padded (4) image, horizontal '
            'flip | best and last, both shown | 1 to 3 per cell, mean ± sample std |') in protocols
    assert '| RepDistiller README | 240 | random crop 32 of the zero-padded (4) image' in protocols
    # every source's number for the pair, KD from six tables among them
    every = text.split('## Every published number')[1].split('##')[0]
    assert sum(line.startswith('| KD | resnet32x4→resnet8x4 |') for line in every.splitlines()) == 6
    env = text.split('## Environment of each run')[1]
    assert '| crd-s2 | CRD | complete | cuda:0 (NVIDIA H100 80GB HBM3) | 2.14.1 | 0123abcd |' in env
    assert '| base-r8x4 | Baseline | complete | cpu | 2.11.0 | feedbeef |' in env
    assert '| dkd-s1 | DKD | failed |' in env and '| at-s1 | AT | unfinished |' in env


def test_the_report_without_matplotlib_says_so_and_keeps_its_tables(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, 'matplotlib', None)   # `import matplotlib` raises ImportError
    monkeypatch.setitem(sys.modules, 'matplotlib.pyplot', None)
    text, out, png = report_of(tmp_path, capsys)
    assert 'matplotlib is not installed' in text and 'requirements-plots.txt' in text
    assert not png.exists() and '![' not in text
    assert '| CRD | resnet32x4→resnet8x4 | CIFAR100 | 76.00 ± 1.00 / 75.00 ± 1.00 (n=3) | 75.51 |' in text
    assert '## Environment of each run' in text


@pytest.mark.parametrize('where, message', [('missing/report.md', 'does not exist'), ('', 'is a directory')])
def test_a_report_path_that_cannot_be_written_is_one_line_and_writes_nothing(tmp_path, capsys, where, message):
    root = str(tmp_path / 'results')
    tiny_sweep(root)
    with pytest.raises(SystemExit) as e:
        summarize.main([root, '--report', str(tmp_path / where)])
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and 'Traceback' not in err[0]
    assert not os.path.exists(os.path.join(root, 'summary.csv'))
