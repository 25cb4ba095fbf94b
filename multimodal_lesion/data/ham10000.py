"""Read a HAM10000-layout folder into one validated table, and decode its images and masks safely.

The reader refuses what would silently corrupt an experiment (unknown labels, duplicate ids, ids that
are paths, impossible ages, rows of the wrong width, files outside the data root, images too small
to be dermoscopy) with a one-line :class:`DataError` naming the file, row and column, and reports
what it tolerates (unlisted images, unknown categories, dropped rows, extra columns, ids written
with their extension, broken links, non-binary masks) in :attr:`Ham10000.notes`, each also emitted
with :func:`~multimodal_lesion.errors.note` so that every command tells the user.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..errors import DataError, note
from .constants import CLASSES, MASK_SUFFIX, METADATA_COLUMNS, METADATA_FILE, UNKNOWN
from .patient import VOCABULARY, is_known, normalise_category, parse_age
from .patient import more_rows as _more
from .schema import DatasetSchema, preset

#: File extensions (lower case) taken as images by the folder scan.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})

#: Archives the scan mentions when listed images are missing (the release ships zipped folders).
ARCHIVE_EXTENSIONS: tuple[str, ...] = (".zip", ".tar", ".tar.gz", ".tgz", ".7z", ".rar")

#: Largest image (in pixels) :func:`load_rgb` decodes; larger is treated as a decompression bomb.
MAX_PIXELS = 50_000_000

#: Smallest side (in pixels) of an image :func:`load_rgb` accepts: HAM10000 images are 600x450, and
#: a thumbnail or an icon below this cannot show a lesion (nor survive a CNN's stride-32 stages).
MIN_IMAGE_SIDE = 16

#: A plain file stem: starts with a letter/digit, then letters, digits, '_', '-', '.'.
_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}")

#: How many ids an error or note lists before "...".
_SHOW = 5


@dataclass
class Ham10000:
    """A validated dataset in the canonical table of its schema (HAM10000's: the 7 official columns)
    plus absolute ``path`` and ``mask_path`` (see :mod:`~multimodal_lesion.data.schema`)."""

    root: Path
    metadata: pd.DataFrame = field(repr=False)
    notes: list[str] = field(default_factory=list)
    schema: DatasetSchema = field(default_factory=lambda: preset("ham10000"), repr=False)
    image_root: Path | None = None  # where the images were found, when not below ``root``

    @property
    def has_images(self) -> bool:
        """Whether every row has an image file (a metadata-only dataset has none)."""
        return bool(len(self.metadata)) and bool((self.metadata["path"] != "").all())

    @property
    def fingerprint(self) -> str:
        """Hex digest of the CSV bytes and the images' and masks' relative names and sizes.

        Cheap (one ``stat`` per file, no image bytes read) and recomputed on each access, so a
        cache keyed by it goes stale as soon as the data on disk changes.
        """
        first, *others = self.schema.metadata
        digest = hashlib.sha256((self.root / first).read_bytes())
        for name in others:
            digest.update((self.root / name).read_bytes())
        prefix = len(str(self.image_root or self.root)) + 1
        files = [p for col in ("path", "mask_path") for p in self.metadata[col] if p]
        for path in sorted(files):
            digest.update(f"\n{path[prefix:]}\t{_size_or_missing(path)}".encode())
        return digest.hexdigest()


def read_ham10000(root: str | Path, *, drop_missing: bool = False, images: str | Path | None = None) -> Ham10000:
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
    raw, src = _read_csv(csv_path, notes)
    table = _validate_table(raw, src, notes)
    image_root = image_folder(images, root)
    scan = _scan_files(image_root, notes)
    table = _attach_files(table, scan, src, drop_missing, notes, image_root)
    for message in notes:
        note(message)
    moved = image_root if image_root != root else None
    return Ham10000(root=root, metadata=table.reset_index(drop=True), notes=notes, image_root=moved)


def image_folder(images: str | Path | None, root: Path, key: str = "data.images") -> Path:
    """The folder images are searched below: ``images`` when given (it must be a folder), else ``root``."""
    if images is None or str(images) == "":
        return root
    folder = Path(images).expanduser().resolve()
    if not folder.is_dir():
        raise DataError(f"{key}: {images} is not a folder (give the folder the images are below)")
    return folder


# --- CSV -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    """Where the table's rows come from: the CSV and the line on which each data row starts."""

    path: Path
    lines: list[int]

    def where(self, pos: int, column: str | None = None) -> str:
        """'FILE: row N (line L), column C' for the data row at 0-based position ``pos``."""
        place = f"{self.path}: row {pos + 1} (line {self.lines[pos]})"
        return place if column is None else f"{place}, column '{column}'"


def _read_csv(
    csv_path: Path, notes: list[str], columns: Sequence[str] = METADATA_COLUMNS, select: bool = True
) -> tuple[pd.DataFrame, _Source]:
    """Every cell of the official columns as a string (no type guessing), after checking the shape.

    The header picks the columns by name (other columns are ignored, with a note); every row must
    have as many fields as the header, except the classic export where every row (or only the
    header) ends with the same empty trailing field(s). With ``select=False`` (another schema's
    file) every named column is kept and ``columns`` only guides the delimiter sniff.
    """
    if csv_path.is_dir():
        raise DataError(f"{csv_path}: is a folder, not the metadata file")
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: metadata file not found{_csv_hint(csv_path)}")
    try:
        data = csv_path.read_bytes()
    except OSError as exc:
        raise DataError(f"{csv_path}: cannot read: {_one_line(exc)}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{csv_path}: not a readable CSV: line {line}: {_one_line(exc)} (save it as UTF-8)") from None
    if "\x00" in text:  # csv reads NUL bytes as text since Python 3.11; in a CSV they mean damage
        line = text[: text.index("\x00")].count("\n") + 1
        raise DataError(f"{csv_path}: not a readable CSV: line {line} contains a NUL byte (a damaged file?)")
    delimiter = _delimiter(text, csv_path, notes, columns)
    records = _records(text, delimiter, csv_path, notes)
    if not records:
        raise DataError(f"{csv_path}: file is empty (expected a header and one row per image)")
    (_, header), rows = records[0], records[1:]
    names = [name.strip() for name in header]
    _check_columns(names, csv_path) if select else _check_repeats(names, csv_path)
    if not rows:
        raise DataError(f"{csv_path}: has a header but no rows")
    src = _Source(csv_path, [line for line, _ in rows])
    fields = _check_widths(names, [f for _, f in rows], src, notes)
    if select:
        _note_ignored_columns(names, fields, csv_path, notes)
    kept = METADATA_COLUMNS if select else [n for n in names if n]
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
        raise DataError(f"{csv_path}: not a readable CSV: line {reader.line_num}: {_one_line(exc)}") from None
    if empty and records:
        notes.append(f"{csv_path.name}: skipped {len(empty)} row(s) of empty fields (lines {_first(empty)})")
    return records


def _check_columns(found: list[str], csv_path: Path) -> None:
    """Refuse missing, renamed or repeated official columns, naming them; other columns may exist."""
    missing = [c for c in METADATA_COLUMNS if c not in found]
    extra = [c for c in found if c and c not in METADATA_COLUMNS]
    if missing:
        problems = [f"missing column(s) {_names(missing)}"] + (
            [f"unexpected column(s) {_names(extra)}"] if extra else []
        )
        raise DataError(
            f"{csv_path}: not HAM10000-shaped: {' and '.join(problems)}; "
            f"expected the columns {_names(METADATA_COLUMNS)} (others are ignored)"
        )
    repeated = [c for c in METADATA_COLUMNS if found.count(c) > 1]
    if repeated:
        where = ", ".join(str(i + 1) for i, name in enumerate(found) if name == repeated[0])
        raise DataError(
            f"{csv_path}: not HAM10000-shaped: column {repeated[0]!r} appears more than once (columns {where})"
        )


def _check_widths(names: list[str], rows: list[list[str]], src: _Source, notes: list[str]) -> list[list[str]]:
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


def _note_ignored_columns(names: list[str], rows: list[list[str]], csv_path: Path, notes: list[str]) -> None:
    """Name the columns the package does not use: newer releases add 'dataset', spreadsheets add unnamed ones."""
    ignored = []
    for i, name in enumerate(names):
        if name in METADATA_COLUMNS:
            continue
        if name:
            ignored.append(_short(name))
        elif any(i < len(f) and f[i].strip() for f in rows):
            ignored.append(f"column {i + 1} (no name{': a saved row index?' if i == 0 else ''})")
        else:
            ignored.append(f"column {i + 1} (no name, empty: a trailing comma?)")
    if ignored:
        notes.append(f"{csv_path.name}: ignored column(s) not used by the package: {_first(ignored)}")


def _csv_hint(csv_path: Path) -> str:
    """Where the metadata file may be instead: another CSV in the folder, or the one above."""
    others = sorted(p.name for p in csv_path.parent.glob("*.csv"))
    if others:
        return f" (found {_first(others)}: rename it to {csv_path.name}?)"
    if (csv_path.parent.parent / csv_path.name).is_file():
        return f" (there is one in {csv_path.parent.parent}: give that folder as the data root)"
    return ""


def _validate_table(raw: pd.DataFrame, src: _Source, notes: list[str]) -> pd.DataFrame:
    """Normalise and check every column; returns the typed table (``age`` float, NaN when missing)."""
    df = raw.apply(lambda col: col.str.strip())
    for column in ("lesion_id", "image_id"):
        _check_ids(df[column], column, src)
    df["dx"] = df["dx"].str.lower()
    _check_dx(df["dx"], src)
    _check_unique(df["image_id"], src.path)
    df["age"] = _parse_ages(df["age"], src)
    for column in VOCABULARY:
        df[column] = _known_or_unknown(df[column], column, src.path, notes)
    _note_mixed_dx(df, src.path, notes)
    return df


def _check_ids(values: pd.Series, column: str, src: _Source) -> None:
    """Ids must be plain file stems: no path separators, no '..', no markup, not empty."""
    bad = ~values.map(lambda v: bool(_PLAIN_ID.fullmatch(v)) and ".." not in v)
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{src.where(pos, column)}: {_short(values.iloc[pos])} is not a plain id "
            f"(letters, digits, '_', '-', '.'; no path separators, '..' or markup)"
            f"{_more(int(bad.sum()))}"
        )


def _check_dx(dx: pd.Series, src: _Source) -> None:
    """Every label must be one of the seven HAM10000 classes."""
    bad = ~dx.isin(CLASSES)
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{src.where(pos, 'dx')}: unknown diagnosis {_short(dx.iloc[pos])} "
            f"(expected one of {', '.join(CLASSES)}){_more(int(bad.sum()))}"
        )


def _check_unique(image_ids: pd.Series, csv_path: Path, why: str = "") -> None:
    """An image may be listed once: a repeat would leak between splits and double-count metrics."""
    dup = image_ids.duplicated(keep=False)
    if dup.any():
        ids = list(dict.fromkeys(image_ids[dup]))
        rows = [int(p) + 1 for p in np.flatnonzero(dup.to_numpy())[:_SHOW]]
        raise DataError(
            f"{csv_path}: column 'image_id': {len(ids)} duplicated id(s){why}: {_first(ids)} "
            f"(rows {', '.join(map(str, rows))}{', ...' if dup.sum() > _SHOW else ''})"
        )


def _parse_ages(ages: pd.Series, src: _Source) -> pd.Series:
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
        rows = [int(p) + 1 for p in np.flatnonzero(odd.to_numpy())[:_SHOW]]
        notes.append(
            f"{csv_path.name}: column '{column}': {int(odd.sum())} row(s) with unrecognised "
            f"value(s) {_first([_short(v) for v in seen])} read as '{UNKNOWN}' "
            f"(rows {', '.join(map(str, rows))}{', ...' if odd.sum() > _SHOW else ''})"
        )
    return values.where(~odd, UNKNOWN)


def _note_mixed_dx(df: pd.DataFrame, csv_path: Path, notes: list[str]) -> None:
    """Report lesions whose images disagree on the diagnosis (splits label a lesion by its majority)."""
    n_dx = df.groupby("lesion_id", sort=True)["dx"].nunique()
    mixed = list(n_dx.index[n_dx > 1])
    if mixed:
        notes.append(
            f"{csv_path.name}: {len(mixed)} lesion(s) with images of different 'dx': "
            f"{_first(mixed)} (splits use each lesion's most frequent dx)"
        )


# --- files -----------------------------------------------------------------------------------------


@dataclass
class _Scan:
    """What one walk below the root found: image and mask paths by stem, and what it passed over."""

    images: dict[str, Path] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    masks: dict[str, Path] = field(default_factory=dict)
    archives: list[str] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # stem -> relative path of a link that cannot be followed


def _scan_files(root: Path, notes: list[str]) -> _Scan:
    """Walk ``root`` once collecting images and masks.

    Hidden entries are skipped; folder links are not followed; broken or looping links and
    unreadable sub-folders are skipped. Each kind of skipped entry is reported in ``notes``.
    """
    scan = _Scan()
    skipped: dict[str, list[str]] = {"linked": [], "broken": [], "unreadable": []}
    stack = [root]
    while stack:
        folder = stack.pop()
        for entry in _list_folder(folder, root, skipped["unreadable"]):
            if entry.name.startswith("."):
                continue
            try:
                kind = _kind(entry)
            except OSError as exc:  # a dangling link, a link loop ('Too many levels of symbolic links')
                relative = os.path.relpath(entry.path, root)
                skipped["broken"].append(f"{relative} ({exc.strerror or exc})")
                scan.broken[Path(entry.name).stem] = relative
                continue
            if kind == "folder":
                stack.append(Path(entry.path))
            elif kind == "linked folder":
                skipped["linked"].append(os.path.relpath(entry.path, root))
            elif kind == "file":
                _add_file(scan, Path(entry.path), root)
    _note_skipped(skipped, notes)
    return scan


def _kind(entry: os.DirEntry) -> str:
    """'folder', 'linked folder', 'file' or 'other'; a link that cannot be followed raises OSError."""
    if entry.is_dir(follow_symlinks=False):
        return "folder"
    if entry.is_symlink():
        os.stat(entry.path)  # follows the link: ENOENT when dangling, ELOOP when it loops
        if entry.is_dir():
            return "linked folder"
    return "file" if entry.is_file() else "other"


def _note_skipped(skipped: dict[str, list[str]], notes: list[str]) -> None:
    """One note per kind of entry the scan passed over."""
    what = {
        "linked": "linked folder(s) (not followed)",
        "broken": "broken or looping link(s) (skipped)",
        "unreadable": "unreadable folder(s) (skipped)",
    }
    for kind, entries in skipped.items():
        if entries:
            notes.append(f"ignored {len(entries)} {what[kind]}: {_first(entries)}")


def _list_folder(folder: Path, root: Path, unreadable: list[str]) -> list[os.DirEntry]:
    """A folder's entries sorted by name (a stable scan order).

    The root must be readable (named in the error); an unreadable sub-folder is skipped and listed
    in ``unreadable`` (a ``lost+found`` on its own disk, say): its images then count as missing.
    """
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as exc:
        if folder == root:
            raise DataError(f"{folder}: cannot list folder: {_one_line(exc)}") from None
        unreadable.append(f"{os.path.relpath(folder, root)} ({exc.strerror or exc})")
        return []


def _add_file(scan: _Scan, path: Path, root: Path) -> None:
    """Register an image or mask by stem; refuse links out of the root and ambiguous stems."""
    name = path.name
    is_mask = name.lower().endswith(MASK_SUFFIX)
    if not is_mask and path.suffix.lower() not in IMAGE_EXTENSIONS:
        if name.lower().endswith(ARCHIVE_EXTENSIONS):
            scan.archives.append(os.path.relpath(path, root))
        return
    if path.is_symlink() and not path.resolve().is_relative_to(root):
        raise DataError(f"{path}: links outside the data root {root}; refusing to read it")
    stem, table = (name[: -len(MASK_SUFFIX)], scan.masks) if is_mask else (path.stem, scan.images)
    if stem in table:
        kind = "mask" if is_mask else "image"
        raise DataError(f"{path}: {kind} '{stem}' found twice (also {table[stem]}); keep one copy")
    table[stem] = path
    if not is_mask:
        scan.sizes[stem] = path.stat().st_size


def _attach_files(
    df: pd.DataFrame, scan: _Scan, src: _Source, drop_missing: bool, notes: list[str], image_root: Path | None = None
) -> pd.DataFrame:
    """Add ``path``/``mask_path``; fail (or drop, when asked) on listed images that are not found."""
    csv_path = src.path
    below = image_root or csv_path.parent
    df = _match_extensions(df, scan, src, notes)
    found = df["image_id"].isin(scan.images.keys())
    if not found.all():
        lost = list(df.loc[~found, "image_id"])
        what = (
            f"{len(lost)} image(s) listed in {csv_path.name} not found below {below} "
            f"({len(df) - len(lost)} of {len(df)} found): {_first(lost)}"
        )
        if not drop_missing:
            raise DataError(f"{what} (use drop_missing / --drop-missing to drop them){_lost_hint(lost, scan)}")
        notes.append(f"dropped {what}")
        df = df.loc[found]
        if df.empty:
            raise DataError(f"{csv_path}: no listed image was found below {below}{_lost_hint(lost, scan)}")
    unlisted = sorted(set(scan.images) - set(df["image_id"]))
    if unlisted:
        notes.append(f"{len(unlisted)} image(s) found but not listed in {csv_path.name} (ignored): {_first(unlisted)}")
    _check_not_empty(df["image_id"], scan)
    df = df.assign(
        path=df["image_id"].map(lambda i: str(scan.images[i])),
        mask_path=df["image_id"].map(lambda i: str(scan.masks[i]) if i in scan.masks else ""),
    )
    return df


def _match_extensions(df: pd.DataFrame, scan: _Scan, src: _Source, notes: list[str]) -> pd.DataFrame:
    """An id written with its image's extension ('ISIC_0024306.jpg') names the file without it (noted)."""

    def stem(image_id: str) -> str:
        base, ext = os.path.splitext(image_id)
        found = image_id not in scan.images and ext.lower() in IMAGE_EXTENSIONS and base in scan.images
        return base if found else image_id

    ids = df["image_id"].map(stem)
    changed = ids != df["image_id"]
    if not changed.any():
        return df
    rows = [int(p) + 1 for p in np.flatnonzero(changed.to_numpy())]
    notes.append(
        f"{src.path.name}: column 'image_id': {len(rows)} id(s) written with a file extension, matched "
        f"without it: {_first(list(df.loc[changed, 'image_id']))} (rows {_first(rows)})"
    )
    _check_unique(ids, src.path, " once the file extension is removed")
    return df.assign(image_id=ids)


def _lost_hint(lost: list[str], scan: _Scan) -> str:
    """Why listed images may be missing: they are broken links, or still inside archives."""
    links = [scan.broken[i] for i in lost if i in scan.broken]
    hint = f"; {len(links)} of them broken link(s): {_first(links)}" if links else ""
    return hint + (f"; found archive(s) {_first(scan.archives)}: unpack them first?" if scan.archives else "")


def _check_not_empty(image_ids: pd.Series, scan: _Scan) -> None:
    """A zero-byte image is an interrupted copy: refuse it by name now rather than mid-epoch."""
    empty = [i for i in image_ids if scan.sizes[i] == 0]
    if empty:
        raise DataError(f"{scan.images[empty[0]]}: image file is empty (0 bytes){_more(len(empty), 'file')}")


# --- decoding --------------------------------------------------------------------------------------

#: Full-scale value of the wide (16/32-bit, float) modes that ``Image.convert`` cannot take to RGB.
_WIDE_MODE_SCALE: dict[str, float] = {
    "I;16": 65535.0,
    "I;16L": 65535.0,
    "I;16B": 65535.0,
    "I;16N": 65535.0,
    "I": 65535.0,
    "F": 1.0,
}


def load_rgb(path: str | Path, *, max_pixels: int = MAX_PIXELS, min_side: int = MIN_IMAGE_SIDE) -> Image.Image:
    """Decode an image fully into 8-bit RGB (grey, RGBA, CMYK, palette and 16-bit are converted).

    Every image the package reads goes through here: the training cache, evaluation, explanation
    and ``predict`` share these rules.

    Raises:
        DataError: naming the file when it is missing, a folder, not an image, truncated or corrupt,
            larger than ``max_pixels`` (a decompression bomb) or narrower than ``min_side`` pixels on
            a side (a thumbnail or an icon cannot be a dermoscopic image).
    """
    return _decode(Path(path), _to_rgb, max_pixels, min_side)


def load_mask(
    path: str | Path, size: tuple[int, int] | None = None, *, expected_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Read a lesion mask as a boolean (H, W) array.

    A binary mask is read as it is meant: 0/255 (the official release) or 0/1. Any other values
    (anti-aliased edges, a mask saved as JPEG) are thresholded at 128, with a note saying so.

    Args:
        path: the mask file (8-bit grey PNG in the official release; other modes are converted).
        size: (W, H) to resize to (nearest neighbour), e.g. a model's input size.
        expected_size: (W, H) the mask must have on disk, usually its image's size.

    Raises:
        DataError: naming the file when it cannot be decoded or its size is not ``expected_size``.
    """
    path = Path(path)
    grey = _decode(path, _to_grey, MAX_PIXELS, 1)
    if expected_size is not None and grey.size != tuple(expected_size):
        raise DataError(
            f"{path}: mask is {grey.size[0]}x{grey.size[1]} but its image is "
            f"{expected_size[0]}x{expected_size[1]} (W x H)"
        )
    lesion = _binarise(np.asarray(grey), path)
    if size is not None and grey.size != tuple(size):
        scaled = Image.fromarray(lesion.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)
        lesion = np.asarray(scaled) >= 128
    return lesion


def _binarise(values: np.ndarray, path: Path) -> np.ndarray:
    """Lesion pixels of an 8-bit mask: 0/1 and 0/255 read exactly, anything else at 128 (noted)."""
    levels = np.unique(values)
    if set(levels.tolist()) <= {0, 1}:
        return values == 1
    lesion = values >= 128
    if not set(levels.tolist()) <= {0, 255}:
        note(
            f"{path}: not a binary mask ({len(levels)} grey levels from {levels[0]} to {levels[-1]}, "
            f"expected 0/255 or 0/1); read as lesion where the value is >= 128 ({lesion.mean():.0%} of pixels)"
        )
    return lesion


def _decode(path: Path, convert: Callable[[Image.Image], Image.Image], max_pixels: int, min_side: int) -> Image.Image:
    """Open, bound the size, force the full decode and convert; every failure names the file.

    The size bounds are checked from the header before any decoding. The pixel bound is ours, not
    PIL's global ``MAX_IMAGE_PIXELS`` (left untouched: decoding runs in threads), and below PIL's
    warning threshold, so every image PIL would warn about is refused here; PIL's own bomb error is
    caught too.
    """
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an image file")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: image file is empty (0 bytes)")
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise DataError(
                    f"{path}: image is {width}x{height} pixels, over the "
                    f"{max_pixels:,}-pixel limit (possible decompression bomb)"
                )
            if min(width, height) < min_side:
                raise DataError(
                    f"{path}: image is {width}x{height} pixels, under the {min_side}-pixel minimum side "
                    f"(too small to be a dermoscopic image)"
                )
            img.load()
            return convert(img)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{path}: refused as a decompression bomb: {_one_line(exc)}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot decode image (truncated or corrupt?): {_one_line(exc)}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; alpha is dropped, wide modes are scaled from their full range."""
    scale = _WIDE_MODE_SCALE.get(img.mode)
    if scale is None:
        return img.convert("RGB")
    arr = np.asarray(img, dtype=np.float64)
    arr = np.clip(np.nan_to_num(arr) / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def _to_grey(img: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit grey (masks are L already; others go through :func:`_to_rgb`)."""
    return img.copy() if img.mode == "L" else _to_rgb(img).convert("L")


# --- message helpers -------------------------------------------------------------------------------


def _size_or_missing(path: str) -> int:
    """File size, or -1 when the file has gone (so the fingerprint changes)."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return -1


def _short(value: object, limit: int = 60) -> str:
    """``repr`` of a value cut to ``limit`` characters, so messages stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _names(columns: list[str] | tuple[str, ...]) -> str:
    return ", ".join(_short(c) for c in columns)


def _first(items: Sequence[object]) -> str:
    """The first few items, comma-separated, with '...' when there are more."""
    shown = ", ".join(map(str, items[:_SHOW]))
    return shown + (", ..." if len(items) > _SHOW else "")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
