"""Section ``training``: end-to-end images/s with the real loader and engine, and the share of the wall
time spent outside the forward and backward passes."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch

from ..training.engine import build_loss, build_optimizer, build_scheduler, class_weights, train_epoch
from .context import BenchContext, naive_images, training_loader
from .measure import StepTimer, TimedIterator, figure, measured


def train_steps(ctx: BenchContext, batches: Iterable[dict], steps: int, amp: bool = False) -> dict[str, Any]:
    """Run the engine's :func:`train_epoch` for one warm-up step, then ``steps`` timed steps.

    Returns the measurement ``record``, the images seen, and the wall time split into forward,
    backward, loading and the rest (seconds), with the engine's own compute seconds beside them.
    """
    inputs, t = ctx.end2end, dataclasses.replace(ctx.end2end.cfg.train, amp=amp)
    weights = None
    if t.balance == "weighted_loss":
        weights = class_weights(inputs.targets[inputs.indices("train")], inputs.schema.n_classes)
    optimizer = build_optimizer(inputs.model, t)
    scheduler = build_scheduler(optimizer, t, steps + 1)
    loss_fn = build_loss(t, weights, inputs.device)
    scaler = torch.amp.GradScaler(inputs.device.type, enabled=t.amp and inputs.device.type == "cuda")
    args = (loss_fn, optimizer, scheduler, scaler, t, inputs.device, "bench", False)
    iterator = iter(batches)
    train_epoch(inputs.model, islice(iterator, 1), *args)  # warm-up: lazy initialisation, allocator
    loading = TimedIterator(iterator)
    with StepTimer(inputs.model, inputs.device) as timer, measured() as record:
        _, seen, compute = train_epoch(inputs.model, islice(loading, steps), *args)
    wall = record["seconds"]
    return {
        "record": record,
        "images": seen,
        "wall_s": wall,
        "images_per_s": seen / wall,
        "forward_s": timer.forward_seconds,
        "backward_s": timer.backward_seconds,
        "loading_s": loading.seconds,
        "engine_compute_s": compute,
        "other_s": wall - timer.forward_seconds - timer.backward_seconds - loading.seconds,
    }


def _outside_percent(result: dict[str, Any]) -> float:
    """Percent of the wall time outside the forward and backward passes."""
    return 100 * (1 - (result["forward_s"] + result["backward_s"]) / result["wall_s"])


def _drop_record(result: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items() if k != "record"}


def bench_training(ctx: BenchContext) -> dict[str, Any]:
    """End-to-end training images/s with the real loader and engine; the share outside forward/backward."""
    inputs = ctx.end2end
    cached = train_steps(ctx, inputs.batches("train", train=True, show=False), ctx.sizes.train_steps)
    naive = train_steps(
        ctx, training_loader(ctx, naive_images(ctx), inputs.indices("train")), ctx.sizes.naive_train_steps
    )
    bf16 = train_steps(ctx, inputs.batches("train", train=True, show=False), ctx.sizes.naive_train_steps, amp=True)
    how = (
        f"{inputs.cfg.model.name} on {inputs.cfg.model.backbone} {tuple(inputs.cfg.data.image_size)}, "
        f"batch {ctx.sizes.train_batch}, {ctx.sizes.train_steps} steps after 1 warm-up"
    )
    return {
        "figures": [
            figure(
                "end-to-end training images/s",
                cached["images_per_s"],
                "img/s",
                cached["record"],
                naive=naive["images_per_s"],
                note=how + "; naive = JPEG-decoding loader",
            ),
            figure(
                "wall time outside forward/backward",
                _outside_percent(cached),
                "%",
                target=("value", "<", 10.0),
                note="loading {:.1f}%, optimizer+other {:.1f}%".format(
                    100 * cached["loading_s"] / cached["wall_s"], 100 * cached["other_s"] / cached["wall_s"]
                ),
            ),
            figure("outside forward/backward, JPEG loader", _outside_percent(naive), "%", naive["record"]),
            figure(
                "end-to-end training images/s, bfloat16 autocast",
                bf16["images_per_s"],
                "img/s",
                bf16["record"],
                naive=cached["images_per_s"],
                note=f"train.amp=true on {inputs.device}; naive = float32 (above); {ctx.sizes.naive_train_steps} steps",
            ),
        ],
        "details": {
            "cached_loader": _drop_record(cached),
            "jpeg_loader": _drop_record(naive),
            "bf16_cached_loader": _drop_record(bf16),
        },
    }
