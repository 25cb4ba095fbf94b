"""Find images (and lesion masks) below a folder, attach them to a table, and decode them safely.

The scan walks the image root once, never follows a folder link nor a file link out of the root,
and reports what it passes over; :func:`load_rgb` and :func:`load_mask` are the only decoders the
package uses (training cache, evaluation, explanation and ``predict`` share their rules).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..errors import DataError, note
from .constants import MASK_SUFFIX
from .patient import more_rows as _more
from .tables import TableSource, check_unique, first, one_line

#: File extensions (lower case) taken as images by the folder scan.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})

#: Archives the scan mentions when listed images are missing (the release ships zipped folders).
ARCHIVE_EXTENSIONS: tuple[str, ...] = (".zip", ".tar", ".tar.gz", ".tgz", ".7z", ".rar")

#: Largest image (in pixels) :func:`load_rgb` decodes; larger is treated as a decompression bomb.
MAX_PIXELS = 50_000_000

#: Smallest side (in pixels) of an image :func:`load_rgb` accepts: HAM10000 images are 600x450, and
#: a thumbnail or an icon below this cannot show a lesion (nor survive a CNN's stride-32 stages).
MIN_IMAGE_SIDE = 16


def image_folder(images: str | Path | None, root: Path, key: str = "data.images") -> Path:
    """The folder images are searched below: ``images`` when given (it must be a folder), else ``root``."""
    if images is None or str(images) == "":
        return root
    folder = Path(images).expanduser().resolve()
    if not folder.is_dir():
        raise DataError(f"{key}: {images} is not a folder (give the folder the images are below)")
    return folder


# --- files -----------------------------------------------------------------------------------------


@dataclass
class ImageScan:
    """What one walk below the root found: image and mask paths by stem, and what it passed over."""

    images: dict[str, Path] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    masks: dict[str, Path] = field(default_factory=dict)
    archives: list[str] = field(default_factory=list)
    broken: dict[str, str] = field(default_factory=dict)  # stem -> relative path of a link that cannot be followed


def scan_images(root: Path, notes: list[str], mask_suffix: str = MASK_SUFFIX) -> ImageScan:
    """Walk ``root`` once collecting images and masks.

    A mask is a file named ``<image stem><mask_suffix>`` (a schema's ``mask_suffix``; empty: no masks).
    Hidden entries are skipped; folder links are not followed; broken or looping links and
    unreadable sub-folders are skipped. Each kind of skipped entry is reported in ``notes``.
    """
    scan = ImageScan()
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
                _add_file(scan, Path(entry.path), root, mask_suffix.lower())
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
            notes.append(f"ignored {len(entries)} {what[kind]}: {first(entries)}")


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
            raise DataError(f"{folder}: cannot list folder: {one_line(exc)}") from None
        unreadable.append(f"{os.path.relpath(folder, root)} ({exc.strerror or exc})")
        return []


def _add_file(scan: ImageScan, path: Path, root: Path, mask_suffix: str) -> None:
    """Register an image or mask by stem; refuse links out of the root and ambiguous stems."""
    name = path.name
    is_mask = bool(mask_suffix) and name.lower().endswith(mask_suffix)
    if not is_mask and path.suffix.lower() not in IMAGE_EXTENSIONS:
        if name.lower().endswith(ARCHIVE_EXTENSIONS):
            scan.archives.append(os.path.relpath(path, root))
        return
    if path.is_symlink() and not path.resolve().is_relative_to(root):
        raise DataError(f"{path}: links outside the data root {root}; refusing to read it")
    stem, table = (name[: -len(mask_suffix)], scan.masks) if is_mask else (path.stem, scan.images)
    if stem in table:
        kind = "mask" if is_mask else "image"
        raise DataError(f"{path}: {kind} '{stem}' found twice (also {table[stem]}); keep one copy")
    table[stem] = path
    if not is_mask:
        scan.sizes[stem] = path.stat().st_size


def attach_files(
    df: pd.DataFrame,
    scan: ImageScan,
    src: TableSource,
    drop_missing: bool,
    notes: list[str],
    image_root: Path | None = None,
    column: str = "image_id",
) -> pd.DataFrame:
    """Add ``path``/``mask_path``; fail (or drop, when asked) on listed images that are not found.

    ``column`` is the image column's name in the user's file (messages name it).
    """
    csv_path = src.path
    below = image_root or csv_path.parent
    df = _match_extensions(df, scan, src, notes, column)
    found = df["image_id"].isin(scan.images.keys())
    if not found.all():
        lost = list(df.loc[~found, "image_id"])
        what = (
            f"{len(lost)} image(s) listed in {csv_path.name} not found below {below} "
            f"({len(df) - len(lost)} of {len(df)} found): {first(lost)}"
        )
        if not drop_missing:
            raise DataError(f"{what} (use drop_missing / --drop-missing to drop them){_lost_hint(lost, scan)}")
        notes.append(f"dropped {what}")
        df = df.loc[found]
        if df.empty:
            raise DataError(f"{csv_path}: no listed image was found below {below}{_lost_hint(lost, scan)}")
    unlisted = sorted(set(scan.images) - set(df["image_id"]))
    if unlisted:
        notes.append(f"{len(unlisted)} image(s) found but not listed in {csv_path.name} (ignored): {first(unlisted)}")
    _check_not_empty(df["image_id"], scan)
    df = df.assign(
        path=df["image_id"].map(lambda i: str(scan.images[i])),
        mask_path=df["image_id"].map(lambda i: str(scan.masks[i]) if i in scan.masks else ""),
    )
    return df


def _match_extensions(
    df: pd.DataFrame, scan: ImageScan, src: TableSource, notes: list[str], column: str
) -> pd.DataFrame:
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
        f"{src.path.name}: column '{column}': {len(rows)} id(s) written with a file extension, matched "
        f"without it: {first(list(df.loc[changed, 'image_id']))} (rows {first(rows)})"
    )
    check_unique(ids, src.path, " once the file extension is removed", column)
    return df.assign(image_id=ids)


def _lost_hint(lost: list[str], scan: ImageScan) -> str:
    """Why listed images may be missing: they are broken links, or still inside archives."""
    links = [scan.broken[i] for i in lost if i in scan.broken]
    hint = f"; {len(links)} of them broken link(s): {first(links)}" if links else ""
    return hint + (f"; found archive(s) {first(scan.archives)}: unpack them first?" if scan.archives else "")


def _check_not_empty(image_ids: pd.Series, scan: ImageScan) -> None:
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
        raise DataError(f"{path}: refused as a decompression bomb: {one_line(exc)}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{path}: cannot decode image (truncated or corrupt?): {one_line(exc)}") from None


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
