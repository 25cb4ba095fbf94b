"""Section ``data``: images/s of the cached uint8 array against decoding and resizing each JPEG every epoch."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from ..data.datasets import BATCH_AUGMENTATIONS
from ..data.sampling import EpochSampler, ImageBatches
from .context import BenchContext, naive_images, training_loader
from .measure import figure, measured, torch_threads


def loader_rate(loader: Iterable[dict], epochs: int) -> tuple[float, dict[str, Any], list[float]]:
    """Best images/s over ``epochs`` full passes of ``loader``: (best rate, measurement record, every rate)."""
    rates = []
    with measured() as record:
        for epoch in range(epochs):
            sampler = loader.sampler if isinstance(loader, (ImageBatches, torch.utils.data.DataLoader)) else None
            if isinstance(sampler, EpochSampler):  # a new shuffle each epoch, as training draws
                sampler.set_epoch(epoch)
            t0, n = time.perf_counter(), 0
            for batch in loader:
                n += len(batch["target"])
            rates.append(n / (time.perf_counter() - t0))
    return max(rates), record, rates


def _data_pair(ctx: BenchContext, images: np.ndarray, rows: np.ndarray, threads: int | None) -> tuple[list[dict], dict]:
    """Cached-array and JPEG loaders over the same rows, at one torch thread count."""
    epochs = ctx.sizes.data_epochs
    with torch_threads(threads) as k:
        cached, cached_rec, cached_rates = loader_rate(training_loader(ctx, images, rows), epochs)
        batched, batched_rec, batched_rates = loader_rate(batch_loader(ctx, images, rows), epochs)
        naive, naive_rec, naive_rates = loader_rate(training_loader(ctx, naive_images(ctx), rows), epochs)
    how = (
        f"{len(rows)} images {tuple(ctx.cfg.data.image_size)}, batch {ctx.sizes.train_batch}, augment="
        f"{ctx.cfg.train.augment!r}, num_workers={ctx.cfg.data.num_workers}, best of {epochs} epochs"
    )
    figures = [
        figure(
            f"cached array, batch augmentation images/s, {k} torch thread(s)",
            batched,
            "img/s",
            batched_rec,
            naive=naive,
            target=("ratio", ">=", 5.0),
            note=how + "; train.batch_augment=true: one gather, augmentation and normalisation per batch",
        ),
        figure(
            f"cached array, per-image augmentation images/s, {k} torch thread(s)",
            cached,
            "img/s",
            cached_rec,
            naive=naive,
            note="train.batch_augment=false: torchvision per image in the DataLoader",
        ),
        figure(f"JPEG decode+resize images/s, {k} torch thread(s) (naive)", naive, "img/s", naive_rec),
    ]
    rates = {"cached_epoch_rates": cached_rates, "batched_epoch_rates": batched_rates, "naive_epoch_rates": naive_rates}
    return figures, {f"threads_{k}": rates}


def batch_loader(ctx: BenchContext, images: np.ndarray, rows: np.ndarray) -> ImageBatches:
    """The batch-augmentation loader (``train.batch_augment``) over the same rows as :func:`training_loader`."""
    inputs, cfg = ctx.end2end, ctx.cfg
    tensors = {"meta": torch.from_numpy(inputs.meta[rows]), "target": torch.from_numpy(inputs.targets[rows])}
    ids = [inputs.image_ids[i] for i in rows]
    sampler = EpochSampler(len(rows), shuffle=True, seed=cfg.train.seed)
    augment = BATCH_AUGMENTATIONS[cfg.train.augment]()
    return ImageBatches(images, rows, tensors, ids, ctx.sizes.train_batch, sampler, inputs.normalize, augment)


def bench_data(ctx: BenchContext) -> dict[str, Any]:
    """Images/s of the cached uint8 array versus decoding + resizing each JPEG every epoch.

    Measured at the default torch thread count (as in-process training loads) and at one thread (as
    DataLoader workers load): per-image tensor ops are tiny, and on a busy CPU two threads can wait on
    each other far longer than the op takes.
    """
    with measured() as cache_record:
        images = ctx.end2end.images()
    rows = ctx.subsample(len(images), ctx.sizes.data_images)
    figures: list[dict] = []
    details: dict[str, Any] = {}
    for threads in dict.fromkeys((torch.get_num_threads(), 1)):
        f, d = _data_pair(ctx, images, rows, threads)
        figures, details = figures + f, {**details, **d}
    figures.append(
        figure(
            "image cache open/build",
            cache_record["seconds"],
            "s",
            cache_record,
            note="build on first use, else validate + memmap open",
        )
    )
    return {
        "figures": figures,
        "details": {**details, "images": len(rows), "image_size": list(ctx.cfg.data.image_size)},
    }
