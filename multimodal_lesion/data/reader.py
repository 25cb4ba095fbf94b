"""Read any dataset by its schema into the canonical table (see :mod:`~multimodal_lesion.data.schema`).

One reader for every schema, HAM10000's preset included: every cell is read as text and checked; a
mistake is a one-line :class:`DataError` naming the file, row and column (and the schema key when a
named column is absent); what is tolerated is reported in :attr:`LesionDataset.notes`, each note also
emitted with :func:`~multimodal_lesion.errors.note` so that every command tells the user. What differs
between datasets is said by the schema, never by the reader: a release's fixed column layout
(``columns``), ids that must be plain file stems (``plain_ids``), the label's classes and spellings,
the age feature (a number from 0 to 120), fixed vocabularies (``features.categories``: values outside
read as unknown, noted), and masks found by their suffix (``mask_suffix``). Images are found by stem
anywhere below the image root (or by a relative path that never leaves it); listed-but-missing images
are refused, or dropped with ``drop_missing``. A duplicates file's pairs are then kept in one group.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError, note
from .constants import UNKNOWN
from .dataset import LesionDataset
from .images import IMAGE_EXTENSIONS, attach_files, image_folder, scan_images
from .patient import more_rows, parse_category, typed_column
from .schema import DatasetSchema, preset
from .tables import SHOW, TableSource, check_unique, first, read_table, short

#: ``data.images`` value of a dataset without images (metadata-only models and the gradient-boosting floor).
NO_IMAGES = "none"

#: One part of an image id or relative path: a plain file or folder name.
_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}")


def read_dataset(
    root: str | Path, schema: DatasetSchema | None = None, *, images: str = "", drop_missing: bool = False
) -> LesionDataset:
    """Read ``root`` (where the schema's metadata files are) into the canonical table.

    Args:
        root: the data root.
        schema: the dataset schema (default: HAM10000).
        images: the folder the images are below when not ``root``; ``"none"``: a dataset without
            images (every ``path`` empty; only models without an image branch can use it).
        drop_missing: drop listed images that are not found (reported) instead of failing.

    Raises:
        DataError: one line naming the file / row / column of the first problem found.
    """
    schema = schema or preset("ham10000")
    data = _read(_data_root(root, schema), schema, images, drop_missing)
    if schema.duplicates:
        merge_duplicates(data)
    return data


def _data_root(root: str | Path, schema: DatasetSchema) -> Path:
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        what = "it is a file" if path.is_file() else "nothing there"
        raise DataError(f"{path}: data root is not a folder ({what}; give the folder that holds {schema.metadata[0]})")
    return path


# --- the metadata files ----------------------------------------------------------------------------


@dataclasses.dataclass
class _Joined:
    """The metadata files joined on the image column, and where each cell came from."""

    table: pd.DataFrame
    sources: list[TableSource]
    origin: dict[str, int]  # column -> index of the file it came from
    rows: list[np.ndarray]  # per file: each joined row's position in that file (-1: no row there)

    def where(self, pos: int, column: str) -> str:
        """'FILE: row N (line L), column C' of the cell at joined row ``pos``."""
        i = self.origin.get(column, 0)
        row = int(self.rows[i][pos])
        return self.sources[i].where(row, column) if row >= 0 else self.sources[0].where(pos, column)

    def files(self) -> str:
        return " + ".join(str(s.path) for s in self.sources)


def _read(root: Path, schema: DatasetSchema, images: str, drop_missing: bool) -> LesionDataset:
    """Join, check, type and attach the images (see the module docstring)."""
    notes: list[str] = []
    joined = _join(root, schema, notes)
    _check_named_columns(joined, schema)
    _check_plain_ids(joined, schema)
    table = pd.DataFrame({"image_id": _image_ids(joined, schema)}, index=joined.table.index)
    table["dx"] = _labels(joined, schema)
    table["lesion_id"], own = _groups(joined, schema, table["image_id"])
    if schema.patient_column:
        table["patient_id"] = joined.table[schema.patient_column]
    if schema.split_column:  # the user's split (data/user_splits.py reads it)
        table["given_split"] = joined.table[schema.split_column]
    if schema.source_column:  # where each image comes from (external evaluations break down by it)
        table["source"] = joined.table[schema.source_column]
    for name, values in _features(joined, schema, notes).items():
        table[name] = values
    _note_unused(joined, schema, notes)
    if schema.group_by == "group" and schema.group_column:
        _note_mixed_labels(table, joined.sources[0].path, schema, notes)
    table = _in_layout_order(table, joined, schema)
    table, image_root = _attach_images(table, root, schema, images, joined.sources[0], drop_missing, notes)
    _note_own_groups(table, own, joined, schema, notes)
    for message in notes:
        note(message)
    moved = image_root if image_root not in (None, root) else None
    return LesionDataset(root=root, metadata=table.reset_index(drop=True), notes=notes, schema=schema, image_root=moved)


def _join(root: Path, schema: DatasetSchema, notes: list[str]) -> _Joined:
    """Read every metadata file (all cells as stripped text) and left-join the others onto the first."""
    key = schema.image_column
    wanted = _named_columns(schema)
    frames, sources = [], []
    for i, name in enumerate(schema.metadata):
        path = _inside(root, name, "dataset.metadata", follow_links=False)
        if i == 0 and schema.columns:  # a release's layout: its columns required, kept in order, others noted
            frame, src = read_table(
                path, notes, columns=schema.columns, select=True, shape=schema.name.upper(), keep=wanted
            )
        else:
            frame, src = read_table(path, notes, columns=wanted, select=False)
        if key not in frame.columns:
            raise DataError(
                f"{src.path}: column '{key}' named by schema key 'dataset.image_column' not found "
                f"(schema {schema.name}; columns: {first(list(frame.columns))})"
            )
        frame = frame.apply(lambda col: col.str.strip())
        check_unique(frame[key], src.path, column=key, key=_image_key(key))
        frames.append(frame)
        sources.append(src)
    table = frames[0]
    origin = dict.fromkeys(table.columns, 0)
    rows = [np.arange(len(table))]
    for i, (frame, src) in enumerate(zip(frames[1:], sources[1:], strict=True), start=1):
        table, position = _join_one(table, frame, key, sources[0].path, src.path, origin, i, notes)
        rows.append(position)
    return _Joined(table.fillna(""), sources, origin, rows)


def _join_one(
    table: pd.DataFrame,
    frame: pd.DataFrame,
    key: str,
    base: Path,
    path: Path,
    origin: dict[str, int],
    i: int,
    notes: list[str],
) -> tuple[pd.DataFrame, np.ndarray]:
    """``table`` with ``frame``'s new columns by image id; returns each row's position in ``frame``."""
    shared = [c for c in frame.columns if c != key and c in table.columns]
    if shared:
        notes.append(f"{path.name}: column(s) {first(shared)} also in {base.name}: {base.name}'s used")
    extra = frame.drop(columns=shared)
    position = pd.Series(np.arange(len(frame)), index=frame[key])
    found = table[key].map(position).fillna(-1).to_numpy(np.int64)
    if (found < 0).any():
        lost = list(table.loc[found < 0, key])
        notes.append(
            f"{path.name}: no row for {len(lost)} image(s) of {base.name} (their columns there read as unknown): "
            f"{first(lost)}"
        )
    unmatched = sorted(set(frame[key]) - set(table[key]))
    if unmatched:
        notes.append(f"{path.name}: {len(unmatched)} row(s) of images not in {base.name} ignored: {first(unmatched)}")
    origin.update(dict.fromkeys([c for c in extra.columns if c != key], i))
    return table.merge(extra, on=key, how="left", validate="one_to_one"), found


def _inside(root: Path, name: str, key: str, *, follow_links: bool = True) -> Path:
    """``root / name``, refused (naming ``key``) when it leaves ``root``.

    With ``follow_links=False`` the path is checked as written (a file the user linked into the
    root is theirs to read) and returned as written, so messages name the file the user knows.
    """
    path = (root / name).resolve() if follow_links else Path(os.path.normpath(root / name))
    if not path.is_relative_to(root):
        raise DataError(f"schema key '{key}': {name!r} is outside the data root {root}; refusing to read it")
    return path


def _image_key(column: str) -> str:
    """The schema key to name beside the image column when the user's column is not called 'image_id'."""
    return "" if column == "image_id" else "dataset.image_column"


def _named_columns(schema: DatasetSchema) -> list[str]:
    """Every column the schema names (what the delimiter sniff looks for)."""
    f = schema.features
    named = [schema.image_column, schema.label_column, *schema.label_columns, schema.group_column]
    return [c for c in (*named, schema.patient_column, schema.split_column, schema.source_column, *f.names) if c]


def _check_named_columns(joined: _Joined, schema: DatasetSchema) -> None:
    """A column the schema names but no metadata file has: one line naming the key, the files and the column."""
    f = schema.features
    keyed = [
        ("dataset.label_column", [schema.label_column]),
        ("dataset.label_columns", list(schema.label_columns)),
        ("dataset.group_column", [schema.group_column]),
        ("dataset.patient_column", [schema.patient_column]),
        ("dataset.plain_ids", list(schema.plain_ids)),
        ("dataset.split_column", [schema.split_column]),
        ("dataset.source_column", [schema.source_column]),
        ("features.numeric", list(f.numeric)),
        ("features.categorical", list(f.categorical)),
        ("features.boolean", list(f.boolean)),
    ]
    for key, columns in keyed:
        for column in (c for c in columns if c and c not in joined.table.columns):
            raise DataError(
                f"{joined.files()}: column '{column}' named by schema key '{key}' not found (schema {schema.name}; "
                f"columns: {first(list(joined.table.columns))})"
            )


def _in_layout_order(table: pd.DataFrame, joined: _Joined, schema: DatasetSchema) -> pd.DataFrame:
    """With a fixed layout (``columns``), the table in the release's column order: the image, label,
    group and patient columns under their canonical names, the other layout columns as read (text)."""
    if not schema.columns:
        return table
    canonical = {
        schema.image_column: "image_id",
        schema.label_column: "dx",
        schema.group_column: "lesion_id",
        schema.patient_column: "patient_id",
    }
    out = {}
    for column in schema.columns:
        name = canonical.get(column, column)
        out[name] = table[name] if name in table.columns else joined.table[column]
    rest = {c: table[c] for c in table.columns if c not in out}
    return pd.DataFrame({**out, **rest}, index=table.index)


def _note_unused(joined: _Joined, schema: DatasetSchema, notes: list[str]) -> None:
    """Name the columns the schema does not use (leak columns are dropped on purpose)."""
    unused = [c for c in joined.table.columns if c not in _named_columns(schema) and c not in schema.leak_columns]
    if unused:
        notes.append(f"ignored column(s) not named by schema {schema.name}: {first(unused)}")


# --- ids, labels, groups ---------------------------------------------------------------------------


def _check_plain_ids(joined: _Joined, schema: DatasetSchema) -> None:
    """The ``plain_ids`` columns hold plain file stems: no path separators, no '..', no markup, not empty."""
    for column in schema.plain_ids:
        values = joined.table[column]
        bad = ~values.map(lambda v: bool(_PART.fullmatch(v)) and ".." not in v)
        if bad.any():
            pos = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(
                f"{joined.where(pos, column)}: {short(values.iloc[pos])} is not a plain id "
                f"(letters, digits, '_', '-', '.'; no path separators, '..' or markup){more_rows(int(bad.sum()))}"
            )


def _image_ids(joined: _Joined, schema: DatasetSchema) -> pd.Series:
    """Image ids: plain file names or relative paths of plain names (no '..', no absolute path)."""
    ids = joined.table[schema.image_column]
    bad = ~ids.map(lambda v: bool(v) and all(_PART.fullmatch(p) and p != ".." for p in v.split("/")))
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{joined.where(pos, schema.image_column)}: {short(ids.iloc[pos])} is not an image id or a relative "
            f"path below the image root (letters, digits, '_', '-', '.', '/' between names; no '..', no absolute "
            f"path){more_rows(int(bad.sum()))}"
        )
    return ids


def _labels(joined: _Joined, schema: DatasetSchema) -> pd.Series:
    """Class code of every row: one label column or one-hot columns, mapped by ``label_map``."""
    table = joined.table
    if schema.label_column:
        raw, column = table[schema.label_column], pd.Series(schema.label_column, index=table.index)
    else:
        raw, column = _one_hot(joined, schema)
    lookup = {k.strip().lower(): v for k, v in schema.label_map.items()}
    labels = raw.str.lower().map(lambda v: lookup.get(v, v))
    bad = ~labels.isin(schema.classes)
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        where, value, count = joined.where(pos, column.iloc[pos]), short(raw.iloc[pos]), more_rows(int(bad.sum()))
        if not schema.label_map:  # the classes are the file's own spellings
            raise DataError(f"{where}: unknown diagnosis {value} (expected one of {', '.join(schema.classes)}){count}")
        raise DataError(
            f"{where}: label {value} is neither one of dataset.classes ({', '.join(schema.classes)}) nor a key of "
            f"dataset.label_map{count}"
        )
    return labels


def _one_hot(joined: _Joined, schema: DatasetSchema) -> tuple[pd.Series, pd.Series]:
    """(the 1-valued column's name, that column) of each row; exactly one label column must be 1."""
    columns = list(schema.label_columns)
    values = np.zeros((len(joined.table), len(columns)))
    for j, column in enumerate(columns):
        cells = joined.table[column]
        numbers = pd.to_numeric(cells.where(cells != "", "0"), errors="coerce").to_numpy()
        bad = ~np.isin(numbers, (0.0, 1.0))
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{joined.where(pos, column)}: {short(cells.iloc[pos])} is not 0 or 1 (dataset.label_columns are "
                f"one-hot){more_rows(int(bad.sum()))}"
            )
        values[:, j] = numbers
    ones = values.sum(axis=1)
    if (ones != 1).any():
        pos = int(np.flatnonzero(ones != 1)[0])
        raise DataError(
            f"{joined.where(pos, columns[0])}: {int(ones[pos])} of the one-hot label columns "
            f"({', '.join(columns)}) are 1, expected exactly one{more_rows(int((ones != 1).sum()))}"
        )
    names = pd.Series(np.asarray(columns, dtype=object)[values.argmax(axis=1)], index=joined.table.index)
    return names, names


def _groups(joined: _Joined, schema: DatasetSchema, image_ids: pd.Series) -> tuple[pd.Series, pd.Series]:
    """The split group of every image (its lesion, or patient by ``group_by``), and which images are
    their own group (no id: the image id stands in)."""
    column = schema.patient_column if schema.group_by == "patient" else schema.group_column
    if not column:
        return image_ids.copy(), pd.Series(True, index=image_ids.index)
    empty = joined.table[column] == ""
    return joined.table[column].where(~empty, image_ids), empty


def _note_own_groups(
    table: pd.DataFrame, own: pd.Series, joined: _Joined, schema: DatasetSchema, notes: list[str]
) -> None:
    """Say which of the images kept are their own group (no group column, or an empty id)."""
    column = schema.patient_column if schema.group_by == "patient" else schema.group_column
    kept = own.reindex(table.index)
    if not column:
        notes.append(f"schema {schema.name} names no group column: each image is its own group")
    elif kept.any():
        what = "patient" if schema.group_by == "patient" else "group"
        notes.append(
            f"{joined.sources[joined.origin.get(column, 0)].path.name}: column '{column}': {int(kept.sum())} image(s) "
            f"without a {what} id are each their own group: {first(list(table.loc[kept, 'image_id']))}"
        )


def _note_mixed_labels(table: pd.DataFrame, path: Path, schema: DatasetSchema, notes: list[str]) -> None:
    """Report groups whose images disagree on the label (splits label a group by its majority)."""
    n = table.groupby("lesion_id", sort=True)["dx"].nunique()
    mixed = list(n.index[n > 1])
    if mixed:
        noun = schema.group_noun[:-1]  # 'lesion'
        label = schema.label_column or "label"  # one-hot labels have no column to name
        which = f"'{label}'" if schema.label_column else "labels"
        notes.append(
            f"{path.name}: {len(mixed)} {noun}(s) with images of different {which}: {first(mixed)} "
            f"(splits use each {noun}'s most frequent {label})"
        )


# --- typed features --------------------------------------------------------------------------------


def _features(joined: _Joined, schema: DatasetSchema, notes: list[str]) -> dict[str, pd.Series]:
    """Every feature typed by the schema: numeric (float, NaN unknown), categorical and boolean (text)."""
    f = schema.features
    out: dict[str, pd.Series] = {}
    for name in (*f.numeric, *f.boolean):
        out[name] = typed_column(joined.table[name], name, f, functools.partial(_where, joined, name))
    for name in f.categorical:
        out[name] = _vocabulary(joined, name, joined.table[name].map(lambda v: parse_category(v, f)), schema, notes)
    return {name: out[name] for name in f.names}


def _where(joined: _Joined, column: str, row: int) -> str:
    return joined.where(row, column)


def _vocabulary(joined: _Joined, column: str, values: pd.Series, schema: DatasetSchema, notes: list[str]) -> pd.Series:
    """Values outside a fixed vocabulary (``features.categories``) read as unknown, with a note naming the rows."""
    known = schema.features.categories.get(column)
    if known is None:
        return values
    odd = (values != UNKNOWN) & ~values.isin(known)
    if odd.any():
        origin = joined.origin.get(column, 0)
        rows = [int(joined.rows[origin][p]) + 1 for p in np.flatnonzero(odd.to_numpy())[:SHOW]]
        notes.append(
            f"{joined.sources[origin].path.name}: column '{column}': {int(odd.sum())} row(s) with unrecognised "
            f"value(s) {first([short(v) for v in sorted(set(values[odd]))])} read as '{UNKNOWN}' "
            f"(rows {', '.join(map(str, rows))}{', ...' if odd.sum() > SHOW else ''})"
        )
    return values.where(~odd, UNKNOWN)


# --- images ----------------------------------------------------------------------------------------


def _attach_images(
    table: pd.DataFrame,
    root: Path,
    schema: DatasetSchema,
    images: str,
    src: TableSource,
    drop_missing: bool,
    notes: list[str],
) -> tuple[pd.DataFrame, Path | None]:
    """Add ``path`` / ``mask_path``: found by stem below the image root, or by relative path inside it."""
    if images == NO_IMAGES:
        notes.append(f"data.images = '{NO_IMAGES}': no image read; only models without an image branch can train")
        return table.assign(path="", mask_path=""), None
    image_root = image_folder(images, root)
    below = _inside(image_root, schema.image_dir, "dataset.image_dir") if schema.image_dir else image_root
    if not below.is_dir():
        raise DataError(f"schema key 'dataset.image_dir': {below} is not a folder")
    if table["image_id"].str.contains("/").any():
        return _attach_paths(table, below, schema, src, drop_missing, notes), image_root
    scan = scan_images(below, notes, schema.mask_suffix)
    return attach_files(table, scan, src, drop_missing, notes, below, schema.image_column), image_root


def _attach_paths(
    table: pd.DataFrame, below: Path, schema: DatasetSchema, src: TableSource, drop_missing: bool, notes: list[str]
) -> pd.DataFrame:
    """Ids that are relative paths: each must name a file inside ``below`` (links out of it are refused)."""
    paths = []
    for image_id in table["image_id"]:
        candidates = [below / image_id] + [below / f"{image_id}{ext}" for ext in schema.extensions]
        path = next((p for p in candidates if p.is_file()), None)
        if path is not None and not path.resolve().is_relative_to(below.resolve()):
            raise DataError(f"{path}: links outside the image root {below}; refusing to read it")
        paths.append(str(path) if path is not None else "")
    found = np.array([bool(p) for p in paths])
    if not found.all():
        lost = list(table.loc[~found, "image_id"])
        what = (
            f"{len(lost)} image(s) listed in {src.path.name} not found below {below} "
            f"({int(found.sum())} of {len(table)} found): {first(lost)}"
        )
        if not drop_missing or not found.any():
            hint = " (use drop_missing / --drop-missing to drop them)" if found.any() else ""
            raise DataError(what + hint)
        notes.append(f"dropped {what}")
    return table.assign(path=paths, mask_path="").loc[found]


# --- duplicates ------------------------------------------------------------------------------------


def merge_duplicates(data: LesionDataset) -> None:
    """Keep each pair of the schema's duplicates file in one group (``lesion_id``), in place, with a note.

    Pairs are joined transitively (a chain of pairs is one group), named by the smallest group id in
    it. Ids written with an image extension match without it; pairs naming an image the data does not
    hold (dropped as missing, say) are ignored, and counted.
    """
    schema = data.schema
    path = Path(schema.duplicates).expanduser()
    path = path if path.is_absolute() else data.root / path
    if not path.is_file():
        raise DataError(f"schema key 'dataset.duplicates' (data.duplicates): {path}: file not found")
    notes: list[str] = []
    frame = read_table(path, notes, columns=schema.duplicate_columns, select=False)[0]
    for column in schema.duplicate_columns:
        if column not in frame.columns:
            raise DataError(
                f"{path}: column '{column}' named by schema key 'dataset.duplicate_columns' not found "
                f"(columns: {first(list(frame.columns))})"
            )
    meta = data.metadata
    known = set(meta["image_id"])
    a, b = (frame[c].str.strip().map(lambda v: _known_id(v, known)) for c in schema.duplicate_columns)
    usable = a.isin(known) & b.isin(known)
    group = meta.set_index("image_id")["lesion_id"]
    pairs = [(group[x], group[y]) for x, y in zip(a[usable], b[usable], strict=True)]
    merged = _union(pairs)
    before = meta["lesion_id"].nunique()
    split_before = sum(x != y for x, y in pairs)
    meta["lesion_id"] = meta["lesion_id"].map(lambda g: merged.get(g, g))
    message = (
        f"{path.name}: {int(usable.sum())} pair(s) of images of one lesion kept in one group "
        f"({split_before} were in different groups; {before} -> {meta['lesion_id'].nunique()} groups)"
    )
    if (~usable).any():
        message += f"; {int((~usable).sum())} pair(s) naming images not in the data ignored"
    for text in [*notes, message]:
        data.notes.append(text)
        note(text)


def _known_id(value: str, known: set[str]) -> str:
    """The id as the data holds it: ``ISIC_1.jpg`` is ``ISIC_1`` when only the latter is known."""
    stem, ext = Path(value).stem, Path(value).suffix.lower()
    return stem if value not in known and ext in IMAGE_EXTENSIONS and stem in known else value


def _union(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """Group id -> the smallest group id connected to it by ``pairs`` (a union-find)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in pairs:
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    return {x: find(x) for x in parent}


__all__ = ["NO_IMAGES", "merge_duplicates", "read_dataset"]
