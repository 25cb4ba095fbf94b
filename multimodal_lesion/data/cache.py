"""Decode and resize every image once into a uint8 array on disk, so no epoch decodes a JPEG again.

The cache is keyed by the data's fingerprint and the target size, verified before use (image ids,
shape) and written atomically: a crash mid-build leaves no file that a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..io import atomic_write, temp_name
from .color import NO_COLOR_CONSTANCY, ColorConstancy
from .dataset import LesionDataset
from .images import load_rgb

CACHE_VERSION = 1


def cache_home() -> Path:
    """The user's cache folder: ``$MMLESION_CACHE``, else ``~/.cache/multimodal_lesion``."""
    return Path(os.environ.get("MMLESION_CACHE") or Path.home() / ".cache" / "multimodal_lesion")


def default_cache_dir(dataset: LesionDataset, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder of one dataset: the configured one, else one under :func:`cache_home`.

    Never inside the data root, which may be read-only.
    """
    return Path(cache_dir) if cache_dir else cache_home() / "data" / cache_key(Path(dataset.root).resolve())


def cache_key(*parts: object) -> str:
    """A short stable hash of the parts that define a cached artefact."""
    return hashlib.sha1(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def decode_resized(path: str, size: tuple[int, int]) -> np.ndarray:
    """Decode one image to RGB and resize it to ``size`` = (height, width) as uint8 HWC."""
    return resized(load_rgb(path), size)


def resized(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """An RGB image resized (bilinear) to ``size`` = (height, width) as uint8 HWC: what the cache stores."""
    height, width = size
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BILINEAR)
    return np.array(img, dtype=np.uint8)


def cached_array(
    path: Path,
    description: Mapping[str, Any],
    valid: Callable[[np.ndarray, dict], bool],
    build: Callable[[Path], None],
    *,
    mmap: bool = True,
) -> np.ndarray:
    """A cached ``.npy`` with its JSON description beside it (same stem): every cache of the package.

    Loaded (memory-mapped with ``mmap``) when both files exist and ``valid(array, description)``
    accepts them; otherwise ``build(tmp)`` writes the array under a temporary name, which is renamed
    into place once complete, and the description is written after it. A crash mid-build therefore
    leaves no file that a later run trusts, and a damaged or stale file is rebuilt.
    """
    meta_path = path.with_suffix(".json")
    mode: Any = "r" if mmap else None
    if path.is_file() and meta_path.is_file():
        try:
            arr = np.load(path, mmap_mode=mode)
            if valid(arr, json.loads(meta_path.read_text())):
                return arr
        except (ValueError, OSError, EOFError, json.JSONDecodeError):
            pass  # damaged: built again below and replaced atomically
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        build(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with atomic_write(meta_path) as fh:
        json.dump(dict(description), fh)
    return np.load(path, mmap_mode=mode)


def write_npy(path: Path, shape: tuple[int, ...], dtype: Any, fill: Callable[[np.ndarray], object]) -> None:
    """Create a ``.npy`` of ``shape`` at ``path`` and let ``fill`` write into it (memory-mapped, not held in RAM)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    fill(out)
    out.flush()
    del out


def image_array(
    dataset: LesionDataset,
    size: tuple[int, int],
    cache_dir: str | os.PathLike | None = None,
    threads: int = 4,
    color: ColorConstancy = NO_COLOR_CONSTANCY,
) -> np.ndarray:
    """Return all images of ``dataset`` as a read-only memory-mapped uint8 array (N, H, W, 3).

    Built on first use (decoded in a few threads), reused while the data's fingerprint and the
    size are unchanged, and rebuilt when the cached copy is stale or incomplete. With an active
    ``color`` constancy the corrected images are a cache of their own, built from the plain one and
    keyed by the method and its settings as well.
    """
    folder = default_cache_dir(dataset, cache_dir)
    ids = list(dataset.metadata["image_id"])
    shape = (len(ids), size[0], size[1], 3)
    description = {"version": CACHE_VERSION, "size": list(size), "fingerprint": dataset.fingerprint, "image_ids": ids}
    if color.active:
        plain = image_array(dataset, size, cache_dir, threads)
        key = cache_key(dataset.fingerprint, size, CACHE_VERSION, sorted(color.key().items()))
        build: Callable[[np.ndarray], object] = lambda out: _corrected_into(out, plain, color)
        description["color"] = color.key()
    else:
        paths = dataset.metadata["path"].tolist()
        key = cache_key(dataset.fingerprint, size, CACHE_VERSION)
        build = lambda out: _decode_into(out, paths, size, threads)
    return cached_array(
        folder / f"images-{key}.npy",
        description,
        lambda arr, meta: meta.get("image_ids") == ids and arr.shape == shape and meta.get("version") == CACHE_VERSION,
        lambda tmp: write_npy(tmp, shape, np.uint8, build),
    )


def _corrected_into(out: np.ndarray, plain: np.ndarray, color: ColorConstancy, chunk: int = 256) -> None:
    """``color`` applied to every image of ``plain`` into ``out``, a chunk at a time."""
    for start in range(0, len(plain), chunk):
        out[start : start + chunk] = color(np.asarray(plain[start : start + chunk]))


def _decode_into(out: np.ndarray, paths: list[str], size: tuple[int, int], threads: int) -> None:
    """Decode and resize every image into ``out`` (N, H, W, 3), a few at a time in threads."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for i, arr in enumerate(pool.map(lambda p: decode_resized(p, size), paths)):
            out[i] = arr
