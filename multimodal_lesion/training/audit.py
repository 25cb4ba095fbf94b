"""Subgroup audit: metrics and calibration by patient attribute with fairlearn's ``MetricFrame``.

For each attribute (sex, age band, localization) the metrics of every value with enough lesions, and
the largest gap between two of them with a bootstrap interval that resamples lesions (the images of
one lesion are not independent). Values with fewer than ``min_lesions`` lesions are listed but left
out of the gap: their metrics are too noisy to rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from .metrics import expected_calibration_error

#: Fewer lesions than this in a subgroup: listed, flagged and left out of the gap.
MIN_LESIONS = 30
#: The audited metrics, higher is better except ECE.
AUDITED = ("accuracy", "balanced_accuracy", "key_sensitivity", "ece")
#: The metrics whose largest gap gets a bootstrap interval (each resample is a MetricFrame: keep it small).
WITH_INTERVAL = ("balanced_accuracy", "ece")
#: Equal-width confidence bins of the ECE (as ``metrics.expected_calibration_error``).
ECE_BINS = 15


def _metrics(y_all: np.ndarray, probs: np.ndarray, key: int) -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    """MetricFrame metrics over row numbers (passed as both ``y_true`` and ``y_pred``) into ``y_all`` and ``probs``.

    ECE needs each case's probabilities, which MetricFrame cannot carry; row numbers can, and every
    metric reads the real arrays through them.
    """

    def hits(rows: np.ndarray) -> np.ndarray:
        return probs[rows].argmax(axis=1) == y_all[rows]

    def balanced(rows: np.ndarray, _: np.ndarray) -> float:
        y, hit = y_all[rows], hits(rows)
        present = np.unique(y)
        return float(np.mean([hit[y == c].mean() for c in present])) if len(present) > 1 else float("nan")

    def sensitivity(rows: np.ndarray, _: np.ndarray) -> float:
        mine = rows[y_all[rows] == key]
        return float(hits(mine).mean()) if len(mine) else float("nan")

    return {
        "n_images": lambda rows, _: len(rows),
        "accuracy": lambda rows, _: float(hits(rows).mean()),
        "balanced_accuracy": balanced,
        "key_sensitivity": sensitivity,
        "ece": lambda rows, _: expected_calibration_error(y_all[rows], probs[rows]),
    }


def _frame(y: np.ndarray, probs: np.ndarray, values: np.ndarray, key: int, only: tuple[str, ...] = ()) -> Any:
    from fairlearn.metrics import MetricFrame

    metrics = _metrics(y, probs, key)
    if only:
        metrics = {k: metrics[k] for k in only}
    rows = np.arange(len(y))
    return MetricFrame(metrics=metrics, y_true=rows, y_pred=rows, sensitive_features=values)


def audit_attribute(
    y: np.ndarray,
    probs: np.ndarray,
    values: np.ndarray,
    lesions: np.ndarray,
    key: int,
    *,
    n_boot: int = 200,
    seed: int = 0,
    min_lesions: int = MIN_LESIONS,
) -> dict[str, Any]:
    """One attribute: per value its metrics and lesion count, and the largest gap of each metric with a CI."""
    y, probs, values, lesions = map(np.asarray, (y, probs, values, lesions))
    table = _frame(y, probs, values, key).by_group
    n_lesions = pd.Series(lesions).groupby(values).nunique()
    table["n_lesions"] = n_lesions.reindex(table.index).to_numpy()
    table["too_small"] = table["n_lesions"] < min_lesions
    large = np.isin(values, table.index[~table["too_small"]])
    gaps = _gaps(y[large], probs[large], values[large], lesions[large], key, n_boot, seed)
    groups = {str(v): {k: _plain(x) for k, x in row.items()} for v, row in table.iterrows()}
    return {"groups": groups, "gaps": gaps, "min_lesions": min_lesions}


def _gaps(
    y: np.ndarray, probs: np.ndarray, values: np.ndarray, lesions: np.ndarray, key: int, n_boot: int, seed: int
) -> dict[str, Any]:
    """Largest between-group difference of each audited metric (fairlearn's ``difference``); those in
    :data:`WITH_INTERVAL` with a 95% lesion-bootstrap interval (NaN when ``n_boot`` is 0)."""
    if len(np.unique(values)) < 2:
        return {m: {"gap": float("nan"), "ci": [float("nan"), float("nan")], "between": []} for m in AUDITED}
    frame = _frame(y, probs, values, key)
    by = frame.by_group[list(AUDITED)].astype(float)
    point = frame.difference(method="between_groups")
    boot = bootstrap_gaps(y, probs, values, lesions, n_boot, seed) if n_boot else {}
    out = {}
    for m in AUDITED:
        low, high = np.nanpercentile(boot[m], [2.5, 97.5]) if m in boot else (np.nan, np.nan)
        col = by[m].dropna()
        between = [str(col.idxmax()), str(col.idxmin())] if len(col) else []
        out[m] = {"gap": float(point[m]), "ci": [float(low), float(high)], "between": between}
    return out


def weighted_group_metrics(
    y: np.ndarray, probs: np.ndarray, values: np.ndarray, weights: np.ndarray, bins: int = ECE_BINS
) -> dict[str, np.ndarray]:
    """Balanced accuracy and ECE of every group when row i counts ``weights[i]`` times (NaN: no row, or
    balanced accuracy of a group with one class). Integer weights are a resample with replacement, so
    one call scores one bootstrap replicate without building a MetricFrame (thousands of those take minutes).
    """
    groups, g = np.unique(values, return_inverse=True)
    n_groups, n_classes = len(groups), probs.shape[1]
    hit = (probs.argmax(axis=1) == y).astype(float)
    confidence = probs.max(axis=1)
    b = np.searchsorted(np.linspace(0.0, 1.0, bins + 1)[1:-1], confidence, side="left")
    cells = g * n_classes + y
    n_gc = np.bincount(cells, weights, n_groups * n_classes).reshape(n_groups, n_classes)
    hits_gc = np.bincount(cells, weights * hit, n_groups * n_classes).reshape(n_groups, n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(n_gc > 0, hits_gc / n_gc, np.nan)
        present = (n_gc > 0).sum(axis=1)
        balanced = np.where(present > 1, np.nansum(np.nan_to_num(recall), axis=1) / present, np.nan)
        slots = g * bins + b
        gap = np.bincount(slots, weights * hit, n_groups * bins) - np.bincount(
            slots, weights * confidence, n_groups * bins
        )
        total = np.bincount(g, weights, n_groups)
        ece = np.where(total > 0, np.abs(gap).reshape(n_groups, bins).sum(axis=1) / total, np.nan)
    return {"balanced_accuracy": balanced, "ece": ece}


def bootstrap_gaps(
    y: np.ndarray, probs: np.ndarray, values: np.ndarray, lesions: np.ndarray, n_boot: int, seed: int
) -> dict[str, np.ndarray]:
    """The largest group gap of balanced accuracy and ECE in ``n_boot`` resamples of whole lesions."""
    _, lesion = np.unique(lesions, return_inverse=True)
    n_lesions = int(lesion.max()) + 1
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {m: [] for m in WITH_INTERVAL}
    for _ in range(n_boot):
        weights = rng.multinomial(n_lesions, np.full(n_lesions, 1.0 / n_lesions))[lesion].astype(float)
        for m, per_group in weighted_group_metrics(y, probs, values, weights).items():
            finite = per_group[np.isfinite(per_group)]
            draws[m].append(float(finite.max() - finite.min()) if len(finite) > 1 else np.nan)
    return {m: np.asarray(v) for m, v in draws.items()}


def subgroup_audit(
    y: np.ndarray,
    probs: np.ndarray,
    attributes: dict[str, pd.Series],
    lesions: np.ndarray,
    key: int,
    *,
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`audit_attribute` for every attribute (values aligned with ``y``)."""
    return {
        name: audit_attribute(y, probs, np.asarray(values.astype(str)), lesions, key, n_boot=n_boot, seed=seed)
        for name, values in attributes.items()
    }


def _plain(x: Any) -> Any:
    """numpy scalars as plain Python values for JSON."""
    return x.item() if hasattr(x, "item") else x
