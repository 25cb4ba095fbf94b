"""What the patient's metadata does to the map: the CAM with the case's metadata beside the CAM with
every patient feature absent.

"Absent" is the encoder's missing row (``MetadataEncoder.missing_row``: numbers at the training mean
with their missing flag set, every category ``unknown``), the same encoding metadata dropout trains
on, so the model has seen it. Both maps explain the same class (the one predicted with the case's
metadata) with the same method, layer, flips and temperature. One number sums the change up: the
Spearman rank correlation of the two maps over pixels (1 = the metadata leaves the ranking of the
pixels as it is).

What it can show depends on where the model fuses:

- ``image_only`` ignores the metadata: the two maps are the same array, the correlation is 1 by
  construction (:func:`map_rank_correlation` returns exactly 1 for identical maps);
- a late model (concat, gated, film) fuses after the pooling: the activations of the CAM layer cannot
  change, the metadata moves the map only through the gradient weights of its channels;
- a model that fuses on the maps (``model.fuses_on_maps``) changes the activations themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from ..models.fusion import LesionModel
from .gradcam import GradCamExplainer

CAM_BATCH = 8  # cases per CAM call

FusionKind = str  # "maps" | "late" | "image only"


def fusion_kind(model: LesionModel) -> FusionKind:
    """Where the model meets the metadata: ``maps`` (inside the network), ``late`` (after pooling) or
    ``image only`` (never); the kinds a map's dependence on the patient differs by."""
    if not model.uses_meta:
        return "image only"
    return "maps" if model.fuses_on_maps else "late"


def map_rank_correlation(first: np.ndarray, second: np.ndarray) -> float:
    """Spearman rank correlation of two maps over pixels: exactly 1.0 when they are the same array,
    NaN when either is constant (no ranks to correlate)."""
    a, b = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"maps differ in size: {a.shape} vs {b.shape}")
    if np.array_equal(a, b):
        return 1.0
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a.ravel(), b.ravel()).statistic)


@dataclass(frozen=True)
class MetadataEffect:
    """The CAMs (B, H, W) of B cases with their metadata and with every feature absent, and per case
    the rank correlation of the two over pixels."""

    with_metadata: np.ndarray
    without_metadata: np.ndarray
    spearman: np.ndarray  # (B,)
    kind: FusionKind

    @property
    def difference(self) -> np.ndarray:
        """With minus without (B, H, W), in [-1, 1]: where the patient's metadata raises the map."""
        return self.with_metadata - self.without_metadata


def metadata_effect(
    explainer: GradCamExplainer,
    images: Tensor,
    meta: Tensor,
    missing_row: np.ndarray | Tensor,
    targets: Sequence[int],
    with_metadata: np.ndarray | None = None,
) -> MetadataEffect:
    """The maps of ``targets`` with each case's ``meta`` (or the given ``with_metadata`` maps) and with
    ``missing_row`` in its place, batched; the explainer's method, layer, flips and temperature apply."""
    absent = torch.as_tensor(np.asarray(missing_row, dtype=np.float32)).to(meta.device, meta.dtype)
    absent = absent.reshape(1, -1).expand(len(images), -1)

    def maps(rows: Tensor) -> np.ndarray:
        parts = [
            explainer.explain(images[i : i + CAM_BATCH], rows[i : i + CAM_BATCH], list(targets[i : i + CAM_BATCH]))
            for i in range(0, len(images), CAM_BATCH)
        ]
        return np.concatenate(parts) if parts else np.empty((0, *images.shape[-2:]), np.float32)

    own = maps(meta) if with_metadata is None else np.asarray(with_metadata)
    without = maps(absent)
    rho = np.array([map_rank_correlation(a, b) for a, b in zip(own, without, strict=True)], dtype=np.float64)
    return MetadataEffect(own, without, rho, fusion_kind(explainer.model))


__all__ = ["FusionKind", "MetadataEffect", "fusion_kind", "map_rank_correlation", "metadata_effect"]
