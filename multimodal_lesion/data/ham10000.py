"""Read a HAM10000-layout folder into one validated :class:`~.dataset.LesionDataset`.

The reader refuses what would silently corrupt an experiment (unknown labels, duplicate ids, ids that
are paths, impossible ages, rows of the wrong width, files outside the data root, images too small
to be dermoscopy) with a one-line :class:`DataError` naming the file, row and column, and reports
what it tolerates (unlisted images, unknown categories, dropped rows, extra columns, ids written
with their extension, broken links, non-binary masks) in :attr:`LesionDataset.notes`, each also emitted
with :func:`~multimodal_lesion.errors.note` so that every command tells the user.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError, note
from .constants import CLASSES, METADATA_COLUMNS, METADATA_FILE, UNKNOWN
from .dataset import LesionDataset
from .images import attach_files, image_folder, scan_images
from .patient import VOCABULARY, is_known, normalise_category, parse_age
from .patient import more_rows as _more
from .tables import SHOW, TableSource, check_unique, first, read_table, short

#: A plain file stem: starts with a letter/digit, then letters, digits, '_', '-', '.'.
_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}")


def read_ham10000(root: str | Path, *, drop_missing: bool = False, images: str | Path | None = None) -> LesionDataset:
    """Read and validate ``root/HAM10000_metadata.csv`` and find its images anywhere below ``root``.

    Args:
        root: the data root (official layout: CSV at the root, images in any sub-folder).
        drop_missing: drop rows whose image is not found (reported in ``notes``) instead of failing.
        images: the folder the images (and masks) are below, when not ``root``.

    Raises:
        DataError: one line naming the file / row / column of the first problem found.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        what = "it is a file" if root.is_file() else "nothing there"
        raise DataError(f"{root}: data root is not a folder ({what}; give the folder that holds {METADATA_FILE})")
    csv_path = root / METADATA_FILE
    notes: list[str] = []
    raw, src = read_table(csv_path, notes, METADATA_COLUMNS, select=True, shape="HAM10000")
    table = _validate_table(raw, src, notes)
    image_root = image_folder(images, root)
    scan = scan_images(image_root, notes)
    table = attach_files(table, scan, src, drop_missing, notes, image_root)
    for message in notes:
        note(message)
    moved = image_root if image_root != root else None
    return LesionDataset(root=root, metadata=table.reset_index(drop=True), notes=notes, image_root=moved)


def _validate_table(raw: pd.DataFrame, src: TableSource, notes: list[str]) -> pd.DataFrame:
    """Normalise and check every column; returns the typed table (``age`` float, NaN when missing)."""
    df = raw.apply(lambda col: col.str.strip())
    for column in ("lesion_id", "image_id"):
        _check_ids(df[column], column, src)
    df["dx"] = df["dx"].str.lower()
    _check_dx(df["dx"], src)
    check_unique(df["image_id"], src.path)
    df["age"] = _parse_ages(df["age"], src)
    for column in VOCABULARY:
        df[column] = _known_or_unknown(df[column], column, src.path, notes)
    _note_mixed_dx(df, src.path, notes)
    return df


def _check_ids(values: pd.Series, column: str, src: TableSource) -> None:
    """Ids must be plain file stems: no path separators, no '..', no markup, not empty."""
    bad = ~values.map(lambda v: bool(_PLAIN_ID.fullmatch(v)) and ".." not in v)
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{src.where(pos, column)}: {short(values.iloc[pos])} is not a plain id "
            f"(letters, digits, '_', '-', '.'; no path separators, '..' or markup)"
            f"{_more(int(bad.sum()))}"
        )


def _check_dx(dx: pd.Series, src: TableSource) -> None:
    """Every label must be one of the seven HAM10000 classes."""
    bad = ~dx.isin(CLASSES)
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{src.where(pos, 'dx')}: unknown diagnosis {short(dx.iloc[pos])} "
            f"(expected one of {', '.join(CLASSES)}){_more(int(bad.sum()))}"
        )


def _parse_ages(ages: pd.Series, src: TableSource) -> pd.Series:
    """Ages as float, NaN when missing, by :func:`parse_age`; the first bad row is named, with the count."""
    parsed, bad = np.full(len(ages), np.nan), []
    for pos, value in enumerate(ages):
        try:
            parsed[pos] = parse_age(value)
        except DataError:
            bad.append(pos)
    if bad:
        try:
            parse_age(ages.iloc[bad[0]], src.where(bad[0], "age"))
        except DataError as exc:
            raise DataError(f"{exc}{_more(len(bad))}") from None
    return pd.Series(parsed, index=ages.index, dtype=float)


def _known_or_unknown(values: pd.Series, column: str, csv_path: Path, notes: list[str]) -> pd.Series:
    """Normalised; empty and values outside the vocabulary become 'unknown' (the latter noted)."""
    values = values.map(normalise_category)
    odd = ~values.map(lambda v: is_known(column, v))
    if odd.any():
        seen = sorted(set(values[odd]))
        rows = [int(p) + 1 for p in np.flatnonzero(odd.to_numpy())[:SHOW]]
        notes.append(
            f"{csv_path.name}: column '{column}': {int(odd.sum())} row(s) with unrecognised "
            f"value(s) {first([short(v) for v in seen])} read as '{UNKNOWN}' "
            f"(rows {', '.join(map(str, rows))}{', ...' if odd.sum() > SHOW else ''})"
        )
    return values.where(~odd, UNKNOWN)


def _note_mixed_dx(df: pd.DataFrame, csv_path: Path, notes: list[str]) -> None:
    """Report lesions whose images disagree on the diagnosis (splits label a lesion by its majority)."""
    n_dx = df.groupby("lesion_id", sort=True)["dx"].nunique()
    mixed = list(n_dx.index[n_dx > 1])
    if mixed:
        notes.append(
            f"{csv_path.name}: {len(mixed)} lesion(s) with images of different 'dx': "
            f"{first(mixed)} (splits use each lesion's most frequent dx)"
        )
