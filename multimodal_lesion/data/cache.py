"""Decode and resize every image once into a uint8 array on disk, so no epoch decodes a JPEG again.

The cache is keyed by the data's fingerprint and the target size, verified before use (image ids,
shape) and written atomically: a crash mid-build leaves no file that a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from ..io import atomic_write, temp_name
from .ham10000 import Ham10000, load_rgb

CACHE_VERSION = 1


def cache_home() -> Path:
    """The user's cache folder: ``$MMLESION_CACHE``, else ``~/.cache/multimodal_lesion``."""
    return Path(os.environ.get("MMLESION_CACHE") or Path.home() / ".cache" / "multimodal_lesion")


def default_cache_dir(ham: Ham10000, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder of one dataset: the configured one, else one under :func:`cache_home`.

    Never inside the data root, which may be read-only.
    """
    return Path(cache_dir) if cache_dir else cache_home() / "data" / cache_key(Path(ham.root).resolve())


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


def _valid(array_path: Path, meta_path: Path, ids: Sequence[str], shape: tuple[int, ...]) -> bool:
    """True when a cached array exists, is complete and belongs to exactly these images."""
    if not (array_path.is_file() and meta_path.is_file()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
        arr = np.load(array_path, mmap_mode="r")
    except (ValueError, OSError, json.JSONDecodeError):
        return False
    return meta.get("image_ids") == list(ids) and tuple(arr.shape) == shape and meta.get("version") == CACHE_VERSION


def image_array(
    ham: Ham10000, size: tuple[int, int], cache_dir: str | os.PathLike | None = None, threads: int = 4
) -> np.ndarray:
    """Return all images of ``ham`` as a read-only memory-mapped uint8 array (N, H, W, 3).

    Built on first use (decoded in a few threads), reused while the data's fingerprint and the
    size are unchanged, and rebuilt when the cached copy is stale or incomplete.
    """
    folder = default_cache_dir(ham, cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    key = cache_key(ham.fingerprint, size, CACHE_VERSION)
    array_path, meta_path = folder / f"images-{key}.npy", folder / f"images-{key}.json"
    ids = list(ham.metadata["image_id"])
    shape = (len(ids), size[0], size[1], 3)
    if not _valid(array_path, meta_path, ids, shape):
        _build(ham.metadata["path"].tolist(), size, array_path, shape, threads)
        with atomic_write(meta_path) as fh:
            json.dump(
                {"version": CACHE_VERSION, "size": list(size), "fingerprint": ham.fingerprint, "image_ids": ids}, fh
            )
    return np.load(array_path, mmap_mode="r")


def _build(paths: list[str], size: tuple[int, int], array_path: Path, shape: tuple[int, ...], threads: int) -> None:
    """Decode all images into a temp .npy beside ``array_path`` and rename it into place."""
    tmp = temp_name(array_path)
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for i, arr in enumerate(pool.map(lambda p: decode_resized(p, size), paths)):
                out[i] = arr
        out.flush()
        del out
        os.replace(tmp, array_path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
