"""Section ``ablation``: seconds per (model, fold, seed) cell on cached embeddings, run as the ablation
runs them (its worker processes), and the sampled cells' wall time extrapolated to the configured grid."""

from __future__ import annotations

from typing import Any

from ..ablation import GBM, Cell, CellContext, run_cells, shared_backbone
from ..data.cache import default_cache_dir
from ..data.splits import fold_assignment
from ..io import read_json
from .context import BenchContext
from .measure import figure, measured


def embedding_files(ctx: BenchContext) -> set[tuple[str, float]]:
    """(name, modification time) of every cached embedding file of the dataset: tells a cache hit from a miss."""
    folder = default_cache_dir(ctx.dataset, ctx.cfg.data.cache_dir or None)
    return {(p.name, p.stat().st_mtime) for p in folder.glob("embeddings-*.npy")} if folder.is_dir() else set()


def bench_ablation(ctx: BenchContext) -> dict[str, Any]:
    """Seconds per (model, fold, seed) cell on cached embeddings, run as the ablation runs them (its
    worker processes), and the wall time of the sampled cells extrapolated to the configured grid."""
    cfg, a, sizes = ctx.frozen_cfg, ctx.frozen_cfg.ablation, ctx.sizes
    folds = fold_assignment(ctx.dataset.metadata, a.folds, cfg.data.split_seed)
    before = embedding_files(ctx)
    with measured() as embed_record:
        shared = shared_backbone(cfg, ctx.dataset, folds, ctx.show)
    computed = embedding_files(ctx) != before
    names = list(a.models) + ([GBM] if a.gbm else [])
    cells = [
        Cell(m, k, s)
        for k in range(min(sizes.ablation_folds, a.folds))
        for s in a.seeds[: sizes.ablation_seeds]
        for m in names
    ]
    out = ctx.work / "ablation"
    ctx.log(f"{len(cells)} ablation cells, {a.workers} worker process(es)")
    with measured() as grid_record:
        run_cells(cells, CellContext(cfg, ctx.dataset, folds, shared, out), ctx.show)
    records = [read_json(out / "cells" / f"{c.name}.json") for c in cells]
    figures = [
        figure(
            f"ablation cell {r['model']}",
            r["seconds"],
            "s",
            note=f"fold {r['fold']} seed {r['seed']}, test BA {r['metrics']['balanced_accuracy']:.3f}",
        )
        for r in records
    ]
    scale = a.folds * len(a.seeds) / (len(cells) / len(names))
    figures.append(
        figure(
            f"full ablation ({len(names)} models x {a.folds} folds x {len(a.seeds)} seeds, extrapolated)",
            grid_record["seconds"] * scale,
            "s",
            grid_record,
            target=("value", "<=", 600.0),
            note=f"wall of {len(cells)} cells on {a.workers} worker(s) x {scale:g}; embedding pass excluded",
        )
    )
    figures.append(
        figure(
            "embedding pass for the ablation (this run)",
            embed_record["seconds"],
            "s",
            embed_record,
            note="computed now" if computed else "cache hit (computed earlier)",
        )
    )
    return {
        "figures": figures,
        "details": {
            "cell_seconds": {r["model"]: r["seconds"] for r in records},
            "sampled_cells_wall_s": grid_record["seconds"],
            "embedding_computed": computed,
            "workers": a.workers,
            "batch_size": cfg.train.batch_size,
            "epochs": cfg.train.epochs,
            "patience": cfg.train.patience,
        },
    }
