"""An ablation in MLflow: a parent run (config, summary means and CIs, the summary tables and plots)
with one child run per cell (model x fold x seed: its test metrics and per-epoch scores).

Everything is logged from the parent process once the cells are on disk, whichever backend (process
pool, Ray) computed them, so workers never talk to MLflow; an ablation resumed after a crash logs a
new parent holding every cell.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..config import ExperimentConfig
from ..tracking import MlflowTracker, config_params, log_history, numbers, tracked


def track_ablation(cfg: ExperimentConfig, out: Path, records: list[dict[str, Any]], paths: Mapping[str, Path]) -> None:
    """Log a finished ablation to ``cfg.tracking.mlflow_uri`` (nothing when it is empty)."""
    with tracked(cfg.tracking, out.resolve().name, "ablation") as parent:
        if parent is None:
            return
        parent.set_tags({"mmlesion.out": out.resolve()})
        parent.log_params(config_params(cfg))
        for record in records:
            log_cell(parent, record)
        if "summary" in paths:
            parent.log_metrics(summary_metrics(pd.read_csv(paths["summary"])))
        parent.log_artifacts([out / "config.toml", *paths.values(), out / "timing.json"])


def log_cell(parent: MlflowTracker, record: Mapping[str, Any]) -> None:
    """One cell as a child run: its model / fold / seed, test metrics, seconds and per-epoch history."""
    name = f"{record['model']}__fold{record['fold']}__seed{record['seed']}"
    child = parent.child(name, tags={"mmlesion.kind": "ablation_cell"})
    try:
        child.log_params({"model": record["model"], "fold": record["fold"], "seed": record["seed"]})
        test = {f"test.{k}": v for k, v in numbers(record["metrics"]).items()}
        child.log_metrics({**test, "seconds": record["seconds"]})
        log_history(child, record.get("history", []))  # neural cells only (cells of older versions lack it)
    except BaseException:
        child.end("FAILED")
        raise
    child.end()


def summary_metrics(summary: pd.DataFrame) -> dict[str, float]:
    """``summary.csv`` as ``<model>.<metric>.<mean|std|ci_low|ci_high>``: the parent run's headline numbers."""
    stats = [c for c in ("mean", "std", "ci_low", "ci_high") if c in summary.columns]
    return {f"{row.model}.{row.metric}.{s}": float(getattr(row, s)) for row in summary.itertuples() for s in stats}
