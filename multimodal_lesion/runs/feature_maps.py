"""The partial path's cache: the backbone's maps of every image and its 4 flips (and, with
``train.map_views``, of augmented copies), in float16.

Computed once by the frozen stem and first blocks (any :mod:`~multimodal_lesion.models.inference`
backend), then partial fine-tuning trains the remaining stages and the heads on them each epoch.
Keyed like the embeddings (data fingerprint, backbone identity) plus the block the maps come from;
written into a temporary file and renamed into place, so a crash leaves nothing a later run trusts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.cache import cache_key, cached_array, write_npy
from ..data.datasets import BATCH_AUGMENTATIONS, Normalize
from ..models import FLIPS, ImageBranch, flipped_views
from ..models.inference import Compiled
from .embeddings import compiled_branch_pass

MAPS_VERSION = 1
FLUSH_EVERY = 1024  # images between flushes of the memory-mapped cache file, so written pages can leave memory
MAPS_DTYPE = np.float16  # half the disk of float32; the maps' values (|x| < 20) keep ~3 significant digits


def maps_shape(branch: ImageBranch, n: int, size: tuple[int, int], augmented: int = 0) -> tuple[int, ...]:
    """(N, views, C, h, w) of the cached maps of ``n`` images of ``size`` = (H, W): 4 flips + ``augmented``."""
    with torch.no_grad():
        probe = branch.eval().forward_maps(torch.zeros(1, 3, *size))
    return (n, len(FLIPS) + augmented, *probe.shape[1:])


@dataclass(frozen=True)
class AugmentedViews:
    """Extra cached views of every image drawn by a batch augmentation (``train.map_views``).

    View ``k`` of the images in rows ``[start, start + B)`` is drawn with a generator seeded by
    ``(seed, start, k)``: the cache is reproducible, and its key names the preset, the count and the seed.
    """

    count: int
    preset: str
    seed: int

    def key(self) -> tuple[object, ...]:
        return ("augmented", self.count, self.preset, self.seed)


def cached_feature_maps(
    branch: ImageBranch,
    images: Callable[[], np.ndarray],
    size: tuple[int, int],
    n: int,
    normalize: Normalize,
    *,
    folder: Path,
    fingerprint: str,
    identity: dict,
    batch_size: int = 8,
    device: torch.device | None = None,
    backend: str = "torch",
    show: bool = True,
    augmented: AugmentedViews | None = None,
) -> np.ndarray:
    """The maps (N, 4 [+ augmented], C, h, w) float16 of every image, memory-mapped: loaded or computed.

    Views 0-3 are the flips (:data:`~multimodal_lesion.models.FLIPS`), then the ``augmented`` ones.
    ``images`` is called only on a cache miss. ``identity`` names the backbone, weights and size.
    """
    extra = augmented.count if augmented is not None else 0
    shape = maps_shape(branch, n, size, extra)
    parts: list[object] = [fingerprint, sorted(identity.items()), f"blocks.{branch.maps_block}", MAPS_VERSION]
    key = cache_key(*parts, *(augmented.key() if extra and augmented is not None else ()))
    description = {
        "fingerprint": fingerprint,
        "identity": identity,
        "block": branch.maps_block,
        "shape": list(shape),
        "dtype": np.dtype(MAPS_DTYPE).name,
        "backend": backend,
        "augmented": dataclasses.asdict(augmented) if extra and augmented is not None else None,
        "pid": os.getpid(),
    }

    def fill(out: np.ndarray) -> None:
        pixels = images()
        cpu = device or torch.device("cpu")
        example = normalize(torch.from_numpy(np.array(pixels[:1])).permute(0, 3, 1, 2))
        compiled = compiled_branch_pass(branch, "forward_maps", example, cpu, backend, "float32")
        views = augmented if extra and augmented is not None else None
        _all_views(compiled, pixels, normalize, out, views, batch_size, cpu, show)

    return cached_array(
        folder / f"maps-{key}.npy",
        description,
        lambda arr, _: tuple(arr.shape) == shape and arr.dtype == MAPS_DTYPE,
        lambda tmp: write_npy(tmp, shape, MAPS_DTYPE, fill),
    )


def _all_views(
    compiled: Compiled,
    images: np.ndarray,
    normalize: Normalize,
    out: np.ndarray,
    views: AugmentedViews | None,
    batch_size: int,
    device: torch.device,
    show: bool,
) -> None:
    """Every view of every image in one pass: each batch is read and normalised once, its 4 flips and then
    its augmented copies go through ``compiled``, and all its views are written before the next batch.

    The output never waits in memory (``out`` is the memory-mapped cache file, flushed every
    :data:`FLUSH_EVERY` images). View ``k`` of rows ``[start, start + B)`` is drawn with a generator
    seeded by ``(seed, start, k)``, as the cache key promises, so a rebuild gives the same maps.
    """
    augment = BATCH_AUGMENTATIONS[views.preset]() if views is not None else None
    if views is not None and augment is None:
        raise ValueError(f"augmentation preset {views.preset!r} draws nothing")
    first = len(FLIPS)
    for start in tqdm(range(0, len(images), batch_size), desc="feature maps", disable=not show, unit="batch"):
        chunk = torch.from_numpy(np.array(images[start : start + batch_size])).permute(0, 3, 1, 2)
        stop = start + len(chunk)
        flipped = compiled(flipped_views(normalize(chunk)).to(device)).cpu()
        out[start:stop, :first] = flipped.unflatten(0, (first, len(chunk))).transpose(0, 1).numpy().astype(out.dtype)
        if views is not None and augment is not None:
            copies = [
                augment(chunk, torch.Generator().manual_seed(views.seed * 1_000_003 + start * 101 + k), normalize)
                for k in range(views.count)
            ]
            y = compiled(torch.cat(copies).to(device)).cpu().unflatten(0, (views.count, len(chunk))).transpose(0, 1)
            out[start:stop, first : first + views.count] = y.numpy().astype(out.dtype, copy=False)
        if stop % FLUSH_EVERY < batch_size and isinstance(out, np.memmap):
            out.flush()


__all__ = ["MAPS_DTYPE", "MAPS_VERSION", "AugmentedViews", "cached_feature_maps", "maps_shape"]
