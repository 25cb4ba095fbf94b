"""The seeds of an ablation as an ensemble, for free: each fold's members averaged, scored against the members.

For every model and fold with two or more seeds, the ensemble's probabilities are the mean of its
seeds' (softmax) probabilities on the fold's test images. Both the ensemble and each member are
scored on accuracy, balanced accuracy, NLL, ECE and the size and coverage of conformal sets
calibrated on the fold's validation (stopping) fold. The comparison is paired over folds: the
ensemble minus the mean of its members on the same fold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ..config import ExperimentConfig
from ..data.dataset import LesionDataset
from ..training.metrics import classification_metrics
from ..training.stats import paired_comparison
from ..training.uncertainty import ConformalSets, ensemble_members

SCORED = ("accuracy", "balanced_accuracy", "nll", "ece", "set_size", "set_coverage")


def _scores(y: np.ndarray, probs: np.ndarray, y_val: np.ndarray, val: np.ndarray, cfg: ExperimentConfig) -> dict:
    u = cfg.uncertainty
    m = classification_metrics(y, probs, classes=[str(k) for k in range(probs.shape[1])], key_class="0")
    level = u.levels[0]
    sets = ConformalSets(u.conformal_score, (level,), u.class_conditional).fit(val, y_val).predict(probs)[:, :, 0]
    return {
        **{k: m[k] for k in SCORED[:4]},
        "set_size": float(sets.sum(1).mean()),
        "set_coverage": float(sets[np.arange(len(y)), y].mean()),
    }


def ensemble_frame(records: list[dict[str, Any]], dataset: LesionDataset, cfg: ExperimentConfig) -> pd.DataFrame:
    """One row per model, fold and kind (``member`` per seed, ``ensemble``) with the scored metrics."""
    classes = dataset.schema.classes
    targets = dataset.metadata.set_index("image_id")["dx"].map({c: i for i, c in enumerate(classes)})
    rows = []
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in records:
        if "val_probs" in r:
            groups.setdefault((r["model"], r["fold"]), []).append(r)
    for (model, fold), members in groups.items():
        if len(members) < 2:
            continue
        members = sorted(members, key=lambda r: r["seed"])
        y = targets.reindex(members[0]["image_ids"]).to_numpy()
        y_val = targets.reindex(members[0]["val_image_ids"]).to_numpy()
        for r in members:
            scores = _scores(y, np.asarray(r["probs"]), y_val, np.asarray(r["val_probs"]), cfg)
            rows.append({"model": model, "fold": fold, "kind": "member", "seed": r["seed"], **scores})
        mean = ensemble_members([np.asarray(r["probs"]) for r in members])
        mean_val = ensemble_members([np.asarray(r["val_probs"]) for r in members])
        scores = _scores(y, mean, y_val, mean_val, cfg)
        rows.append({"model": model, "fold": fold, "kind": "ensemble", "seed": -1, "n_members": len(members), **scores})
    return pd.DataFrame(rows)


def ensemble_comparison(frame: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    """Per model and metric: ensemble minus the mean member, paired over folds (mean, 95% CI, p)."""
    rows: list[dict[str, Any]] = []
    if frame.empty:
        return pd.DataFrame(rows)
    for model, g in frame.groupby("model", sort=False):
        members = g[g.kind == "member"].groupby("fold")[list(SCORED)].mean()
        ensemble = g[g.kind == "ensemble"].set_index("fold")[list(SCORED)].reindex(members.index)
        for metric in SCORED:
            paired = paired_comparison(ensemble[metric].to_numpy(float), members[metric].to_numpy(float), n_boot=n_boot)
            rows.append(
                {
                    "model": model,
                    "metric": metric,
                    "ensemble": float(ensemble[metric].mean()),
                    "member": float(members[metric].mean()),
                    **paired,
                }
            )
    return pd.DataFrame(rows)


def ensemble_markdown(comparison: pd.DataFrame, cfg: ExperimentConfig) -> str:
    """Ensemble against single seeds, per model: mean over folds and the paired difference with its CI."""
    level = cfg.uncertainty.levels[0]
    lines = [
        f"# Ensembles of the {len(cfg.ablation.seeds)} seeds against single seeds",
        "",
        f"Each fold's test images; mean over {cfg.ablation.folds} folds; Δ = ensemble − mean member, paired over "
        f"folds, 95% bootstrap CI. Sets: {cfg.uncertainty.conformal_score.upper()} at {level:.0%}, calibrated on "
        "each fold's validation fold. Lower is better for nll, ece and set_size.",
        "",
        "| model | metric | single seed | ensemble | Δ | 95% CI |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.model} | {r.metric} | {r.member:.3f} | {r.ensemble:.3f} | {r.mean_diff:+.3f} | "
        f"[{r.ci_low:+.3f}, {r.ci_high:+.3f}] |"
        for r in comparison.itertuples()
    ]
    return "\n".join(lines) + "\n"
