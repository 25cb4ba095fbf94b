"""Section ``embeddings``: images/s of the frozen-backbone embedding pass, single view and flip-averaged."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..models import ImageBranch
from ..runs import compute_embeddings
from .context import BenchContext
from .measure import figure, measured


def bench_embeddings(ctx: BenchContext) -> dict[str, Any]:
    """Images/s of the frozen-backbone embedding pass, single view and flip-averaged; the full pass extrapolated."""
    m = ctx.cfg.model
    branch = ImageBranch(m.backbone, m.weights, m.multiscale)
    images = np.array(ctx.end2end.images()[ctx.subsample(len(ctx.ham.metadata), ctx.sizes.embed_images)])

    def run(x: np.ndarray, flips: bool) -> np.ndarray:
        """Embeddings of ``x`` with the fresh branch, flip-averaged or not."""
        return compute_embeddings(
            branch,
            x,
            ctx.end2end.normalize,
            flip_average=flips,
            batch_size=ctx.cfg.train.batch_size,
            device=ctx.device,
            show=False,
        )

    run(images[:4], False)  # warm-up
    rates, figures = {}, []
    for flips in (False, True):
        with measured() as record:
            run(images, flips)
        rates[flips] = len(images) / record["seconds"]
        figures.append(
            figure(
                f"embedding pass images/s ({'4-flip average' if flips else 'single view'})",
                rates[flips],
                "img/s",
                record,
                note=f"{len(images)} images, batch {ctx.cfg.train.batch_size}, {m.backbone} multiscale={m.multiscale}",
            )
        )
    full = len(ctx.ham.metadata) / rates[ctx.cfg.train.flip_average]
    figures.append(
        figure(
            "full embedding pass (extrapolated)",
            full,
            "s",
            note=f"{len(ctx.ham.metadata)} images, flip_average={ctx.cfg.train.flip_average}",
        )
    )
    return {"figures": figures, "details": {"images": len(images), "flip_cost": rates[False] / rates[True]}}
