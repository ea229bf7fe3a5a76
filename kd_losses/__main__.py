"""`python -m kd_losses` prints the method table of the README from the
registry; `python -m kd_losses --names` prints the --kd_mode names, one line
(the sweep script reads its default mode list from it)."""
import sys

from . import METHODS


def cell(text):
    return str(text).replace('|', '\\|')


def method_table():
    rows = ['| `--kd_mode` | method | transfers | variant | defaults (CIFAR-10) |',
            '|---|---|---|---|---|']
    for name in sorted(METHODS):
        m = METHODS[name]
        defaults = ' '.join(f'`--{k} {v}`' for k, v in m.defaults.items())
        per_data = '; '.join(f'{d}: ' + ' '.join(f'`--{k} {v}`' for k, v in o.items())
                             for d, o in m.dataset_defaults.items())
        if per_data:
            defaults += f' ({per_data})'
        rows.append(f'| `{name}` | [{cell(m.title)}]({m.paper}) | {cell(m.transfers)} | '
                    f'{cell(m.variant or "as the paper")} | {defaults} |')
    return '\n'.join(rows)


if __name__ == '__main__':
    if sys.argv[1:] == ['--names']:
        print(' '.join(sorted(METHODS)))
    elif sys.argv[1:]:
        print('usage: python -m kd_losses [--names]', file=sys.stderr)
        raise SystemExit(2)
    else:
        print(method_table())
