"""``mmlesion demo``: synthetic data (or ``--data``) -> EDA -> a small ablation -> an explanation report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .config import ExperimentConfig, replace


def run_demo(cfg: ExperimentConfig, out: str | Path, show: bool = True) -> dict[str, Any]:
    """Run the whole pipeline into ``out/{eda,ablation,run,report}`` and return the headline numbers."""
    from .ablation import run_ablation
    from .report.eda import run_eda
    from .runs import RunFolder, resolve_data
    from .workflows import explain_run, train_run

    out = Path(out)
    t0 = time.perf_counter()
    steps = ["data", "eda", "ablation", "train the best fusion model", "explanation report"]
    say = (
        (lambda i: print(f"[{i + 1}/{len(steps)}] {steps[i]}  ({time.perf_counter() - t0:.0f} s)", flush=True))
        if show
        else (lambda i: None)
    )
    say(0)
    dataset = resolve_data(cfg, show)
    cfg = replace(cfg, data={"root": str(dataset.root)})
    say(1)
    eda = run_eda(dataset.metadata, out / "eda")
    say(2)
    paths = run_ablation(cfg, out / "ablation", show=show)
    best = _best_fusion(paths["comparison"])
    say(3)
    train_run(replace(cfg, model={"name": best}), out / "run", overwrite=True, show=show)  # the demo's own run
    say(4)
    report = explain_run(out / "run", out / "report", n=cfg.explain.n_cases, show=show)
    summary = RunFolder(out / "run").read_metrics()
    return {
        "seconds": round(time.perf_counter() - t0, 1),
        "n_images": eda["n_images"],
        "best_fusion": best,
        "ablation_summary": str(paths["summary_md"]),
        "report": str(report),
        "eda": str(out / "eda"),
        "test": summary["test"]["calibrated"],
        "groups": summary.get("groups", "lesions"),  # what n_lesions counts (patients for patient-grouped data)
        "comparison": str(paths["comparison"]),
    }


def _best_fusion(comparison_csv: Path) -> str:
    """The fusion model with the largest mean gain in balanced accuracy over the baseline."""
    import pandas as pd

    comp = pd.read_csv(comparison_csv)
    comp = comp[comp.model != "metadata_only"]
    comp = comp[~comp.model.str.startswith("gbm")]
    return str(comp.sort_values("mean_diff", ascending=False).iloc[0]["model"]) if len(comp) else "concat"
