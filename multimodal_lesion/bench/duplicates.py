"""Section ``duplicates``: the near-duplicate search at a user's scale (25,000 images, ISIC 2019's size).

The candidate step (every image's nearest neighbours among all the others, by centred cosine
similarity) is timed in full on random embeddings of that many images, in blocked matrix products,
against the naive way (a Python loop over pairs, timed on a few query rows and extrapolated). The
verification step (ORB keypoints of an image, keypoint matching + RANSAC of a pair) is timed on the
dataset's cached images and extrapolated to the pairs that 25,000 images with the default neighbours give.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..runs import RunInputs, make_splits, prepare_inputs
from ..runs.duplicates import DuplicateSettings, all_keypoints, centred_unit, nearest_neighbours, verify_pairs
from .context import BenchContext
from .measure import figure, measured

#: Width of the frozen multi-scale EfficientNet-Lite0 embedding the real preset caches.
EMBEDDING_WIDTH = 1712
#: Distinct pairs per image and neighbour, a pair often found from both ends (HAM10000: 26.4 pairs per image
#: with 10 overall and 30 same-patient neighbours).
PAIRS_PER_NEIGHBOUR = 0.66


def bench_duplicates(ctx: BenchContext) -> dict[str, Any]:
    """Time and memory of both steps of ``mmlesion duplicates`` at ``sizes.duplicate_pool`` images."""
    n, settings = ctx.sizes.duplicate_pool, DuplicateSettings()
    rng = np.random.default_rng(0)
    unit = centred_unit(rng.normal(size=(n, EMBEDDING_WIDTH)).astype(np.float32), np.zeros(EMBEDDING_WIDTH))
    with measured() as record:
        nearest_neighbours(unit, unit, settings.neighbours, skip_self=True, block=settings.block)
    queries = min(5, n)
    start = time.perf_counter()
    for i in range(queries):  # the naive way: one Python dot product per pair
        sims = [float(unit[i] @ unit[j]) for j in range(n) if j != i]
        sorted(range(len(sims)), key=sims.__getitem__)[-settings.neighbours :]
    naive = (time.perf_counter() - start) / queries * n
    inputs = _inputs(ctx)
    images = inputs.images()
    rows = ctx.subsample(len(images), ctx.sizes.duplicate_pairs + 1)
    with measured() as kp_record:
        keypoints = all_keypoints(images, rows, settings)
    pairs = np.stack([rows[:-1], rows[1:]], axis=1)
    with measured() as match_record:
        verify_pairs(keypoints, keypoints, pairs, settings)
    per_image, per_pair = kp_record["seconds"] / len(rows), match_record["seconds"] / len(pairs)
    n_pairs = n * (settings.neighbours + settings.patient_neighbours) * PAIRS_PER_NEIGHBOUR
    return {
        "figures": [
            figure(
                f"nearest neighbours of {n} images ({settings.neighbours} each, blocked products)",
                record["seconds"],
                "s",
                record,
                naive=naive,
                note=f"naive: a Python loop over pairs, {queries} query rows timed and extrapolated to {n}",
            ),
            figure(f"ORB keypoints per image ({settings.keypoints}, and mirrored)", per_image * 1000, "ms", kp_record),
            figure("keypoint verification per pair (ratio test + RANSAC, mirrored too)", per_pair * 1000, "ms"),
            figure(
                f"verification of {n} images (extrapolated)",
                n * per_image + n_pairs * per_pair,
                "s",
                note=f"{n} images' keypoints + ~{n_pairs:,.0f} pairs, {settings.threads} threads",
            ),
        ],
        "details": {"pool": n, "pairs_timed": len(pairs), "threads": settings.threads},
    }


def _inputs(ctx: BenchContext) -> RunInputs:
    """The frozen-path inputs of the dataset: its cached images at the configured size."""
    cfg = ctx.frozen_cfg
    return prepare_inputs(cfg, ctx.dataset, make_splits(cfg, ctx.dataset))
