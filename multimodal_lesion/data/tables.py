"""Read a metadata CSV as text and check its shape, with errors that name the file, row and column.

Every metadata file the package reads (a schema's metadata files, a duplicates file, a split file)
goes through :func:`read_table`: every cell is read as a string (no type guessing), the delimiter is
sniffed from the header, rows of the wrong width are refused naming the row and line, and what is
tolerated (empty rows, trailing commas, ignored columns) is reported in ``notes``.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError
from .patient import more_rows as _more

#: How many ids an error or note lists before "...".
SHOW = 5

# --- CSV -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableSource:
    """Where the table's rows come from: the CSV and the line on which each data row starts."""

    path: Path
    lines: list[int]

    def where(self, pos: int, column: str | None = None) -> str:
        """'FILE: row N (line L), column C' for the data row at 0-based position ``pos``."""
        place = f"{self.path}: row {pos + 1} (line {self.lines[pos]})"
        return place if column is None else f"{place}, column '{column}'"


def read_table(
    csv_path: Path,
    notes: list[str],
    columns: Sequence[str],
    select: bool = False,
    shape: str = "",
    keep: Sequence[str] = (),
) -> tuple[pd.DataFrame, TableSource]:
    """Every cell of a CSV as a string (no type guessing), after checking the shape.

    Every row must have as many fields as the header, except the classic export where every row
    (or only the header) ends with the same empty trailing field(s). By default every named column
    is kept and ``columns`` only guides the delimiter sniff. With ``select=True`` the header must
    hold ``columns`` (a file of a fixed layout, ``shape`` naming it in errors): only they, and the
    columns of ``keep`` the header has (columns a schema adds to the layout), are kept; the others are
    ignored with a note.
    """
    if csv_path.is_dir():
        raise DataError(f"{csv_path}: is a folder, not the metadata file")
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: metadata file not found{_csv_hint(csv_path)}")
    try:
        data = csv_path.read_bytes()
    except OSError as exc:
        raise DataError(f"{csv_path}: cannot read: {one_line(exc)}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{csv_path}: not a readable CSV: line {line}: {one_line(exc)} (save it as UTF-8)") from None
    if "\x00" in text:  # csv reads NUL bytes as text since Python 3.11; in a CSV they mean damage
        line = text[: text.index("\x00")].count("\n") + 1
        raise DataError(f"{csv_path}: not a readable CSV: line {line} contains a NUL byte (a damaged file?)")
    delimiter = _delimiter(text, csv_path, notes, columns)
    records = _records(text, delimiter, csv_path, notes)
    if not records:
        raise DataError(f"{csv_path}: file is empty (expected a header and one row per image)")
    (_, header), rows = records[0], records[1:]
    names = [name.strip() for name in header]
    _check_columns(names, csv_path, columns, shape) if select else _check_repeats(names, csv_path)
    if not rows:
        raise DataError(f"{csv_path}: has a header but no rows")
    src = TableSource(csv_path, [line for line, _ in rows])
    fields = _check_widths(names, [f for _, f in rows], src, notes)
    if select:
        extra = [c for c in keep if c in names and c not in columns]
        _note_ignored_columns(names, fields, csv_path, notes, [*columns, *extra])
    kept = [*columns, *extra] if select else [n for n in names if n]
    return pd.DataFrame({c: [f[names.index(c)] for f in fields] for c in kept}, dtype=str), src


def _check_repeats(names: list[str], csv_path: Path) -> None:
    """A column name may appear once: which of two would the schema mean?"""
    repeated = [n for n in dict.fromkeys(names) if n and names.count(n) > 1]
    if repeated:
        where = ", ".join(str(i + 1) for i, name in enumerate(names) if name == repeated[0])
        raise DataError(f"{csv_path}: column {repeated[0]!r} appears more than once (columns {where})")


def _delimiter(text: str, csv_path: Path, notes: list[str], columns: Sequence[str]) -> str:
    """',' unless the header names the columns only when split on ';' or a tab (a regional export)."""
    first = text.split("\n", 1)[0]
    found = {d: sum(c.strip().strip('"') in columns for c in first.split(d)) for d in (",", ";", "\t")}
    best = max(found, key=lambda d: found[d])
    if best != "," and found[best] > found[","]:
        notes.append(f"{csv_path.name}: read as {'tab' if best == chr(9) else repr(best)}-separated (not commas)")
        return best
    return ","


def _records(text: str, delimiter: str, csv_path: Path, notes: list[str]) -> list[tuple[int, list[str]]]:
    """(first line, fields) of each record; blank lines skipped, rows of empty fields skipped with a note."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=True, strict=True)
    records, empty, start = [], [], 1
    try:
        for fields in reader:
            if any(f.strip() for f in fields):
                records.append((start, fields))
            elif len(fields) > 1:  # ',,,,,,': a row Excel left behind
                empty.append(start)
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{csv_path}: not a readable CSV: line {reader.line_num}: {one_line(exc)}") from None
    if empty and records:
        notes.append(f"{csv_path.name}: skipped {len(empty)} row(s) of empty fields (lines {first(empty)})")
    return records


def _check_columns(found: list[str], csv_path: Path, columns: Sequence[str], shape: str) -> None:
    """Refuse missing, renamed or repeated official columns, naming them; other columns may exist."""
    missing = [c for c in columns if c not in found]
    extra = [c for c in found if c and c not in columns]
    if missing:
        problems = [f"missing column(s) {_names(missing)}"] + (
            [f"unexpected column(s) {_names(extra)}"] if extra else []
        )
        raise DataError(
            f"{csv_path}: not {shape}-shaped: {' and '.join(problems)}; "
            f"expected the columns {_names(list(columns))} (others are ignored)"
        )
    repeated = [c for c in columns if found.count(c) > 1]
    if repeated:
        where = ", ".join(str(i + 1) for i, name in enumerate(found) if name == repeated[0])
        raise DataError(
            f"{csv_path}: not {shape}-shaped: column {repeated[0]!r} appears more than once (columns {where})"
        )


def _check_widths(names: list[str], rows: list[list[str]], src: TableSource, notes: list[str]) -> list[list[str]]:
    """Every row as wide as the header; tolerate only trailing empty fields that every row (or the header) has."""
    width = len(names)
    named = max(i + 1 for i, name in enumerate(names) if name)  # trailing empty names: commas ending the header
    lengths = {len(f) for f in rows}
    common = lengths.pop() if len(lengths) == 1 else width
    if common != width and common >= named and all(not any(v.strip() for v in f[named:]) for f in rows):
        if common > width:
            notes.append(
                f"{src.path.name}: every row ends with {common - width} empty field(s) the header does not name "
                f"(a trailing comma?); ignored"
            )
        width = common
    bad = [pos for pos, f in enumerate(rows) if len(f) != width]
    if bad:
        pos = bad[0]
        n = len(rows[pos])
        why = "a value missing, or a line broken in two?" if n < width else "an unquoted ',' inside a value?"
        if n > width and not any(v.strip() for v in rows[pos][width:]):
            why = "a stray trailing comma?"
        raise DataError(
            f"{src.path}: not a readable CSV: row {pos + 1} (line {src.lines[pos]}) has {n} field(s) "
            f"but the header has {width} ({why}){_more(len(bad))}"
        )
    return rows


def _note_ignored_columns(
    names: list[str], rows: list[list[str]], csv_path: Path, notes: list[str], columns: Sequence[str]
) -> None:
    """Name the columns the package does not use: newer releases add 'dataset', spreadsheets add unnamed ones."""
    ignored = []
    for i, name in enumerate(names):
        if name in columns:
            continue
        if name:
            ignored.append(short(name))
        elif any(i < len(f) and f[i].strip() for f in rows):
            ignored.append(f"column {i + 1} (no name{': a saved row index?' if i == 0 else ''})")
        else:
            ignored.append(f"column {i + 1} (no name, empty: a trailing comma?)")
    if ignored:
        notes.append(f"{csv_path.name}: ignored column(s) not used by the package: {first(ignored)}")


def _csv_hint(csv_path: Path) -> str:
    """Where the metadata file may be instead: another CSV in the folder, or the one above."""
    others = sorted(p.name for p in csv_path.parent.glob("*.csv"))
    if others:
        return f" (found {first(others)}: rename it to {csv_path.name}?)"
    if (csv_path.parent.parent / csv_path.name).is_file():
        return f" (there is one in {csv_path.parent.parent}: give that folder as the data root)"
    return ""


def check_unique(image_ids: pd.Series, csv_path: Path, why: str = "", column: str = "image_id", key: str = "") -> None:
    """An image may be listed once: a repeat would leak between splits and double-count metrics.

    Args:
        image_ids: the image column, in file order.
        csv_path: the file it came from.
        why: said after the count (e.g. ``" once the file extension is removed"``).
        column: the column's name in the user's file.
        key: the schema key that chose ``column`` (e.g. ``dataset.image_column``), named in the message.
    """
    dup = image_ids.duplicated(keep=False)
    if dup.any():
        ids = list(dict.fromkeys(image_ids[dup]))
        rows = [int(p) + 1 for p in np.flatnonzero(dup.to_numpy())[:SHOW]]
        chosen = f" (the image column, schema key '{key}')" if key else ""
        raise DataError(
            f"{csv_path}: column '{column}'{chosen}: {len(ids)} duplicated id(s){why}: {first(ids)} "
            f"(rows {', '.join(map(str, rows))}{', ...' if dup.sum() > SHOW else ''})"
        )


# --- message helpers -------------------------------------------------------------------------------


def short(value: object, limit: int = 60) -> str:
    """``repr`` of a value cut to ``limit`` characters, so messages stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _names(columns: list[str] | tuple[str, ...]) -> str:
    return ", ".join(short(c) for c in columns)


def first(items: Sequence[object]) -> str:
    """The first few items, comma-separated, with '...' when there are more."""
    shown = ", ".join(map(str, items[:SHOW]))
    return shown + (", ..." if len(items) > SHOW else "")


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
