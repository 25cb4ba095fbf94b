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
    """Largest between-group difference of each audited metric; those in :data:`WITH_INTERVAL` with a 95%
    lesion-bootstrap interval (NaN when ``n_boot`` is 0)."""
    if len(np.unique(values)) < 2:
        return {m: {"gap": float("nan"), "ci": [float("nan"), float("nan")], "between": []} for m in AUDITED}
    frame = _frame(y, probs, values, key)
    by = frame.by_group[list(AUDITED)].astype(float)
    point = frame.difference(method="between_groups")
    unique, inverse = np.unique(lesions, return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(unique))]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        rows = np.concatenate([members[i] for i in rng.integers(0, len(unique), len(unique))])
        if len(np.unique(values[rows])) < 2:
            continue
        frame_b = _frame(y[rows], probs[rows], values[rows], key, WITH_INTERVAL)
        draws.append(frame_b.difference(method="between_groups"))
    boot = pd.DataFrame(draws)
    out = {}
    for m in AUDITED:
        low, high = np.nanpercentile(boot[m], [2.5, 97.5]) if m in boot else (np.nan, np.nan)
        col = by[m].dropna()
        between = [str(col.idxmax()), str(col.idxmin())] if len(col) else []
        out[m] = {"gap": float(point[m]), "ci": [float(low), float(high)], "between": between}
    return out


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
