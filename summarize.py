"""Summarise a results root: the comparison tables, a CSV, test-accuracy curves.

    python summarize.py ./results                     # Markdown tables + ./results/summary.csv
    python summarize.py ./results --plot curves.png --runs 'st-*'   # needs matplotlib

Every run directory (args.json + metrics.csv) under the root is read; runs
that differ only in their seed and result-neutral flags are replicates of
one experiment and are reported as mean ± sample standard deviation.
"""
import argparse
import csv
import json
import math
import os

from errors import UserError, cli
from records import RESULT_NEUTRAL_FLAGS

SEED_ORDER = ['logits', 'st', 'at', 'fitnet', 'nst', 'pkt', 'fsp', 'ft', 'rkd', 'ab', 'sp',
              'sobolev', 'bss', 'cc', 'lwm', 'irg', 'vid', 'ofd', 'afd', 'crd']
DISPLAY = {'logits': 'Logits', 'fitnet': 'Fitnet', 'sobolev': 'Sobolev', 'lwm': 'LwM'}
DATA_COLUMNS = {'cifar10': 'CIFAR10', 'cifar100': 'CIFAR100'}
# Runs that differ only in these flags are replicates of one experiment.
NOT_RESULT_FLAGS = RESULT_NEUTRAL_FLAGS | {'seed'}
REPORTING_RULE = ('Top-1 test accuracy (%) as "best / last": the best epoch and the last epoch of '
                  'the main schedule. Where several seeds of the same run exist: mean ± sample '
                  'standard deviation over them, with n. * marks runs not finished yet.')


def read_run(run_dir):
    """A finished or running run directory -> dict, or None if it is not a run."""
    try:
        with open(os.path.join(run_dir, 'args.json')) as f:
            record = json.load(f)
        with open(os.path.join(run_dir, 'metrics.csv'), newline='') as f:
            rows = [r for r in csv.DictReader(f) if r['phase'] == 'main']
    except (OSError, ValueError, KeyError):
        return None
    args = record.get('args', {})
    script = record.get('script', '')
    keys = ['net1', 'net2'] if script == 'train_dml.py' else ['net']
    scores = {}
    for key in keys:
        col = 'test_top1' if key == 'net' else f'test_{key}_top1'
        values = [float(r[col]) for r in rows if r.get(col) not in (None, '')]
        if values:
            scores[key] = {'best': max(values), 'last': values[-1]}
    return {'dir': run_dir, 'script': script, 'args': args, 'scores': scores,
            'epochs_done': len(rows), 'complete': len(rows) >= int(args.get('epochs', 0) or 0) > 0,
            'rows': rows}


def collect_runs(root):
    runs = []
    for dirpath, _, files in os.walk(root):
        if 'args.json' in files and 'metrics.csv' in files:
            run = read_run(dirpath)
            if run is not None and run['scores']:
                runs.append(run)
    return sorted(runs, key=lambda r: r['dir'])


def mean_std(values):
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def group_runs(runs):
    """Replicates (runs equal but for the seed and paths) -> one entry each."""
    groups = {}
    for run in runs:
        key = (run['script'], json.dumps({k: v for k, v in sorted(run['args'].items())
                                          if k not in NOT_RESULT_FLAGS}, default=str))
        groups.setdefault(key, []).append(run)
    out = []
    for (script, _), members in groups.items():
        a = members[0]['args']
        g = {'script': script, 'args': a, 'runs': members, 'data': a.get('data_name'),
             'complete': all(r['complete'] for r in members)}
        for key in members[0]['scores']:
            vals = [r['scores'][key] for r in members if key in r['scores']]
            g[key] = {'n': len(vals), 'best': mean_std([v['best'] for v in vals]),
                      'last': mean_std([v['last'] for v in vals])}
        if script == 'train_base.py':
            g.update(teacher='-', student=a.get('net_name'), name='Baseline', mode='')
        elif script == 'train_kd.py':
            g.update(teacher=a.get('t_name'), student=a.get('s_name'), mode=a.get('kd_mode'),
                     name=DISPLAY.get(a.get('kd_mode'), str(a.get('kd_mode')).upper()))
        else:
            g.update(teacher=a.get('net1_name'), student=a.get('net2_name'), name='DML', mode='dml')
        out.append(g)
    # Same method and networks but other settings: say what differs in the name.
    by_label = {}
    for g in out:
        by_label.setdefault((g['script'], g['teacher'], g['student'], g['name'], g['data']), []).append(g)
    for same in by_label.values():
        if len(same) > 1:
            differing = [k for k in same[0]['args'] if k not in NOT_RESULT_FLAGS
                         and len({json.dumps(g['args'].get(k), default=str) for g in same}) > 1]
            for g in same:
                g['name'] += ' (' + ', '.join(f'{k}={g["args"].get(k)}' for k in differing) + ')'
    return out


def format_score(entry, complete):
    (bm, bs), (lm, ls), n = entry['best'], entry['last'], entry['n']
    text = f'{bm:.2f} ± {bs:.2f} / {lm:.2f} ± {ls:.2f} (n={n})' if n > 1 else f'{bm:.2f} / {lm:.2f}'
    return text + ('' if complete else ' *')


def summary_tables(groups):
    """Markdown tables as the seed's README has them, and CSV rows of the same data."""
    datasets = [d for d in DATA_COLUMNS if any(g['data'] == d for g in groups)]
    order = {m: i for i, m in enumerate(SEED_ORDER)}
    single = [g for g in groups if g['script'] != 'train_dml.py']
    dml = [g for g in groups if g['script'] == 'train_dml.py']
    baselines = [g for g in single if g['script'] == 'train_base.py']
    pairs = sorted({(g['teacher'], g['student']) for g in single if g['script'] == 'train_kd.py'},
                   key=lambda p: (int(p[0][6:]), int(p[1][6:])) if all(x.startswith('resnet') for x in p) else p)
    tables, csv_rows = [], []

    def table(header, rows):
        lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        return '\n'.join(lines + ['| ' + ' | '.join(r) + ' |' for r in rows])

    def line(label_cols, matching, key='net'):
        cells = []
        for d in datasets:
            found = [g for g in matching if g['data'] == d]
            cells.append(format_score(found[0][key], found[0]['complete']) if found else '')
            for g in found:
                csv_rows.append({'kind': g['name'].split(' ')[0], 'teacher': g['teacher'],
                                 'student': g['student'], 'name': g['name'], 'dataset': d, 'net': key,
                                 'n': g[key]['n'], 'best_mean': g[key]['best'][0],
                                 'best_std': g[key]['best'][1], 'last_mean': g[key]['last'][0],
                                 'last_std': g[key]['last'][1], 'complete': g['complete'],
                                 'runs': ' '.join(r['dir'] for r in g['runs'])})
        return label_cols + cells

    def label_groups(candidates):
        names = sorted({g['name'] for g in candidates},
                       key=lambda n: (order.get(next(g['mode'] for g in candidates if g['name'] == n), 99), n))
        return [(n, [g for g in candidates if g['name'] == n]) for n in names]

    if not pairs and baselines:  # baselines only: one table of them
        rows = [line(['-', net, name], gs) for net in sorted({g['student'] for g in baselines})
                for name, gs in label_groups([g for g in baselines if g['student'] == net])]
        tables.append(table(['Teacher', 'Student', 'Name'] + [DATA_COLUMNS[d] for d in datasets], rows))
    for t, s in pairs:
        rows = []
        for net in sorted({s, t}, key=lambda n: (n != s, n)):  # the student's baseline first
            for name, gs in label_groups([g for g in baselines if g['student'] == net]):
                rows.append(line(['-', net, name], gs))
        kd = [g for g in single if g['script'] == 'train_kd.py' and (g['teacher'], g['student']) == (t, s)]
        for name, gs in label_groups(kd):
            rows.append(line([t, s, name], gs))
        tables.append(table(['Teacher', 'Student', 'Name'] + [DATA_COLUMNS[d] for d in datasets], rows))
    if dml:
        rows = []
        for net in sorted({g['teacher'] for g in dml} | {g['student'] for g in dml}):
            for name, gs in label_groups([g for g in baselines if g['student'] == net]):
                rows.append(line(['-', net, name, net], gs))
        for n1, n2 in sorted({(g['teacher'], g['student']) for g in dml}):
            for name, gs in label_groups([g for g in dml if (g['teacher'], g['student']) == (n1, n2)]):
                rows.append(line([n1, n2, name, f'net1 ({n1})'], gs, 'net1'))
                rows.append(line([n1, n2, name, f'net2 ({n2})'], gs, 'net2'))
        tables.append(table(['Net1', 'Net2', 'Name', 'Net'] + [DATA_COLUMNS[d] for d in datasets], rows))
    unique = {tuple(r[k] for k in ('teacher', 'student', 'name', 'dataset', 'net')): r for r in csv_rows}
    return tables, list(unique.values())


def summary(argv=None):
    """The summary command; a UserError for a root without runs (see `main`)."""
    parser = argparse.ArgumentParser(prog='python summarize.py', 
        description='Walk a results root and print the comparison tables (Markdown), writing '
                    'the same data as CSV; optionally draw test-accuracy curves.')
    parser.add_argument('root', nargs='?', default='./results')
    parser.add_argument('--csv', default=None, help='CSV path (default: ROOT/summary.csv)')
    parser.add_argument('--plot', default=None, metavar='PNG',
                        help='draw test top-1 per epoch of the runs matching --runs (needs matplotlib)')
    parser.add_argument('--runs', nargs='+', default=['*'], metavar='PATTERN',
                        help='run names (the --note) to plot, shell-style patterns')
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):
        raise UserError(f'{args.root} is not a directory')
    runs = collect_runs(args.root)
    if not runs:
        raise UserError(f'no runs under {args.root} (a run directory holds args.json and metrics.csv)')
    tables, rows = summary_tables(group_runs(runs))
    print(REPORTING_RULE + '\n')
    print('\n\n'.join(tables))
    path = args.csv or os.path.join(args.root, 'summary.csv')
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ['table'])
        w.writeheader()
        w.writerows(rows)
    print(f'\n{len(runs)} runs; CSV written to {path}')
    if args.plot:
        plot_curves(runs, args.runs, args.plot)


def plot_curves(runs, patterns, path):
    import fnmatch
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError('--plot needs matplotlib (pip install matplotlib); the tables above do not')
    chosen = [r for r in runs if any(fnmatch.fnmatch(os.path.basename(r['dir']), p) for p in patterns)]
    if not chosen:
        raise UserError(f'no run matches {" ".join(patterns)}')
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in chosen:
        name = os.path.basename(r['dir'])
        cols = ['test_top1'] if 'test_top1' in r['rows'][0] else ['test_net1_top1', 'test_net2_top1']
        for col in cols:
            ax.plot([int(x['epoch']) for x in r['rows']], [float(x[col]) for x in r['rows']],
                    label=name if col == 'test_top1' else f'{name} {col[5:9]}')
    ax.set_xlabel('epoch')
    ax.set_ylabel('test top-1 (%)')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f'curves of {len(chosen)} runs written to {path}')


main = cli(summary)

if __name__ == '__main__':
    main()
