"""Read a HAM10000-layout folder into one validated table, and decode its images and masks safely.

The reader refuses what would silently corrupt an experiment (unknown labels, duplicate ids, ids that
are paths, impossible ages, files outside the data root) with a one-line :class:`DataError` naming
the file, row and column, and reports what it tolerates (unlisted images, unknown categories,
dropped rows) in :attr:`Ham10000.notes`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..errors import DataError, note
from .constants import CLASSES, LOCALIZATIONS, MASK_SUFFIX, METADATA_COLUMNS, METADATA_FILE, SEXES, UNKNOWN

#: File extensions (lower case) taken as images by the folder scan.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})

#: Largest image (in pixels) :func:`load_rgb` decodes; larger is treated as a decompression bomb.
MAX_PIXELS = 50_000_000

#: Oldest plausible age; anything above is a data-entry error.
MAX_AGE = 120.0

#: Spellings of a missing age (compared lower-cased).
MISSING_AGE = frozenset({"", "nan", "na", "n/a", "none", "null", "unknown"})

#: A plain file stem: starts with a letter/digit, then letters, digits, '_', '-', '.'.
_PLAIN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,199}")

#: How many ids an error or note lists before "...".
_SHOW = 5


@dataclass
class Ham10000:
    """A validated HAM10000 table: the 7 official columns plus absolute ``path`` and ``mask_path``."""

    root: Path
    metadata: pd.DataFrame = field(repr=False)
    notes: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """Hex digest of the CSV bytes and the images' and masks' relative names and sizes.

        Cheap (one ``stat`` per file, no image bytes read) and recomputed on each access, so a
        cache keyed by it goes stale as soon as the data on disk changes.
        """
        digest = hashlib.sha256((self.root / METADATA_FILE).read_bytes())
        prefix = len(str(self.root)) + 1
        files = [p for col in ("path", "mask_path") for p in self.metadata[col] if p]
        for path in sorted(files):
            digest.update(f"\n{path[prefix:]}\t{_size_or_missing(path)}".encode())
        return digest.hexdigest()


def read_ham10000(root: str | Path, *, drop_missing: bool = False) -> Ham10000:
    """Read and validate ``root/HAM10000_metadata.csv`` and find its images anywhere below ``root``.

    Args:
        root: the data root (official layout: CSV at the root, images in any sub-folder).
        drop_missing: drop rows whose image is not found (reported in ``notes``) instead of failing.

    Raises:
        DataError: one line naming the file / row / column of the first problem found.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{root}: data root is not a folder")
    csv_path = root / METADATA_FILE
    notes: list[str] = []
    raw = _read_csv(csv_path)
    table = _validate_table(raw, csv_path, notes)
    scan = _scan_files(root, notes)
    table = _attach_files(table, scan, csv_path, drop_missing, notes)
    for message in notes:
        note(message)
    return Ham10000(root=root, metadata=table.reset_index(drop=True), notes=notes)


# --- CSV -------------------------------------------------------------------------------------------


def _read_csv(csv_path: Path) -> pd.DataFrame:
    """Read every cell as a string (no type guessing) and check the header."""
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: metadata file not found")
    try:
        raw = pd.read_csv(
            csv_path, dtype=str, keep_default_na=False, na_filter=False, encoding="utf-8-sig", skipinitialspace=True
        )
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path}: file is empty (expected a header and one row per image)") from None
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        raise DataError(f"{csv_path}: not a readable CSV: {_one_line(exc)}") from None
    raw.columns = [str(c).strip() for c in raw.columns]
    _check_columns(list(raw.columns), csv_path)
    if raw.empty:
        raise DataError(f"{csv_path}: has a header but no rows")
    return raw.fillna("")[list(METADATA_COLUMNS)]


def _check_columns(found: list[str], csv_path: Path) -> None:
    """Refuse missing, unexpected (renamed) or repeated columns, naming them."""
    missing = [c for c in METADATA_COLUMNS if c not in found]
    extra = [c for c in found if c not in METADATA_COLUMNS]
    problems = []
    if missing:
        problems.append(f"missing column(s) {_names(missing)}")
    if extra:
        problems.append(f"unexpected column(s) {_names(extra)}")
    if problems:
        raise DataError(
            f"{csv_path}: not HAM10000-shaped: {' and '.join(problems)}; expected exactly {_names(METADATA_COLUMNS)}"
        )


def _validate_table(raw: pd.DataFrame, csv_path: Path, notes: list[str]) -> pd.DataFrame:
    """Normalise and check every column; returns the typed table (``age`` float, NaN when missing)."""
    df = raw.apply(lambda col: col.str.strip())
    for column in ("lesion_id", "image_id"):
        _check_ids(df[column], column, csv_path)
    df["dx"] = df["dx"].str.lower()
    _check_dx(df["dx"], csv_path)
    _check_unique(df["image_id"], csv_path)
    df["age"] = _parse_age(df["age"], csv_path)
    df["sex"] = _known_or_unknown(df["sex"], "sex", SEXES, csv_path, notes)
    df["localization"] = _known_or_unknown(df["localization"], "localization", LOCALIZATIONS, csv_path, notes)
    _note_mixed_dx(df, csv_path, notes)
    return df


def _where(csv_path: Path, pos: int, column: str) -> str:
    """'FILE: row N (line N+1), column C' for the row at 0-based position ``pos``."""
    return f"{csv_path}: row {pos + 1} (line {pos + 2}), column '{column}'"


def _check_ids(values: pd.Series, column: str, csv_path: Path) -> None:
    """Ids must be plain file stems: no path separators, no '..', no markup, not empty."""
    bad = ~values.map(lambda v: bool(_PLAIN_ID.fullmatch(v)) and ".." not in v)
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{_where(csv_path, pos, column)}: {_short(values.iloc[pos])} is not a plain id "
            f"(letters, digits, '_', '-', '.'; no path separators, '..' or markup)"
            f"{_more(int(bad.sum()))}"
        )


def _check_dx(dx: pd.Series, csv_path: Path) -> None:
    """Every label must be one of the seven HAM10000 classes."""
    bad = ~dx.isin(CLASSES)
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{_where(csv_path, pos, 'dx')}: unknown diagnosis {_short(dx.iloc[pos])} "
            f"(expected one of {', '.join(CLASSES)}){_more(int(bad.sum()))}"
        )


def _check_unique(image_ids: pd.Series, csv_path: Path) -> None:
    """An image may be listed once: a repeat would leak between splits and double-count metrics."""
    dup = image_ids.duplicated(keep=False)
    if dup.any():
        ids = list(dict.fromkeys(image_ids[dup]))
        rows = [int(p) + 1 for p in np.flatnonzero(dup.to_numpy())[:_SHOW]]
        raise DataError(
            f"{csv_path}: column 'image_id': {len(ids)} duplicated id(s): {_first(ids)} "
            f"(rows {', '.join(map(str, rows))}{', ...' if dup.sum() > _SHOW else ''})"
        )


def _parse_age(ages: pd.Series, csv_path: Path) -> pd.Series:
    """Ages as float, NaN when missing; refuse text, non-finite, negative or > 120 values by row."""
    missing = ages.str.lower().isin(MISSING_AGE)
    numbers = pd.to_numeric(ages.where(~missing, None), errors="coerce").astype(float)
    bad = ~missing & ~(np.isfinite(numbers) & (numbers >= 0) & (numbers <= MAX_AGE))
    if bad.any():
        pos = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(
            f"{_where(csv_path, pos, 'age')}: {_short(ages.iloc[pos])} is not an age "
            f"(a number from 0 to {MAX_AGE:g}, or empty when unknown){_more(int(bad.sum()))}"
        )
    return numbers.where(~missing, np.nan)


def _known_or_unknown(
    values: pd.Series, column: str, known: tuple[str, ...], csv_path: Path, notes: list[str]
) -> pd.Series:
    """Lower-case; empty and values outside the vocabulary become 'unknown' (the latter noted)."""
    values = values.str.lower().replace("", UNKNOWN)
    odd = ~values.isin((*known, UNKNOWN))
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
    """What one walk below the root found: image and mask paths by stem."""

    images: dict[str, Path] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    masks: dict[str, Path] = field(default_factory=dict)


def _scan_files(root: Path, notes: list[str]) -> _Scan:
    """Walk ``root`` once (hidden entries skipped, folder links not followed) collecting images and masks."""
    scan = _Scan()
    skipped_links: list[str] = []
    stack = [root]
    while stack:
        for entry in _list_folder(stack.pop()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.is_symlink() and entry.is_dir():
                skipped_links.append(os.path.relpath(entry.path, root))
            elif entry.is_file():
                _add_file(scan, Path(entry.path), root)
    if skipped_links:
        notes.append(f"ignored {len(skipped_links)} linked folder(s) (not followed): {_first(skipped_links)}")
    return scan


def _list_folder(folder: Path) -> list[os.DirEntry]:
    """A folder's entries sorted by name (a stable scan order); an unreadable folder is named."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda e: e.name)
    except OSError as exc:
        raise DataError(f"{folder}: cannot list folder: {_one_line(exc)}") from None


def _add_file(scan: _Scan, path: Path, root: Path) -> None:
    """Register an image or mask by stem; refuse links out of the root and ambiguous stems."""
    name = path.name
    is_mask = name.lower().endswith(MASK_SUFFIX)
    if not is_mask and path.suffix.lower() not in IMAGE_EXTENSIONS:
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


def _attach_files(df: pd.DataFrame, scan: _Scan, csv_path: Path, drop_missing: bool, notes: list[str]) -> pd.DataFrame:
    """Add ``path``/``mask_path``; fail (or drop, when asked) on listed images that are not found."""
    found = df["image_id"].isin(scan.images.keys())
    if not found.all():
        lost = list(df.loc[~found, "image_id"])
        what = f"{len(lost)} image(s) listed in {csv_path.name} not found below {csv_path.parent}: {_first(lost)}"
        if not drop_missing:
            raise DataError(f"{what} (use drop_missing / --drop-missing to drop them)")
        notes.append(f"dropped {what}")
        df = df.loc[found]
        if df.empty:
            raise DataError(f"{csv_path}: no listed image was found below {csv_path.parent}")
    unlisted = sorted(set(scan.images) - set(df["image_id"]))
    if unlisted:
        notes.append(f"{len(unlisted)} image(s) found but not listed in {csv_path.name} (ignored): {_first(unlisted)}")
    _check_not_empty(df["image_id"], scan)
    df = df.assign(
        path=df["image_id"].map(lambda i: str(scan.images[i])),
        mask_path=df["image_id"].map(lambda i: str(scan.masks[i]) if i in scan.masks else ""),
    )
    return df


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


def load_rgb(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an image fully into 8-bit RGB (grey, RGBA, CMYK, palette and 16-bit are converted).

    Raises:
        DataError: naming the file when it is missing, not an image, truncated or corrupt, or
            larger than ``max_pixels`` (a decompression bomb).
    """
    return _decode(Path(path), _to_rgb, max_pixels)


def load_mask(
    path: str | Path, size: tuple[int, int] | None = None, *, expected_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Read a lesion mask as a boolean (H, W) array, thresholded at 128.

    Args:
        path: the mask file (8-bit grey PNG in the official release; other modes are converted).
        size: (W, H) to resize to (nearest neighbour), e.g. a model's input size.
        expected_size: (W, H) the mask must have on disk, usually its image's size.

    Raises:
        DataError: naming the file when it cannot be decoded or its size is not ``expected_size``.
    """
    path = Path(path)
    grey = _decode(path, _to_grey, MAX_PIXELS)
    if expected_size is not None and grey.size != tuple(expected_size):
        raise DataError(
            f"{path}: mask is {grey.size[0]}x{grey.size[1]} but its image is "
            f"{expected_size[0]}x{expected_size[1]} (W x H)"
        )
    if size is not None and grey.size != tuple(size):
        grey = grey.resize(size, Image.Resampling.NEAREST)
    return np.asarray(grey) >= 128


def _decode(path: Path, convert: Callable[[Image.Image], Image.Image], max_pixels: int) -> Image.Image:
    """Open, bound the pixel count, force the full decode and convert; every failure names the file.

    The pixel bound is checked from the header before any decoding. It is ours, not PIL's global
    ``MAX_IMAGE_PIXELS`` (left untouched: decoding runs in threads), and below PIL's warning
    threshold, so every image PIL would warn about is refused here; PIL's own bomb error is caught too.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise DataError(
                    f"{path}: image is {width}x{height} pixels, over the "
                    f"{max_pixels:,}-pixel limit (possible decompression bomb)"
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


def _first(items: list[str]) -> str:
    """The first few items, comma-separated, with '...' when there are more."""
    shown = ", ".join(map(str, items[:_SHOW]))
    return shown + (", ..." if len(items) > _SHOW else "")


def _more(count: int, what: str = "row") -> str:
    """'' for one problem, else ' (N rows in all)'."""
    return "" if count <= 1 else f" ({count} {what}s in all)"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
