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
