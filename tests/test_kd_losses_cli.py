"""`python -m kd_losses` prints a plain table fitted to a terminal, and the
README's Markdown table when asked (--markdown) or when its output is not a
terminal."""
import re
import sys

import pytest

from kd_losses import METHODS
from kd_losses.__main__ import main, method_table, wrapped_table


def run(argv, capsys, monkeypatch, tty, columns=100):
    monkeypatch.setenv('COLUMNS', str(columns))
    monkeypatch.setattr(sys.stdout, 'isatty', lambda: tty)
    main(argv)
    return capsys.readouterr().out.rstrip('\n')


def test_piped_or_asked_the_table_is_the_readmes_markdown(capsys, monkeypatch):
    assert run([], capsys, monkeypatch, tty=False) == method_table()
    assert run(['--markdown'], capsys, monkeypatch, tty=True) == method_table()


@pytest.mark.parametrize('columns', [60, 80, 100, 160])
def test_on_a_terminal_the_table_fits_its_width(capsys, monkeypatch, columns):
    out = run([], capsys, monkeypatch, tty=True, columns=columns)
    lines = out.splitlines()
    assert lines[0].split() == ['--kd_mode', 'method', 'transfers', 'variant', 'defaults']
    too_wide = [l for l in lines if len(l) > columns and not re.fullmatch(r' *https?://\S+', l)]
    assert not too_wide  # a link longer than the terminal stays one piece
    assert not any(l.startswith('|') for l in lines)
    for name, m in METHODS.items():
        assert any(l.startswith(f'{name} ') for l in lines), name
        assert m.paper in out
        for flag, value in m.defaults.items():
            if columns >= 100:  # wide enough for every column's longest word: none is cut
                assert any(f'--{flag} {value}' in l for l in lines), (name, flag)


def test_cells_wrap_within_their_columns():
    table = wrapped_table(['a', 'b'], [['x', 'one two three four'], ['y', 'five']], 12).splitlines()
    assert table == ['a  b', '-  ---------', 'x  one two', '   three', '   four', '', 'y  five']
