"""Epoch-seeded sampling shared by the image and embedding loaders.

Every epoch's order is a pure function of (seed, epoch): a resumed run sees exactly the batches
an uninterrupted one would, and data-parallel ranks take disjoint shards of the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


class EpochSampler(torch.utils.data.Sampler[int]):
    """Shuffled, class-balanced (``weights``) or sequential indices, re-seeded by :meth:`set_epoch`."""

    def __init__(
        self,
        n: int,
        *,
        shuffle: bool,
        seed: int = 0,
        weights: np.ndarray | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.n, self.shuffle, self.seed, self.weights = n, shuffle, seed, weights
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.weights is not None:
            p = self.weights / self.weights.sum()
            return rng.choice(self.n, size=self.n, replace=True, p=p)
        return rng.permutation(self.n) if self.shuffle else np.arange(self.n)

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        if self.world_size > 1:  # pad to a multiple of the world size, then shard
            pad = (-len(order)) % self.world_size
            order = np.concatenate([order, order[:pad]])[self.rank :: self.world_size]
        return iter(order.tolist())

    def __len__(self) -> int:
        return -(-self.n // self.world_size)


class TensorBatches:
    """Dict batches sliced straight from in-memory tensors: no per-item collate on the fast path."""

    def __init__(
        self, tensors: dict[str, torch.Tensor], image_ids: list[str], batch_size: int, sampler: EpochSampler
    ) -> None:
        self.tensors, self.image_ids = tensors, image_ids
        self.batch_size, self.sampler = batch_size, sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        order = torch.as_tensor(list(iter(self.sampler)), dtype=torch.long)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch: dict[str, Any] = {k: v[idx] for k, v in self.tensors.items()}
            batch["image_id"] = [self.image_ids[i] for i in idx.tolist()]
            yield batch


class MetaDropout:
    """Training batches in which patient features are read as missing at random (robustness to absent metadata).

    Each feature of each image is replaced by its "missing" encoding with probability ``p_each``, and all
    of an image's features at once with probability ``p_all``, so that a model learns to predict from the
    image alone when a user has no metadata. The draws are a pure function of (seed, epoch), like the order.

    Args:
        batches: the training batches (anything with ``set_epoch`` and ``__len__``) whose ``"meta"`` is encoded.
        missing_row: the encoding of a patient with every feature missing (``MetadataEncoder.missing_row``).
        groups: feature -> its encoded columns (``MetadataEncoder.feature_groups_``).
    """

    def __init__(
        self,
        batches: Any,
        missing_row: np.ndarray,
        groups: dict[str, list[int]],
        p_each: float,
        p_all: float,
        seed: int,
    ) -> None:
        self.batches, self.missing_row, self.groups = batches, torch.from_numpy(missing_row), groups
        self.p_each, self.p_all, self.seed, self.epoch = p_each, p_all, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[dict]:
        rng = np.random.default_rng([self.seed, self.epoch, 1])
        for batch in self.batches:
            n = len(batch["meta"])
            drop = (rng.random((n, len(self.groups))) < self.p_each) | (rng.random((n, 1)) < self.p_all)
            yield {**batch, "meta": self._dropped(batch["meta"], drop)} if drop.any() else batch

    def _dropped(self, meta: torch.Tensor, drop: np.ndarray) -> torch.Tensor:
        """``meta`` with the encoded columns of each dropped (image, feature) set to the missing encoding."""
        meta = meta.clone()
        missing = self.missing_row.to(meta.dtype)
        for j, columns in enumerate(self.groups.values()):
            rows = torch.from_numpy(np.flatnonzero(drop[:, j]))
            if len(rows):
                cols = torch.as_tensor(columns)
                meta[rows[:, None], cols] = missing[cols]
        return meta


class MapBatches:
    """Dict batches of cached backbone maps (N, views, C, h, w) for partial fine-tuning.

    Training batches take one random cached view per image (a flip, or one of the augmented views cached
    after them) and one random crop ``crop`` cells smaller per axis (at most the map's side minus one)
    for the whole batch. Evaluation batches take the unflipped view, or the first ``eval_views`` (the
    flips; ``all_views``: the model averages its logits over them, as flip TTA does on images).
    Draws are a pure function of (seed, epoch).

    Args:
        maps: the memory-mapped float16 maps of every image.
        rows: the rows of this split.
        tensors: per-row tensors of this split (``meta``, ``target``), indexed like ``rows``.
        image_ids: the ids of ``rows``.
        sampler: the epoch sampler over ``rows``.
    """

    def __init__(
        self,
        maps: np.ndarray,
        rows: np.ndarray,
        tensors: dict[str, torch.Tensor],
        image_ids: list[str],
        batch_size: int,
        sampler: EpochSampler,
        *,
        train: bool,
        crop: int = 0,
        all_views: bool = False,
        eval_views: int = 4,
        seed: int = 0,
    ) -> None:
        self.maps, self.rows, self.tensors, self.image_ids = maps, np.asarray(rows), tensors, image_ids
        self.batch_size, self.sampler, self.train = batch_size, sampler, train
        self.crop = max(0, min(crop, maps.shape[-2] - 1, maps.shape[-1] - 1))  # a crop keeps at least one cell
        self.all_views, self.eval_views, self.seed, self.epoch = all_views, eval_views, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def _maps(self, idx: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        rows = self.rows[idx]
        if not self.train:
            return torch.from_numpy(
                np.array(self.maps[rows, : self.eval_views] if self.all_views else self.maps[rows, 0])
            )
        views = rng.integers(0, self.maps.shape[1], size=len(rows))
        x = np.array(self.maps[rows, views])
        if self.crop > 0:
            dy, dx = rng.integers(0, self.crop + 1, size=2)
            x = x[..., dy : dy + x.shape[-2] - self.crop, dx : dx + x.shape[-1] - self.crop]
        return torch.from_numpy(np.ascontiguousarray(x))

    def __iter__(self) -> Iterator[dict]:
        rng = np.random.default_rng([self.seed, self.epoch, 2])
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch: dict[str, Any] = {k: v[torch.from_numpy(idx)] for k, v in self.tensors.items()}
            batch["maps"] = self._maps(idx, rng)
            batch["image_id"] = [self.image_ids[i] for i in idx.tolist()]
            yield batch


class ImageBatches:
    """End-to-end batches straight from the cached uint8 array: one gather, then augmentation and normalisation.

    The batch's rows are read from the (memory-mapped) array in one indexing call and augmented as a batch
    (:class:`~multimodal_lesion.data.datasets.BatchAugment`, which folds the normalisation into its colour
    matrix), so no Python runs per image. Draws are a pure function of (seed, epoch), like the order.

    Args:
        images: the cached uint8 images (N, H, W, 3) of every row.
        rows: the rows of this split.
        tensors: per-row tensors of this split (``meta``, ``target``), indexed like ``rows``.
        image_ids: the ids of ``rows``.
        normalize: float pixels (N, 3, H, W) in [0, 255] -> the model's input.
        augment: a batch augmentation, or None (evaluation).
    """

    def __init__(
        self,
        images: np.ndarray,
        rows: np.ndarray,
        tensors: dict[str, torch.Tensor],
        image_ids: list[str],
        batch_size: int,
        sampler: EpochSampler,
        normalize: Any,
        augment: Any = None,
        seed: int = 0,
    ) -> None:
        self.images, self.rows, self.tensors, self.image_ids = images, np.asarray(rows), tensors, image_ids
        self.batch_size, self.sampler, self.normalize, self.augment = batch_size, sampler, normalize, augment
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)

    def __iter__(self) -> Iterator[dict]:
        rng = torch.Generator().manual_seed(int(np.random.default_rng([self.seed, self.epoch, 3]).integers(2**62)))
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            pixels = torch.from_numpy(self.images[self.rows[idx]]).permute(0, 3, 1, 2)
            batch: dict[str, Any] = {k: v[torch.from_numpy(idx)] for k, v in self.tensors.items()}
            augmented = self.augment is not None
            batch["image"] = self.augment(pixels, rng, self.normalize) if augmented else self.normalize(pixels)
            batch["image_id"] = [self.image_ids[i] for i in idx.tolist()]
            yield batch
