"""The partial path's cache: the backbone's stride-16 maps of every image and its 4 flips, in float16.

Computed once by the frozen stem and first blocks (any :mod:`~multimodal_lesion.models.inference`
backend), then partial fine-tuning trains the remaining stages and the heads on them each epoch.
Keyed like the embeddings (data fingerprint, backbone identity) plus the block the maps come from;
written into a temporary file and renamed into place, so a crash leaves nothing a later run trusts.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..data.cache import cache_key, cached_array, write_npy
from ..data.datasets import Normalize
from ..models import FLIPS, ImageBranch
from .embeddings import compiled_branch_pass, run_views

MAPS_VERSION = 1
MAPS_DTYPE = np.float16  # half the disk of float32; the maps' values (|x| < 20) keep ~3 significant digits


def maps_shape(branch: ImageBranch, n: int, size: tuple[int, int]) -> tuple[int, ...]:
    """(N, views, C, h, w) of the cached maps of ``n`` images of ``size`` = (H, W)."""
    with torch.no_grad():
        probe = branch.eval().forward_maps(torch.zeros(1, 3, *size))
    return (n, len(FLIPS), *probe.shape[1:])


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
) -> np.ndarray:
    """The maps (N, 4, C, h, w) float16 of every image, memory-mapped: loaded from ``folder`` or computed.

    ``images`` is called only on a cache miss. ``identity`` names the backbone, weights and size.
    """
    shape = maps_shape(branch, n, size)
    key = cache_key(fingerprint, sorted(identity.items()), f"blocks.{branch.maps_block}", MAPS_VERSION)
    description = {
        "fingerprint": fingerprint,
        "identity": identity,
        "block": branch.maps_block,
        "shape": list(shape),
        "dtype": np.dtype(MAPS_DTYPE).name,
        "backend": backend,
        "pid": os.getpid(),
    }

    def fill(out: np.ndarray) -> None:
        pixels = images()
        example = normalize(torch.from_numpy(np.array(pixels[:1])).permute(0, 3, 1, 2))
        cpu = device or torch.device("cpu")
        compiled = compiled_branch_pass(branch, "forward_maps", example, cpu, backend, "float32")
        run_views(
            compiled,
            pixels,
            normalize,
            out,
            flips=True,
            reduce="stack",
            batch_size=batch_size,
            device=cpu,
            desc="feature maps",
            show=show,
        )

    return cached_array(
        folder / f"maps-{key}.npy",
        description,
        lambda arr, _: tuple(arr.shape) == shape and arr.dtype == MAPS_DTYPE,
        lambda tmp: write_npy(tmp, shape, MAPS_DTYPE, fill),
    )


__all__ = ["MAPS_DTYPE", "MAPS_VERSION", "cached_feature_maps", "maps_shape"]
