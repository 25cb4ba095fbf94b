"""The frozen path: image embeddings computed once by the frozen backbone and cached on disk.

Heads trained on the cache give the same predictions as the frozen backbone run live, because both
go through :func:`embed_images` (the same flip averaging, the same pooling).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.cache import cache_key, cached_array, write_npy
from ..data.datasets import Normalize
from ..errors import ConfigError
from ..models import FLIPS, ImageBranch, flipped_views
from ..models.inference import BranchPass, Compiled, compile_pass, resolve_backend

EMBED_VERSION = 1


def compiled_branch_pass(
    branch: ImageBranch, method: str, example: torch.Tensor, device: torch.device, backend: str, precision: str
) -> Compiled:
    """The branch's ``method`` (``embed`` or ``forward_maps``) compiled for ``device`` by ``backend``.

    On a GPU only ``torch`` applies (eager, no channels-last conversion or bfloat16 on the CPU's terms);
    ``auto`` is resolved here too (:func:`~multimodal_lesion.models.inference.resolve_backend`).
    """
    backend = resolve_backend(backend, precision, device)
    branch.eval().to(device)
    if device.type != "cpu":
        if backend != "torch":
            raise ConfigError(f"train.embed_backend={backend!r} runs on the CPU; with device {device} use 'torch'")
        module = BranchPass(branch, method)
        return lambda x: torch.inference_mode()(module)(x).float()
    return compile_pass(BranchPass(branch, method), example, backend, precision)


def run_views(
    compiled: Compiled,
    images: np.ndarray,
    normalize: Normalize,
    out: np.ndarray,
    *,
    flips: bool,
    reduce: str,
    batch_size: int,
    device: torch.device,
    desc: str,
    show: bool,
) -> np.ndarray:
    """Run ``compiled`` over a uint8 image array (N, H, W, 3) in batches into ``out`` (N, ...).

    With ``flips`` the 4 flipped views of a batch go through as one call and are averaged
    (``reduce="mean"``) or kept as a view axis after the image axis (``reduce="stack"``).
    """
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not show, unit="batch"):
        chunk = torch.from_numpy(np.array(images[start : start + batch_size])).permute(0, 3, 1, 2)
        x = normalize(chunk)
        y = compiled((flipped_views(x) if flips else x).to(device)).cpu()
        if flips:
            y = y.unflatten(0, (len(FLIPS), len(chunk)))
            y = y.mean(0) if reduce == "mean" else y.transpose(0, 1)
        out[start : start + len(chunk)] = y.numpy().astype(out.dtype, copy=False)
    return out


def compute_embeddings(
    branch: ImageBranch,
    images: np.ndarray,
    normalize: Normalize,
    *,
    flip_average: bool,
    batch_size: int = 8,
    device: torch.device | None = None,
    show: bool = True,
    backend: str = "torch",
    precision: str = "float32",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Embeddings (N, F) float32 of a uint8 image array (N, H, W, 3), written into ``out`` when given.

    ``batch_size`` images per call (x4 views with ``flip_average``); ``backend`` / ``precision`` as in
    :func:`~multimodal_lesion.models.inference.compile_pass`.
    """
    device = device or torch.device("cpu")
    example = normalize(torch.from_numpy(np.array(images[:1])).permute(0, 3, 1, 2))
    compiled = compiled_branch_pass(branch, "embed", example, device, backend, precision)
    out = np.empty((len(images), branch.num_features), dtype=np.float32) if out is None else out
    return run_views(
        compiled,
        images,
        normalize,
        out,
        flips=flip_average,
        reduce="mean",
        batch_size=batch_size,
        device=device,
        desc="embedding",
        show=show,
    )


def embedding_identity(
    backbone: str,
    weights: str,
    multiscale: bool,
    size: tuple[int, int],
    precision: str,
    color: Mapping = MappingProxyType({}),
) -> dict:
    """What defines a cached embedding besides the data and the flips.

    The precision is named only when it is not float32, and the colour constancy (``color``, a
    :meth:`~multimodal_lesion.data.color.ColorConstancy.key`) only when one is applied, so caches built
    before either existed stay valid;
    a bfloat16 embedding never answers a float32 request or the reverse. The fp32 backends (torch,
    ONNX Runtime, OpenVINO) agree to 1e-3 and share a cache (the one that built it is in the JSON beside it).
    """
    identity = {"backbone": backbone, "weights": weights, "multiscale": multiscale, "size": list(size), **color}
    return identity if precision == "float32" else {**identity, "precision": precision}


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
    batch_size: int = 8,
    device: torch.device | None = None,
    show: bool = True,
    backend: str = "torch",
    precision: str = "float32",
) -> np.ndarray:
    """Load the embeddings for (data fingerprint, backbone identity, flips) from ``folder`` or compute them.

    ``identity`` names the backbone, its weights and the image size; a cache with other keys is
    never reused, and the file is written atomically with its description beside it. ``images`` is
    called only on a cache miss (decoding the image cache is then needed, not before).
    """
    key = cache_key(fingerprint, sorted(identity.items()), flip_average, EMBED_VERSION)
    shape = (n, branch.num_features)
    description = {
        "fingerprint": fingerprint,
        "identity": identity,
        "flip_average": flip_average,
        "backend": backend,
        "shape": list(shape),
        "pid": os.getpid(),
    }

    def fill(out: np.ndarray) -> None:
        compute_embeddings(
            branch,
            images(),
            normalize,
            flip_average=flip_average,
            batch_size=batch_size,
            device=device,
            show=show,
            backend=backend,
            precision=precision,
            out=out,
        )

    return cached_array(
        folder / f"embeddings-{key}.npy",
        description,
        lambda arr, _: arr.shape == shape and bool(np.isfinite(arr).all()),
        lambda tmp: write_npy(tmp, shape, np.float32, fill),
        mmap=False,
    )
