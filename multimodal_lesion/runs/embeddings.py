"""The frozen path: image embeddings computed once by the frozen backbone and cached on disk.

Heads trained on the cache give the same predictions as the frozen backbone run live, because both
go through :func:`embed_images` (the same flip averaging, the same pooling).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.cache import cache_key
from ..data.datasets import Normalize
from ..io import atomic_write
from ..models import ImageBranch, embed_images

EMBED_VERSION = 1


@torch.no_grad()
def compute_embeddings(
    branch: ImageBranch,
    images: np.ndarray,
    normalize: Normalize,
    *,
    flip_average: bool,
    batch_size: int = 64,
    device: torch.device | None = None,
    show: bool = True,
) -> np.ndarray:
    """Embeddings (N, F) float32 of a uint8 image array (N, H, W, 3)."""
    device = device or torch.device("cpu")
    branch.eval().to(device)
    out = np.empty((len(images), branch.num_features), dtype=np.float32)
    for start in tqdm(range(0, len(images), batch_size), desc="embedding", disable=not show, unit="batch"):
        chunk = torch.from_numpy(np.array(images[start : start + batch_size])).permute(0, 3, 1, 2)
        x = normalize(chunk).to(device)
        out[start : start + len(chunk)] = embed_images(branch, x, flip_average).float().cpu().numpy()
    return out


def cached_embeddings(
    branch: ImageBranch,
    images: Callable[[], np.ndarray],
    n: int,
    normalize: Normalize,
    *,
    folder: Path,
    fingerprint: str,
    identity: dict,
    flip_average: bool,
    batch_size: int = 64,
    device: torch.device | None = None,
    show: bool = True,
) -> np.ndarray:
    """Load the embeddings for (data fingerprint, backbone identity, flips) from ``folder`` or compute them.

    ``identity`` names the backbone, its weights and the image size; a cache with other keys is
    never reused, and the file is written atomically with its description beside it. ``images`` is
    called only on a cache miss (decoding the image cache is then needed, not before).
    """
    key = cache_key(fingerprint, sorted(identity.items()), flip_average, EMBED_VERSION)
    path, meta_path = folder / f"embeddings-{key}.npy", folder / f"embeddings-{key}.json"
    if path.is_file() and meta_path.is_file():
        try:
            arr = np.load(path)
            if arr.shape == (n, branch.num_features) and np.isfinite(arr).all():
                return arr
        except (ValueError, OSError, EOFError):
            pass  # damaged: computed again below and replaced atomically
    arr = compute_embeddings(
        branch, images(), normalize, flip_average=flip_average, batch_size=batch_size, device=device, show=show
    )
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as fh:
        np.save(fh, arr)
    with atomic_write(meta_path) as fh:
        json.dump(
            {
                "fingerprint": fingerprint,
                "identity": identity,
                "flip_average": flip_average,
                "shape": list(arr.shape),
                "pid": os.getpid(),
            },
            fh,
        )
    return arr
