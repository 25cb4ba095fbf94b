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
