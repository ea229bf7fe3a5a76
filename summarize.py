"""Summarise a results root: the comparison tables, a CSV, test-accuracy curves.

    python summarize.py ./results                     # Markdown tables + ./results/summary.csv
    python summarize.py ./results --published         # ours beside the published numbers
    python summarize.py ./results --report report.md  # one Markdown report (and report.png)
    python summarize.py ./results --plot curves.png --runs 'st-*'   # needs matplotlib

Every run directory (one holding args.json) under the root is read. A run is
finished when its complete.json exists; one whose log.txt ends in an
`error: ...` line failed; any other is unfinished, also one killed before its
first main-schedule epoch. Runs that differ only in their seed, result-neutral
flags and flags their method does not read are replicates of one experiment,
reported as mean ± sample standard deviation (two runs of one seed are one
replicate: the finished one is kept). Runs of the CIFAR-100 benchmark
(`--protocol crd`) get the benchmark's table: pairs as columns, methods as rows.
Each table has a caption saying what it holds, and an Epochs column: the
length of the main schedule its runs were given (the published numbers':
the epochs their source trained, ? where it does not say). A malformed or damaged run directory (a metrics.csv
cut short or with a row lost or repeated, a top-1 that is not a finite
number) is skipped with a warning naming the file and the reason, and left
out of the numbers; the summary goes on.

With --published, the published numbers (published.py: each with its source
and protocol) come beside ours: "(published)" rows in the benchmark's table,
then a comparison table per layout, one row per method and pair: ours, the
published number, their difference, and what differs between the two
protocols (epochs, runs averaged, augmentation, which epoch). --report writes
the same tables, the protocols side by side, a plot of ours minus published
(matplotlib, optional) and the environment each run came from (device, torch,
commit, from its args.json) to one Markdown file.
"""
import csv
import io
import json
import math
import os
import re
import sys
import time

import published as pub
from errors import ArgumentParser, UserError, cli
from kd_losses import METHODS, all_flags
from records import COMPLETE_FILE, RESULT_NEUTRAL_FLAGS, without_cut_row, write_text_atomically

SEED_ORDER = ['logits', 'st', 'at', 'fitnet', 'nst', 'pkt', 'fsp', 'ft', 'rkd', 'ab', 'sp',
              'sobolev', 'bss', 'cc', 'lwm', 'irg', 'vid', 'ofd', 'afd', 'crd']
DISPLAY = {'logits': 'Logits', 'fitnet': 'Fitnet', 'sobolev': 'Sobolev', 'lwm': 'LwM',
           'reviewkd': 'ReviewKD', 'semckd': 'SemCKD', 'simkd': 'SimKD', 'catkd': 'CAT-KD',
           'sdd_kd': 'SD-KD', 'sdd_dkd': 'SD-DKD', 'teacher': 'Teacher', 'student': 'Student'}
# How a variant's switch is shown after its method's name (published.py's keys).
VARIANT_DISPLAY = {'logit_stand': 'LS', 'dot': 'DOT'}
DATA_COLUMNS = {'cifar10': 'CIFAR10', 'cifar100': 'CIFAR100'}
# Runs that differ only in these flags are replicates of one experiment.
NOT_RESULT_FLAGS = RESULT_NEUTRAL_FLAGS | {'seed'}
REPORTING_RULE = ('Top-1 test accuracy (%) as "best / last": the best epoch and the last epoch of '
                  'the main schedule, whose length is the Epochs column. Where several seeds of the '
                  'same run exist: mean ± sample standard deviation over them, with n. * marks runs '
                  'not finished yet; "failed" runs stopped with an error (their numbers are left '
                  'out), and so are runs whose records are damaged (each named in a warning). A '
                  'cell whose runs did not all train eagerly as asked says how their steps ran '
                  '(metrics.csv step_path): [graphs], [inductor], with "fallback" where --compile '
                  'asked for more than ran.')
# What each table's cells hold, for its caption.
CELL_RULE = 'top-1 (%) "best / last" epoch of the main schedule, mean ± std over the n seeds where n > 1'

# The CIFAR-100 benchmark's 13 teacher -> student pairs, in RepDistiller's
# README order (published.py holds them with every published number).
CRD_PAIRS = pub.PAIRS
# The benchmark's row order (RepDistiller's README) after Teacher and Student;
# modes it lacks follow in name order. Its names for two of the seed's methods:
CRD_ROW_ORDER = ['st', 'fitnet', 'at', 'sp', 'cc', 'vid', 'rkd', 'pkt', 'ab', 'ft', 'fsp', 'nst', 'crd']
CRD_DISPLAY = {'st': 'KD', 'fitnet': 'FitNet'}
CRD_RULE = ('CIFAR-100 benchmark (--protocol crd; Tian et al., ICLR 2020): pairs teacher→student '
            f'as columns, methods as rows; {CELL_RULE}.')
# Our augmentation, whatever the protocol (dataset.py), to set beside the published ones.
OUR_AUGMENTATION = pub.REFLECT_PAD_CROP_FLIP
COMPARISON_RULE = ('Ours beside the published numbers: one row per method and pair (every published '
                   'number for the pairs with runs, and every run); ours "best / last" (mean ± std, n), '
                   'the published number (its source\'s reference: the method\'s own source first), Δ = '
                   'ours minus published (at the epoch the source reports: best unless it reports the '
                   'last; ± our std over seeds; "within 1 std" where that spread covers it). The Protocol '
                   'column marks with ≠ every cell whose protocol differs from the published one and says '
                   'how (epochs, runs averaged, padding of the crop, which epoch), and "?" for what the '
                   'source does not state; "1 run" marks a cell of one run: no spread, so a small Δ is not '
                   'a finding.')


class MalformedRun(Exception):
    """A run directory that cannot be read; the message says why."""


def warn(message):
    print(f'warning: {message}', file=sys.stderr)


def natural_key(name):
    """resnet8 < resnet20 < resnet110 (numbers compare as numbers)."""
    return [(0, int(p), '') if p.isdigit() else (1, 0, p) for p in re.split(r'(\d+)', str(name)) if p]


def score_keys(script):
    return ['net1', 'net2'] if script == 'train_dml.py' else ['net']


def last_log_line(run_dir):
    try:
        with open(os.path.join(run_dir, 'log.txt'), errors='replace') as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ''
    return lines[-1] if lines else ''


def read_run(run_dir):
    """A run directory -> dict (scores of the main phase, status); MalformedRun
    if unreadable or damaged (a history cut short, a score that is not a
    finite number: its numbers would be wrong)."""
    try:
        with open(os.path.join(run_dir, 'args.json')) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise MalformedRun(f'args.json is not readable JSON ({e})') from None
    if not isinstance(record, dict) or not isinstance(record.get('args'), dict):
        raise MalformedRun("args.json holds no 'args' object")
    args, script = record['args'], str(record.get('script', ''))
    rows = read_main_rows(run_dir)
    scores = {}
    for key in score_keys(script):
        col = 'test_top1' if key == 'net' else f'test_{key}_top1'
        if rows and col not in rows[0]:
            raise MalformedRun(f"metrics.csv has no '{col}' column")
        try:
            values = [float(r[col]) for r in rows if r.get(col) not in (None, '')]
        except ValueError as e:
            raise MalformedRun(f'metrics.csv: {col} is not a number ({e})') from None
        for r, v in zip((r for r in rows if r.get(col) not in (None, '')), values):
            if not math.isfinite(v):
                raise MalformedRun(f"metrics.csv: {col} is {r[col]} at main epoch {r['epoch']}, not a "
                                   f"finite accuracy")
        if values:
            scores[key] = {'best': max(values), 'last': values[-1]}
    complete = os.path.isfile(os.path.join(run_dir, COMPLETE_FILE))
    last_line = '' if complete else last_log_line(run_dir)
    status = 'complete' if complete else 'failed' if last_line.startswith('error: ') else 'unfinished'
    versions = record.get('versions') if isinstance(record.get('versions'), dict) else {}
    env = {'device': record.get('device'), 'torch': versions.get('torch'), 'commit': record.get('git_commit')}
    return {'dir': run_dir, 'script': script, 'args': args, 'scores': scores, 'env': env,
            'epochs_done': len(rows), 'complete': complete, 'status': status,
            'error': last_line if status == 'failed' else '', 'rows': rows}


def read_main_rows(run_dir):
    """metrics.csv's main-schedule rows, checked whole: a history that was cut
    off (an empty file, a last row cut mid-line, no rows though a checkpoint
    exists), a row with missing or extra fields, or main epochs other than
    1, 2, ... is a MalformedRun saying so."""
    metrics = os.path.join(run_dir, 'metrics.csv')
    checkpointed = os.path.isfile(os.path.join(run_dir, 'checkpoint.pth.tar'))
    if not os.path.exists(metrics):  # stopped before its first epoch, unless a checkpoint says otherwise
        if checkpointed:
            raise MalformedRun('metrics.csv is missing though checkpoint.pth.tar exists: the history '
                               'of its epochs is lost')
        return []
    try:
        with open(metrics, newline='') as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise MalformedRun(f'metrics.csv is not readable ({e})') from None
    if not text:
        raise MalformedRun('metrics.csv is empty (not even its header): the history of its epochs '
                           'is lost')
    whole, cut = without_cut_row(text)
    if cut is not None:
        raise MalformedRun(f'metrics.csv: its last row is cut off mid-line ({cut.strip()[:40]!r}; the run '
                           f'was killed while writing it; --resume drops that row)')
    if checkpointed and not text.partition('\n')[2].strip():
        raise MalformedRun('metrics.csv holds no epoch though checkpoint.pth.tar exists: the history '
                           'of its epochs is lost')
    try:
        with io.StringIO(whole, newline='') as f:
            rows = [r for r in csv.DictReader(f) if r['phase'] == 'main']
    except KeyError:
        raise MalformedRun("metrics.csv has no 'phase' column") from None
    except csv.Error as e:
        raise MalformedRun(f'metrics.csv is not readable ({e})') from None
    for r in rows:
        if None in r or None in r.values():
            raise MalformedRun(f"metrics.csv: the row of main epoch {r.get('epoch')} has "
                               f"{'more' if None in r else 'fewer'} fields than the header")
    if rows and 'epoch' not in rows[0]:
        raise MalformedRun("metrics.csv has no 'epoch' column")
    epochs = [r['epoch'] for r in rows]
    if epochs != [str(e) for e in range(1, len(rows) + 1)]:
        shown = ', '.join(map(str, epochs[:8])) + (', ...' if len(epochs) > 8 else '')
        raise MalformedRun(f'metrics.csv: the main epochs are {shown}, not 1, 2, ... in order '
                           f'(a row lost or repeated)')
    return rows


def collect_runs(root):
    """Every readable run under root, and how many were skipped: a malformed
    or damaged one is named in a warning (which file, why) and left out."""
    runs, skipped = [], 0
    for dirpath, dirnames, files in os.walk(root):
        dirnames.sort()
        if 'args.json' in files:
            try:
                runs.append(read_run(dirpath))
            except MalformedRun as e:
                warn(f'skipped {dirpath}: {e}')
                skipped += 1
    return sorted(runs, key=lambda r: r['dir']), skipped


def flag_text(value):
    """A recorded flag as text to show and group by: a string as it is, any
    other JSON value (a number, null, a list such as lr_decay_epochs, a dict)
    as its JSON text, so that any well-formed args.json can be summarised."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def mean_std(values):
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def table_of(script, args):
    """'crd' for runs of the CIFAR-100 benchmark's protocol (the benchmark's layout), else 'seed'."""
    crd = args.get('data_name') == 'cifar100' and args.get('protocol') == 'crd'
    return 'crd' if crd and script in ('train_base.py', 'train_kd.py') else 'seed'


def result_settings(script, args):
    """The flags that define a run's result: not the result-neutral ones nor the
    seed, and for train_kd.py not the flags of other methods (train_kd.py
    records every method's flag, but the run's method reads only its own)."""
    ignored = set(NOT_RESULT_FLAGS)
    method = METHODS.get(flag_text(args.get('kd_mode'))) if script == 'train_kd.py' else None
    if method is not None:
        ignored |= set(all_flags()) - set(method.flags)
    return {k: v for k, v in sorted(args.items()) if k not in ignored}


def one_run_per_seed(members):
    """Two runs of one experiment with the same seed are one replicate: keep the
    finished one (else the one with more epochs, else the later directory)."""
    by_seed = {}
    for run in members:
        by_seed.setdefault(json.dumps(run['args'].get('seed')), []).append(run)
    kept = []
    for seed, same in by_seed.items():
        best = max(same, key=lambda r: (r['complete'], r['status'] != 'failed', r['epochs_done'], r['dir']))
        if len(same) > 1:
            why = 'finished' if best['complete'] else f"{best['epochs_done']} epochs"
            warn(f"{len(same)} runs of one experiment with seed {seed} ({', '.join(r['dir'] for r in same)}) "
                 f"are one replicate: kept {best['dir']} ({why})")
        kept.append(best)
    return sorted(kept, key=lambda r: r['dir'])


def group_runs(runs):
    """Replicates (runs equal but for the seed, paths and flags their method
    does not read) -> one entry each, with mean ± std per network."""
    groups = {}
    for run in runs:
        key = (run['script'], json.dumps(result_settings(run['script'], run['args']), default=str))
        groups.setdefault(key, []).append(run)
    out = []
    for (script, _), members in groups.items():
        members = one_run_per_seed(members)
        a = members[0]['args']
        scored = [r for r in members if r['status'] != 'failed']
        g = {'script': script, 'args': a, 'runs': members, 'data': flag_text(a.get('data_name')),
             'epochs': '' if a.get('epochs') is None else flag_text(a.get('epochs')),
             'table': table_of(script, a), 'complete': all(r['complete'] for r in members),
             'unfinished': any(r['status'] == 'unfinished' for r in members),
             'failed': sum(r['status'] == 'failed' for r in members), 'variant': '',
             'settings': result_settings(script, a), **step_paths(members)}
        for key in score_keys(script):
            vals = [r['scores'][key] for r in scored if key in r['scores']]
            if vals:
                g[key] = {'n': len(vals), 'best': mean_std([v['best'] for v in vals]),
                          'last': mean_std([v['last'] for v in vals])}
        if script == 'train_base.py':
            g.update(teacher='-', student=flag_text(a.get('net_name')), name='Baseline', mode='', key='')
        elif script == 'train_kd.py':
            mode = flag_text(a.get('kd_mode'))
            names = {**DISPLAY, **CRD_DISPLAY} if g['table'] == 'crd' else DISPLAY
            g.update(teacher=flag_text(a.get('t_name')), student=flag_text(a.get('s_name')), mode=mode,
                     name=names.get(mode, str(mode).upper()), key=pub.variant_key(mode, a))
        else:
            g.update(teacher=flag_text(a.get('net1_name')), student=flag_text(a.get('net2_name')), name='DML',
                     mode='dml', key='dml')
        out.append(g)
    # Same method and networks but other settings: say what differs in the name.
    by_label = {}
    for g in out:
        by_label.setdefault((g['table'], g['script'], g['teacher'], g['student'], g['name'], g['data']),
                            []).append(g)
    for same in by_label.values():
        if len(same) > 1:
            keys = sorted({k for g in same for k in g['settings']})
            differing = [k for k in keys
                         if len({json.dumps(g['settings'].get(k), default=str) for g in same}) > 1]
            for g in same:
                g['variant'] = ' (' + ', '.join(f'{k}={g["settings"].get(k)}' for k in differing) + ')'
                g['name'] += g['variant']
    return out


def step_paths(runs):
    """How the main-schedule steps of `runs` ran, from metrics.csv: 'step_path'
    (each path, in the order first seen; '' for runs from before it was
    recorded) and 'step_fallback' (whether any epoch fell back)."""
    rows = [r for run in runs for r in run['rows']]
    paths = dict.fromkeys(r.get('step_path') for r in rows if r.get('step_path'))
    return {'step_path': ', '.join(paths), 'step_fallback': any(r.get('step_fallback') for r in rows)}


def step_path_note(g):
    """The cell's note on its step path: none for plain eager runs (the default)."""
    if not g['step_path'] or (g['step_path'] == 'eager' and not g['step_fallback']):
        return ''
    return f" [{g['step_path']}{': fallback' if g['step_fallback'] else ''}]"


def format_score(entry, complete):
    (bm, bs), (lm, ls), n = entry['best'], entry['last'], entry['n']
    text = f'{bm:.2f} ± {bs:.2f} / {lm:.2f} ± {ls:.2f} (n={n})' if n > 1 else f'{bm:.2f} / {lm:.2f}'
    return text + ('' if complete else ' *')


def format_cell(g, key='net'):
    """A group's cell: its numbers (or '-'), * while a run is unfinished, and its failed runs."""
    if key not in g:
        if g['failed'] and not g['unfinished']:
            return 'failed'
        text = '- *' if g['unfinished'] else '-'
    else:
        text = format_score(g[key], not g['unfinished']) + step_path_note(g)
    return text + (f' ({g["failed"]} failed)' if g['failed'] else '')


def status_of(g):
    return 'complete' if g['complete'] else 'unfinished' if g['unfinished'] else 'failed'


def published_record(g, dataset=None, net='net'):
    """The published number set beside a group's network `net` (DML: 'net1'
    or 'net2'), from published.reference (the method's own source first), or None."""
    return pub.reference(g['key'], g['teacher'], g['student'], dataset or g['data'], g['table'], g['args'], net)


def csv_row(g, key, dataset):
    entry = g.get(key)
    record = published_record(g, dataset, key)
    return {'kind': g['name'].split(' ')[0], 'teacher': g['teacher'], 'student': g['student'],
            'name': g['name'], 'dataset': dataset, 'net': key, 'epochs': g['epochs'],
            'n': entry['n'] if entry else 0,
            'best_mean': entry['best'][0] if entry else '', 'best_std': entry['best'][1] if entry else '',
            'last_mean': entry['last'][0] if entry else '', 'last_std': entry['last'][1] if entry else '',
            'complete': g['complete'], 'status': status_of(g), 'failed': g['failed'], 'table': g['table'],
            'published': '' if record is None else record.top1,
            'published_epochs': '' if record is None or record.protocol.epochs is None else record.protocol.epochs,
            'published_source': '' if record is None else f'{record.source.name}, {record.table}',
            'step_path': g['step_path'], 'step_fallback': g['step_fallback'],
            'runs': ' '.join(r['dir'] for r in g['runs'])}


def epochs_cell(columns):
    """A table row's Epochs: the schedule length of its cells' runs, one number,
    or each column's where they differ (`columns`: [(column name, group)])."""
    lengths = {g['epochs'] for _, g in columns}
    if len(lengths) <= 1:
        return lengths.pop() if lengths else ''
    return ', '.join(f"{g['epochs']} ({name})" for name, g in columns)


def markdown_table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])


def summary_tables(groups):
    """Markdown tables as the seed's README has them, each as (caption, table),
    and CSV rows of the same data."""
    groups = [g for g in groups if g['table'] == 'seed']
    datasets = [d for d in DATA_COLUMNS if any(g['data'] == d for g in groups)]
    order = {m: i for i, m in enumerate(SEED_ORDER)}
    single = [g for g in groups if g['script'] != 'train_dml.py']
    dml = [g for g in groups if g['script'] == 'train_dml.py']
    baselines = [g for g in single if g['script'] == 'train_base.py']
    pairs = sorted({(g['teacher'], g['student']) for g in single if g['script'] == 'train_kd.py'},
                   key=lambda p: (natural_key(p[0]), natural_key(p[1])))
    tables, csv_rows = [], []

    def line(label_cols, matching, key='net'):
        cells, shown = [], []
        for d in datasets:
            found = [g for g in matching if g['data'] == d]
            cells.append(format_cell(found[0], key) if found else '')
            shown += [(DATA_COLUMNS[d], found[0])] if found else []
            csv_rows.extend(csv_row(g, key, d) for g in found)
        return label_cols + [epochs_cell(shown)] + cells

    def label_groups(candidates):
        names = sorted({g['name'] for g in candidates},
                       key=lambda n: (order.get(next(g['mode'] for g in candidates if g['name'] == n), 99), n))
        return [(n, [g for g in candidates if g['name'] == n]) for n in names]

    if not pairs and baselines:  # baselines only: one table of them
        rows = [line(['-', net, name], gs) for net in sorted({g['student'] for g in baselines}, key=natural_key)
                for name, gs in label_groups([g for g in baselines if g['student'] == net])]
        tables.append((f'Baselines: {CELL_RULE}.',
                       markdown_table(['Teacher', 'Student', 'Name', 'Epochs'] + [DATA_COLUMNS[d] for d in datasets],
                                      rows)))
    for t, s in pairs:
        rows = []
        for net in sorted({s, t}, key=lambda n: (n != s, n)):  # the student's baseline first
            for name, gs in label_groups([g for g in baselines if g['student'] == net]):
                rows.append(line(['-', net, name], gs))
        kd = [g for g in single if g['script'] == 'train_kd.py' and (g['teacher'], g['student']) == (t, s)]
        for name, gs in label_groups(kd):
            rows.append(line([t, s, name], gs))
        baselines_of = f'the baseline of {s}' if s == t else 'the baselines of both networks'
        tables.append((f'{t} → {s}: {baselines_of}, then each method distilling {t} into {s}; {CELL_RULE}.',
                       markdown_table(['Teacher', 'Student', 'Name', 'Epochs'] + [DATA_COLUMNS[d] for d in datasets],
                                      rows)))
    if dml:
        rows = []
        for net in sorted({g['teacher'] for g in dml} | {g['student'] for g in dml}, key=natural_key):
            for name, gs in label_groups([g for g in baselines if g['student'] == net]):
                rows.append(line(['-', net, name, net], gs))
        for n1, n2 in sorted({(g['teacher'], g['student']) for g in dml}):
            for name, gs in label_groups([g for g in dml if (g['teacher'], g['student']) == (n1, n2)]):
                rows.append(line([n1, n2, name, f'net1 ({n1})'], gs, 'net1'))
                rows.append(line([n1, n2, name, f'net2 ({n2})'], gs, 'net2'))
        tables.append((f'Deep mutual learning (DML): each network of a pair, after the baselines of '
                       f'both; {CELL_RULE}.',
                       markdown_table(['Net1', 'Net2', 'Name', 'Net', 'Epochs'] +
                                      [DATA_COLUMNS[d] for d in datasets], rows)))
    unique = {tuple(r[k] for k in ('teacher', 'student', 'name', 'dataset', 'net')): r for r in csv_rows}
    return tables, list(unique.values())


def crd_pairs(groups):
    """The benchmark table's columns: each pair with KD runs, and each of the
    13 whose two baselines have runs; the README's order, then others by name."""
    base_nets = {g['student'] for g in groups if g['table'] == 'crd' and g['script'] == 'train_base.py'}
    pairs = {(g['teacher'], g['student']) for g in groups if g['table'] == 'crd' and g['script'] == 'train_kd.py'}
    pairs |= {p for p in CRD_PAIRS if p[0] in base_nets and p[1] in base_nets}  # baselines done, KD to come
    return sorted(pairs, key=lambda p: (CRD_PAIRS.index(p) if p in CRD_PAIRS else len(CRD_PAIRS),
                                        natural_key(p[0]), natural_key(p[1])))


def method_label(method, settings=None, net='net'):
    """A published.py key as the tables show it: 'st' -> 'KD', 'dkd+logit_stand'
    -> 'DKD+LS', with the record's settings (SimKD's factor) in brackets and
    the network of a DML pair ('DML net1')."""
    mode, *switches = method.split('+')
    names = {**DISPLAY, **CRD_DISPLAY}
    label = '+'.join([names.get(mode, mode.upper())] + [VARIANT_DISPLAY.get(x, x) for x in switches])
    if settings:
        label += ' (' + ', '.join(f'{k}={v}' for k, v in settings.items()) + ')'
    return label if net == 'net' else f'{label} {net}'


def row_order(method):
    """Teacher, Student, then the benchmark's order of modes, a variant after its mode."""
    order = {m: i for i, m in enumerate(['teacher', 'student'] + CRD_ROW_ORDER)}
    mode = pub.base_mode(method)
    return (order.get(mode, len(order)), mode, method)


def published_rows(pairs):
    """The benchmark table's "(published)" rows for its columns `pairs`: one
    per method (and settings) any source gives for them, each cell the
    reference number (the first source listed in published.py)."""
    cells = {}   # (method, settings) -> {column: record}
    for r in pub.RECORDS:
        if r.benchmark == 'crd' and (r.teacher, r.student) in pairs:
            column = pairs.index((r.teacher, r.student))
            cells.setdefault((r.method, tuple(r.settings.items())), {}).setdefault(column, r)
    rows = []
    for (method, settings), found in sorted(cells.items(), key=lambda kv: (row_order(kv[0][0]), kv[0][1])):
        epochs = {r.protocol.epochs for r in found.values()}
        shown = str(epochs.pop() or '?') if len(epochs) == 1 else ', '.join(
            f'{found[i].protocol.epochs or "?"} ({t}→{s})' for i, (t, s) in enumerate(pairs) if i in found)
        rows.append([f'{method_label(method, dict(settings))} (published)', shown] +
                    [published_number(found[i]) if i in found else '' for i in range(len(pairs))])
    return rows


def published_number(record):
    return f'{record.top1:.2f}' + (f' ± {record.std:.2f}' if record.std is not None else '')


def crd_table(groups, published=False):
    """The CIFAR-100 benchmark's layout (RepDistiller's README): one column per
    teacher→student pair, rows Teacher and Student (the baselines), KD, then the
    other methods; with `published`, the published rows first. Returns
    ([(caption, Markdown table)], CSV rows): the benchmark's table (once a pair
    has runs) and the baselines of networks in no pair yet (if any)."""
    groups = [g for g in groups if g['table'] == 'crd']
    baselines = [g for g in groups if g['script'] == 'train_base.py']
    kd = [g for g in groups if g['script'] == 'train_kd.py']
    pairs = crd_pairs(groups)
    csv_rows = [csv_row(g, 'net', 'cifar100') for g in baselines + kd]
    # baselines of networks in no column (no pair of theirs has runs yet): listed after the table
    others = [g for g in sorted(baselines, key=lambda g: (natural_key(g['student']), g['name']))
              if not any(g['student'] in p for p in pairs)]
    others = [(f'Baselines (--protocol crd) of networks in no benchmark pair with runs yet: {CELL_RULE}.',
               markdown_table(['Network', 'Epochs', 'Baseline (--protocol crd)'],
                              [[g['student'] + g['variant'], g['epochs'], format_cell(g)] for g in others]))
              ] if others else []
    if not pairs:
        return others, csv_rows
    columns = [f'{t}→{s}' for t, s in pairs]
    header = ['Method', 'Epochs'] + columns
    rows = []
    if published:
        rows += published_rows(pairs)

    def add_rows(cell_groups):  # {(row label, column index): group} -> rows, in first-seen label order
        labels = list(dict.fromkeys(label for label, _ in cell_groups))
        for label in labels:
            shown = [(columns[i], cell_groups[(label, i)]) for i in range(len(pairs)) if (label, i) in cell_groups]
            rows.append([label, epochs_cell(shown)] +
                        [format_cell(cell_groups[(label, i)]) if (label, i) in cell_groups else ''
                         for i in range(len(pairs))])

    for role, net_of in (('Teacher', lambda p: p[0]), ('Student', lambda p: p[1])):
        add_rows({(role + g['variant'], i): g for i, p in enumerate(pairs)
                  for g in baselines if g['student'] == net_of(p)})
    order = {m: i for i, m in enumerate(CRD_ROW_ORDER)}
    add_rows({(g['name'], pairs.index((g['teacher'], g['student']))): g
              for g in sorted(kd, key=lambda g: (order.get(g['mode'], len(order)), g['name']))})
    caption = CRD_RULE + (' Rows "(published)" first: every published number for these pairs, each from its '
                          'reference source (Teacher to CRD: Tian et al., ICLR 2020, RepDistiller README; '
                          'each newer method: its own source), with the epochs it was trained (? where not '
                          'stated); the comparison table below names each source and protocol.'
                          if published else '')
    return [(caption, markdown_table(header, rows))] + others, csv_rows


def comparison_entries(groups):
    """Ours beside the published numbers, one entry per method and pair: every
    group of a layout's pairs and every published number for those pairs (the
    benchmark's columns; the seed's pairs with runs, per dataset), each with
    its group (None: not run), its reference record (None: none published), Δ
    and the protocol note (a DML pair: one entry per network)."""
    entries = []
    crd = [g for g in groups if g['table'] == 'crd']
    entries += layout_entries(crd, 'crd', 'cifar100', crd_pairs(groups))
    seed = [g for g in groups if g['table'] == 'seed']
    for data in DATA_COLUMNS:
        here = [g for g in seed if g['data'] == data]
        pairs = sorted({(g['teacher'], g['student']) for g in here if g['script'] != 'train_base.py'},
                       key=lambda p: (natural_key(p[0]), natural_key(p[1])))
        entries += layout_entries(here, 'seed', data, pairs)
    return entries


def layout_entries(groups, benchmark, data, pairs):
    """comparison_entries of one layout and dataset: the baselines of the
    networks in `pairs` (and of any other network with a baseline run), then
    each pair's methods in the benchmark's row order."""
    entries = []
    baselines = [g for g in groups if g['script'] == 'train_base.py']
    nets = list(dict.fromkeys([n for p in pairs for n in p if n != '-'] +
                              sorted({g['student'] for g in baselines}, key=natural_key)))
    for net in nets:
        ours = [g for g in baselines if g['student'] == net]
        for g in ours:
            entries.append(entry(g, published_record(g, data), 'Baseline' + g['variant'], '-', net, data))
        record = pub.reference('', '-', net, data, benchmark)
        if not ours and record is not None:
            entries.append(entry(None, record, 'Baseline', '-', net, data))
    for t, s in pairs:
        ours = sorted([g for g in groups if g['script'] != 'train_base.py' and (g['teacher'], g['student']) == (t, s)],
                      key=lambda g: (row_order(g['key']), g['name']))
        for g in ours:
            for net in score_keys(g['script']):
                entries.append(entry(g, published_record(g, data, net), method_label(g['key'], net=net) + g['variant'],
                                     t, s, data, net))
        shown = set()
        for r in pub.RECORDS:
            if (r.benchmark, r.dataset, r.teacher, r.student) != (benchmark, data, t, s) or r.method in pub.BASELINES:
                continue
            if (r.method, r.net, tuple(r.settings.items())) in shown:
                continue  # a later source of a number already listed: the report lists them all
            shown.add((r.method, r.net, tuple(r.settings.items())))
            if not any(g['key'] == r.method and all(g['args'].get(k) == v for k, v in r.settings.items())
                       for g in ours):
                entries.append(entry(None, r, method_label(r.method, r.settings, r.net), t, s, data, r.net))
    order = {(t, s): i for i, (t, s) in enumerate(pairs)}
    kd = sorted((e for e in entries if e['teacher'] != '-'),
                key=lambda e: (order[(e['teacher'], e['student'])], row_order(e['key']), e['method']))
    return [e for e in entries if e['teacher'] == '-'] + kd


def entry(g, record, method, teacher, student, data, net='net'):
    """One comparison row's data: Δ = ours minus published at the epoch the
    source reports (best unless it says last), with our std over seeds; none
    while a run of the cell is unfinished."""
    e = {'group': g, 'record': record, 'method': method, 'teacher': teacher, 'student': student,
         'data': data, 'key': g['key'] if g else record.method, 'delta': None, 'delta_std': None,
         'benchmark': g['table'] if g else record.benchmark,
         'n': g[net]['n'] if g and net in g else 0, 'net': net}
    if g is not None and net in g and record is not None and not g['unfinished']:  # partial numbers: no Δ
        e['which'] = 'last' if record.protocol.epoch == 'last' else 'best'
        mean, std = g[net][e['which']]
        e['delta'], e['delta_std'] = mean - record.top1, std
    e['protocol'] = protocol_note(g, record, e['n'])
    return e


def padding_of(augmentation):
    return 'reflect' if 'reflect' in augmentation else 'zero' if 'zero' in augmentation else augmentation


def protocol_note(g, record, n):
    """How our protocol compares with the published number's: '≠' and what
    differs, '?' and what the source does not state, '1 run' for one run."""
    if g is None:
        return 'published: ' + record.protocol.describe()
    ours = f"ours: {g['epochs']} epochs, {n} run{'' if n == 1 else 's'}"
    if record is None:
        return ours
    p, differ, unknown = record.protocol, [], []
    if p.epochs is None:
        unknown.append('epochs')
    elif str(p.epochs) != str(g['epochs']):
        differ.append(f"{g['epochs']} vs {p.epochs} epochs")
    if p.runs is None:
        unknown.append('runs averaged' + (f' ({p.statistic})' if p.statistic else ''))
    elif p.runs != n:
        differ.append(f'{n} vs {p.runs} runs')
    if p.augmentation is None:
        unknown.append('augmentation')
    elif p.augmentation != OUR_AUGMENTATION:
        differ.append(f'{padding_of(OUR_AUGMENTATION)} vs {padding_of(p.augmentation)} padding of the crop')
    if p.epoch is None:
        unknown.append('best or last epoch')
    parts = (['≠ ' + '; '.join(differ)] if differ else []) + \
            (['? ' + ', '.join(unknown) + ' not stated'] if unknown else [])
    return '; '.join((parts or ['= same protocol']) + (['1 run'] if n == 1 else []))


def delta_text(e):
    if e['delta'] is None:
        return ''
    text = f"{e['delta']:+.2f}"
    if e['n'] > 1:
        text += f" ± {e['delta_std']:.2f}" + (' (within 1 std)' if abs(e['delta']) <= e['delta_std'] else '')
    return text + (' (last)' if e.get('which') == 'last' else '')


def comparison_tables(entries):
    """The comparison tables ([(caption, Markdown)]): the benchmark's, then the
    seed's; each followed by its sources (title, URL)."""
    tables = []
    for benchmark, what in (('crd', 'CIFAR-100 benchmark (--protocol crd)'), ('seed', "the seed's tables")):
        mine = [e for e in entries if e['benchmark'] == benchmark]
        if not mine:
            continue
        rows = [[e['method'], e['student'] if e['teacher'] == '-' else f"{e['teacher']}→{e['student']}",
                 DATA_COLUMNS.get(e['data'], e['data']),
                 'not run' if e['group'] is None else
                 format_cell(e['group'], e['net']) + (' (1 run)' if e['n'] == 1 else ''),
                 published_number(e['record']) if e['record'] else 'none', delta_text(e), e['protocol'],
                 '' if e['record'] is None else f"{e['record'].source.name}, {e['record'].table}" +
                 (f"; {e['record'].note}" if e['record'].note else '')]
                for e in mine]
        sources = list(dict.fromkeys(e['record'].source for e in mine if e['record']))
        table = markdown_table(['Method', 'Teacher→Student', 'Data', 'Ours: best / last', 'Published',
                                'Δ (ours − published)', 'Protocol (ours vs published)', 'Source'], rows)
        table += '\n\nSources:\n' + '\n'.join(f'- {s.name}: {s.title}, {s.url}' for s in sources)
        tables.append((f'{what}: {COMPARISON_RULE}', table))
    return tables


def summary(argv=None):
    """The summary command; a UserError for a root without runs (see `main`)."""
    parser = ArgumentParser(
        prog='python summarize.py',
        description='Walk a results root and print the comparison tables (Markdown), writing '
                    'the same data as CSV; optionally set the published numbers beside ours, write '
                    'a report, draw test-accuracy curves.')
    parser.add_argument('root', nargs='?', default='./results')
    parser.add_argument('--csv', default=None, help='CSV path (default: ROOT/summary.csv)')
    parser.add_argument('--published', action='store_true',
                        help='set the published numbers (published.py) beside ours: "(published)" rows in '
                             "the benchmark's table, then per layout a table of ours, published, their "
                             'difference and how the protocols differ')
    parser.add_argument('--report', default=None, metavar='MD',
                        help='also write one Markdown report: the tables with the published numbers, the '
                             'protocols side by side, a plot of ours minus published (a PNG of the same name '
                             'beside it; needs matplotlib, without which the report says so) and the '
                             'environment of each run (device, torch, commit)')
    parser.add_argument('--plot', default=None, metavar='PNG',
                        help='draw test top-1 per epoch of the runs matching --runs (needs matplotlib)')
    parser.add_argument('--runs', nargs='+', default=['*'], metavar='PATTERN',
                        help='run names (the --note) to plot, shell-style patterns')
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        raise UserError(f'{args.root} is not a directory')
    if args.report is not None:
        folder = os.path.dirname(os.path.abspath(args.report))
        if not os.path.isdir(folder) or os.path.isdir(args.report):
            raise UserError(f'--report {args.report}: ' + ('is a directory' if os.path.isdir(args.report)
                                                            else f'its folder {folder} does not exist'))
    runs, skipped = collect_runs(args.root)
    if not runs:
        raise UserError(f'no readable runs under {args.root}: {skipped} skipped (see the warnings above)'
                        if skipped else f'no runs under {args.root} (a run directory holds args.json)')
    groups = group_runs(runs)
    for g in groups:
        if g['table'] == 'seed' and g['data'] not in DATA_COLUMNS:
            warn(f"{' '.join(r['dir'] for r in g['runs'])}: data_name {g['data']} has no column in the "
                 f"tables ({', '.join(DATA_COLUMNS)}); left out of them")
    tables, rows = summary_tables(groups)
    crd, crd_rows = crd_table(groups, args.published)
    if args.published and not crd:
        warn(f'--published: no runs of the CIFAR-100 benchmark (--protocol crd) under {args.root}')
    entries = comparison_entries(groups) if args.published or args.report else []
    shown = tables + crd + (comparison_tables(entries) if args.published else [])
    print(REPORTING_RULE)
    for number, (caption, table) in enumerate(shown, start=1):
        print(f'\nTable {number}. {caption}\n\n{table}')
    rows += crd_rows
    path = args.csv or os.path.join(args.root, 'summary.csv')
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=list(rows[0]) if rows else ['table'])
    w.writeheader()
    w.writerows(rows)
    write_text_atomically(path, text.getvalue())
    damaged = f' ({skipped} more skipped: damaged or unreadable, named above)' if skipped else ''
    print(f'\n{len(runs)} runs{damaged}; CSV written to {path}')
    if args.report:
        write_report(args.report, args.root, groups, tables + crd_table(groups, True)[0] +
                     comparison_tables(entries), entries)
    if args.plot:
        plot_curves(runs, args.runs, args.plot)


def import_pyplot():
    """matplotlib's pyplot on the file backend, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_report(path, root, groups, tables, entries):
    """The Markdown report: the tables (with the published numbers), the
    protocols side by side, the plot of ours minus published (PNG beside the
    report, or a line saying why there is none) and each run's environment."""
    compared = [e for e in entries if e['delta'] is not None]
    png = os.path.splitext(path)[0] + '.png'
    plt = import_pyplot()
    if not compared:
        plot = 'No cell has both our numbers and a published one: nothing to plot.'
    elif plt is None:
        plot = ('The plot of ours minus published was not drawn: matplotlib is not installed '
                '(`pip install -r requirements-plots.txt`). The tables above hold the same numbers.')
    else:
        fig = delta_figure(plt, compared)
        fig.savefig(png, dpi=120)
        plt.close(fig)
        plot = (f'![ours minus published]({os.path.basename(png)})\n\nEach point: our mean minus the '
                f'published number for one method and pair; the bar: ± our standard deviation over seeds '
                f'(none for one run).')
    lines = [f'# KD zoo: results beside the published numbers', '',
             f'Results root `{root}`, summarised {time.strftime("%Y-%m-%d %H:%M:%S")} by '
             f'`python summarize.py {root} --report {path}`.', '', REPORTING_RULE, '', '## Tables']
    for number, (caption, table) in enumerate(tables, start=1):
        lines += ['', f'Table {number}. {caption}', '', table]
    lines += ['', '## Protocols side by side', '', protocols_table(groups, entries),
              '', '## Ours minus published', '', plot,
              '', '## Every published number for the pairs and networks compared', '',
              'Where several sources give a number for one method and pair, the tables use the first '
              '(published.py lists each method\'s own source first); all of them:', '',
              all_published_table(entries),
              '', '## Environment of each run', '',
              'From each run\'s args.json: the device it ran on, the torch version and the commit of this '
              'code.', '', environment_table(groups)]
    write_text_atomically(path, '\n'.join(lines) + '\n')
    print(f'report written to {path}' + (f' (plot: {png})' if compared and plt is not None else ''))


def protocols_table(groups, entries):
    """Our protocol (from the runs) beside each published source's."""
    ours = groups
    epochs = ', '.join(sorted({g['epochs'] for g in ours}, key=natural_key))
    ns = sorted({g[k]['n'] for g in ours for k in score_keys(g['script']) if k in g})
    runs = (f'{ns[0]}' if len(ns) == 1 else f'{ns[0]} to {ns[-1]}') + ' per cell' if ns else 'none finished'
    rows = [['Ours (this results root)', epochs, OUR_AUGMENTATION, 'best and last, both shown',
             runs + ', mean ± sample std', 'args.json, metrics.csv']]
    seen = list(dict.fromkeys((e['record'].source, e['record'].protocol) for e in entries if e['record']))
    for source, p in seen:
        rows.append([source.name, str(p.epochs or 'not stated'), p.augmentation or 'not stated',
                     p.epoch or 'not stated', (f'{p.runs}' if p.runs else 'not stated') +
                     (f', {p.statistic}' if p.statistic else ''), p.basis])
    return markdown_table(['Numbers', 'Epochs', 'Augmentation', 'Epoch reported', 'Runs averaged', 'From'], rows)


def all_published_table(entries):
    """Every record for the pairs compared, and every baseline number of the
    networks compared (as teacher or student of any pair), layout by layout."""
    pairs = {(e['benchmark'], e['data'], e['teacher'], e['student']) for e in entries}
    nets = {(e['benchmark'], e['data'], e['student']) for e in entries if e['teacher'] == '-'}
    rows = [[method_label(r.method, r.settings, r.net), f'{r.teacher}→{r.student}',
             DATA_COLUMNS.get(r.dataset, r.dataset), published_number(r), r.protocol.describe(),
             f'{r.source.name}, {r.table}' + (f'; {r.note}' if r.note else '')]
            for r in pub.RECORDS
            if (r.benchmark, r.dataset, r.teacher, r.student) in pairs
            or (r.method in pub.BASELINES and ((r.benchmark, r.dataset, r.student) in nets or
                                               (r.benchmark, r.dataset, r.teacher) in nets))]
    return markdown_table(['Method', 'Teacher→Student', 'Data', 'Top-1', 'Protocol', 'Source'], rows) \
        if rows else 'None.'


def environment_table(groups):
    rows = []
    for g in sorted(groups, key=lambda g: g['runs'][0]['dir']):
        for r in g['runs']:
            env = r['env']
            rows.append([os.path.basename(r['dir']), g['name'], r['status'], flag_text(env['device'] or '?'),
                         flag_text(env['torch'] or '?'), flag_text(env['commit'] or '?')])
    return markdown_table(['Run', 'Method', 'Status', 'Device', 'Torch', 'Commit'], rows)


def delta_figure(plt, compared):
    """Ours minus published per method and pair, with ± our std as error bars."""
    height = 1.5 + 0.28 * len(compared)
    fig, ax = plt.subplots(figsize=(8, height))
    labels = [f"{e['method']}  {e['student'] if e['teacher'] == '-' else e['teacher'] + '→' + e['student']}"
              + ('' if e['benchmark'] == 'crd' else f" (seed table, {DATA_COLUMNS.get(e['data'], e['data'])})")
              + (' [1 run]' if e['n'] == 1 else '') for e in compared]
    y = list(range(len(compared)))[::-1]
    ax.errorbar([e['delta'] for e in compared], y, xerr=[e['delta_std'] for e in compared], fmt='o', capsize=3)
    ax.axvline(0, color='grey', linewidth=1)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel('ours minus published, top-1 (percentage points)')
    ax.set_title('Ours minus published per method and pair (± our std over seeds)', fontsize=10)
    ax.grid(alpha=0.3, axis='x')
    fig.tight_layout()
    return fig


def plot_curves(runs, patterns, path):
    import fnmatch
    plt = import_pyplot()
    if plt is None:
        raise UserError('--plot needs matplotlib (pip install -r requirements-plots.txt); the tables above do not')
    chosen = [r for r in runs if r['scores']
              and any(fnmatch.fnmatch(os.path.basename(r['dir']), p) for p in patterns)]
    if not chosen:
        raise UserError(f'no run matches {" ".join(patterns)} (among the runs with test accuracies)')
    fig = curves_figure(plt, chosen)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f'curves of {len(chosen)} runs written to {path}')


def curves_figure(plt, chosen):
    """Test top-1 per main-schedule epoch of the `chosen` runs: whole-epoch
    ticks, a title naming the runs."""
    from matplotlib.ticker import MaxNLocator
    fig, ax = plt.subplots(figsize=(8, 5))
    names = [os.path.basename(r['dir']) for r in chosen]
    for r in chosen:
        name = os.path.basename(r['dir'])
        for key in r['scores']:
            col = 'test_top1' if key == 'net' else f'test_{key}_top1'
            points = [(int(x['epoch']), float(x[col])) for x in r['rows'] if x.get(col) not in (None, '')]
            ax.plot([e for e, _ in points], [v for _, v in points],
                    label=name if key == 'net' else f'{name} {key}')
    shown = ', '.join(names[:3]) + (f' and {len(names) - 3} more' if len(names) > 3 else '')
    ax.set_title(f'Test top-1 per epoch of the main schedule: {shown}', fontsize=10)
    ax.set_xlabel('epoch')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 1.5
    ax.set_ylabel('test top-1 (%)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


main = cli(summary)

if __name__ == '__main__':
    main()
