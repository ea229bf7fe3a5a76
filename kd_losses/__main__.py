"""`python -m kd_losses` prints the method table of the README from the registry."""
from . import METHODS


def cell(text):
    return str(text).replace('|', '\\|')


def method_table():
    rows = ['| `--kd_mode` | method | transfers | seed variant | defaults (CIFAR-10) |',
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
    print(method_table())
