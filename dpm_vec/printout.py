"""A query's rows as text for a person: a boxed table, or one block per row when the
terminal is too narrow for the table.

Rich lays out a table cell by cell in Python: about 2 ms a row, so 26,000 intents took 50
seconds. A table that needs no folding is drawn here line by line instead, in the same
box characters as Rich's (a pipe or a file gets it at its full width); Rich draws only
a short table that must fold on a terminal.
"""

from __future__ import annotations

import re
from itertools import zip_longest

from rich.cells import cell_len, chop_cells

READABLE_CELL = 12  # a column this wide (or as wide as its widest value) shows its values in a few lines
TABLE_ROWS = 200_000  # a longer result goes to --csv: a table's widths need every row in memory
RICH_FOLDED_ROWS = 1_000  # beyond this, a terminal too narrow for the whole table gets blocks: Rich would take seconds
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # a line break, a tab or another control would break a row's line
_HEAVY = ("┏━┳┓", "┃┃┃", "┡━╇┩", "│││", "└─┴┘")
_ASCII = ("+-++", "|||", "|-+|", "|||", "+-++")
_LIGHT_TOP = {_HEAVY: "┌─┬┐", _ASCII: "+-++"}  # a block has no header: light lines all round


def print_rows(console, columns: list[str], rows: list[tuple]) -> None:
    """``rows`` under ``columns`` on ``console``. A pipe or a file gets the table at its
    full width; a terminal gets it when it fits, folded by Rich when it fits at a readable
    width (and is short), else one block of ``column  value`` lines per row, where Rich
    would squeeze columns to nothing and drop their values. Values fold, never end in an
    ellipsis; a control character (a line break, a tab) or one the output's encoding
    cannot show is a backslash escape."""
    encoding = getattr(console.file, "encoding", None) or "utf-8"
    columns = [_printable(column, encoding) for column in columns]
    cells = [["" if v is None else _printable(str(v), encoding) for v in row] for row in rows]
    box = _box(encoding)
    widths = [max([cell_len(column), *(cell_len(row[i]) for row in cells)]) for i, column in enumerate(columns)]
    if not console.is_terminal or 1 + sum(w + 3 for w in widths) <= console.width:  # 3: a cell's padding and border
        console.file.write(_table(box, columns, cells, widths))
    elif 1 + sum(min(w, READABLE_CELL) + 3 for w in widths) <= console.width and len(cells) <= RICH_FOLDED_ROWS:
        _print_with_rich(console, columns, cells)
    else:
        _print_blocks(console, box, columns, cells)
    console.file.flush()


def _printable(text: str, encoding: str) -> str:
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text).encode(encoding, "backslashreplace").decode(encoding)


def _box(encoding: str) -> tuple[str, ...]:
    try:
        "".join(_HEAVY).encode(encoding)
    except UnicodeEncodeError:
        return _ASCII
    return _HEAVY


def _rule(chars: str, widths: list[int]) -> str:
    left, line, cross, right = chars
    return left + cross.join(line * (w + 2) for w in widths) + right + "\n"


def _line(chars: str, values, widths: list[int]) -> str:
    left, middle, right = chars
    return left + middle.join(f" {v}{' ' * (w - cell_len(v))} " for v, w in zip(values, widths)) + right + "\n"


def _table(box: tuple[str, ...], columns: list[str], cells: list[list[str]], widths: list[int]) -> str:
    """The table as Rich draws it with its default box and no folding."""
    return "".join([_rule(box[0], widths), _line(box[1], columns, widths), _rule(box[2], widths),
                    *(_line(box[3], row, widths) for row in cells), _rule(box[4], widths)])


def _print_blocks(console, box: tuple[str, ...], columns: list[str], cells: list[list[str]]) -> None:
    """One two-column block a row: its columns' names beside their values, each folded
    to the terminal's width."""
    if not cells:
        console.file.write(f"0 rows; columns: {', '.join(columns)}\n")
        return
    name_width = min(max(map(cell_len, columns)), max((console.width - 7) // 2, 1))  # 7: two cells' padding, three borders
    widths = [name_width, max(console.width - name_width - 7, 1)]
    for number, row in enumerate(cells, start=1):
        lines = []
        for column, value in zip(columns, row):
            names, values = chop_cells(column, widths[0]) or [""], chop_cells(value, widths[1]) or [""]
            lines += [_line(box[3], pair, widths) for pair in zip_longest(names, values, fillvalue="")]
        console.file.write(f"row {number} of {len(cells)}\n" + _rule(_LIGHT_TOP[box], widths) + "".join(lines) + _rule(box[4], widths))


def _print_with_rich(console, columns: list[str], cells: list[list[str]]) -> None:
    """Rich's table, folded to a terminal's width (to a pipe, at its full width: the
    table ``_table`` draws, which the tests check it against)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(show_lines=False)
    for column in columns:
        table.add_column(Text(column), overflow="fold")
    for row in cells:
        table.add_row(*map(Text, row))  # a value is text, never Rich markup
    print_unbroken(console, table)


def print_unbroken(console, renderable) -> None:
    """``renderable`` on a terminal at its width (a line wraps, a cell folds); to a file
    or a pipe (a batch job's log), which has no width, at its own: no line breaks inside
    a command to paste or a number, no column squeezed out."""
    if console.is_terminal:
        console.print(renderable)
    elif isinstance(renderable, str):
        console.print(renderable, soft_wrap=True)
    else:
        from rich.console import Console
        from rich.measure import Measurement

        unbounded = Console(width=1 << 20)
        width = Measurement.get(unbounded, unbounded.options, renderable).maximum
        Console(file=console.file, width=width, force_terminal=False, no_color=console.no_color).print(renderable)
