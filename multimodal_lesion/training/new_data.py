"""What a run can say about images it never saw, beside its probabilities: prediction sets (an empty set
means refer), the shift alarm (:mod:`~multimodal_lesion.runs.shift`) and a clinic's known prevalence
(:mod:`~multimodal_lesion.runs.prior`).

``mmlesion predict --data/--csv`` and ``mmlesion evaluate --data OTHER`` share these columns:

- ``set_<level>``: the conformal set's classes (space-separated; fitted on the run's validation
  predictions, the calibrated probabilities without any prior: class-conditional sets keep their
  per-class coverage under a pure change of prevalence) and ``empty_set_<level>``: no class is
  plausible at this level, refer;
- ``shift_score``, ``shift_p``, ``out_of_distribution`` (``shift_p <= level``);
- with a known prior, ``prior_p_<class>`` and ``prior_decision`` (the Bayes decision at that prevalence).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import note
from ..runs import RunFolder
from ..runs.prior import estimate_prior, parse_prior, reweight, training_prior
from ..runs.shift import DEFAULT_LEVEL, ShiftReference, alarm, shift_reference, shift_summary
from .uncertainty import EMPTY_SET_MEANING, ConformalSets

#: The dataset-level test's p-value at or below which the shift alarm counts as firing.
DATASET_ALARM = 0.01


@dataclass(frozen=True)
class NewDataOptions:
    """``--prior``, ``--estimate-prior`` and ``--shift-level`` of ``predict`` and ``evaluate``."""

    prior: str = ""  # a clinic's class prevalence: FILE (CSV / TOML) or class=value,...; "" = the run's own
    estimate_prior: bool = False  # evaluate: the EM estimate of OTHER's prevalence, as a diagnostic
    shift_level: float = DEFAULT_LEVEL  # the per-image alarm's level (its false-alarm rate on images like the run's)
    shift: bool = True  # compute the shift alarm (needs the run's data once, for its reference)


def run_prior(folder: RunFolder) -> np.ndarray:
    """The run's training prior: the class shares of its training split (``splits.csv``)."""
    splits = folder.read_splits()
    return training_prior(
        splits.loc[splits["split"] == "train", "dx"].astype(str).tolist(), folder.read_schema().classes
    )


def clinic_prior(folder: RunFolder, spec: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(the run's training prior, the clinic's prevalence of ``spec``), or None without ``spec``."""
    if not spec:
        return None
    train = run_prior(folder)
    return train, parse_prior(spec, folder.read_schema().classes, train)


def fitted_sets(folder: RunFolder) -> tuple[ConformalSets, tuple[float, ...]]:
    """The run's conformal sets fitted on its validation predictions as ``[uncertainty]`` says, and the levels."""
    u = folder.read_config().uncertainty
    y_val, p_val = folder.read_predictions("val")
    return ConformalSets(u.conformal_score, u.levels, u.class_conditional).fit(p_val, y_val), tuple(u.levels)


def set_columns(sets: np.ndarray, classes: Sequence[str], levels: Sequence[float]) -> pd.DataFrame:
    """Boolean sets (N, C, L) as ``set_<level>`` (class codes, space-separated) and ``empty_set_<level>``."""
    out: dict[str, Any] = {}
    for k, level in enumerate(levels):
        members = sets[:, :, k]
        out[f"set_{level:.2f}"] = [" ".join(c for c, keep in zip(classes, row, strict=True) if keep) for row in members]
        out[f"empty_set_{level:.2f}"] = ~members.any(axis=1)
    return pd.DataFrame(out)


def empty_set_counts(sets: np.ndarray, levels: Sequence[float], flagged: np.ndarray | None = None) -> dict[str, Any]:
    """Per level: how many sets are empty (and what that means), among the flagged images and the others."""
    out: dict[str, Any] = {"meaning": EMPTY_SET_MEANING}
    for k, level in enumerate(levels):
        empty = np.logical_not(np.asarray(sets[:, :, k]).any(axis=1))
        entry = {"n_empty": int(empty.sum()), "empty": float(empty.mean()) if len(empty) else float("nan")}
        if flagged is not None:
            for name, rows in (("flagged", flagged), ("not_flagged", ~flagged)):
                entry[f"empty_{name}"] = float(empty[rows].mean()) if rows.any() else float("nan")
                entry[f"n_{name}"] = int(rows.sum())
        out[f"{level:.2f}"] = entry
    return out


def shift_alarm(
    run_dir: str | Path, embeddings: np.ndarray | None, level: float, show: bool = False
) -> tuple[dict[str, np.ndarray] | None, ShiftReference | None]:
    """The per-image alarm of ``embeddings`` against the run's reference (None where it cannot be computed)."""
    if embeddings is None or len(embeddings) == 0:
        return None, None
    reference = shift_reference(run_dir, show)
    if reference is None:
        return None, None
    return alarm(reference, embeddings, level), reference


def alarm_fires(summary: dict[str, Any]) -> bool:
    """Whether the dataset-level test rejects 'like the run's validation images' (p <= ``DATASET_ALARM``)."""
    return summary["dataset_test"]["p_value"] <= DATASET_ALARM


def warn_if_shifted(summary: dict[str, Any] | None, what: str) -> str | None:
    """The warning (also given as a note) that ``what`` assumes only the prevalence changed while the images moved."""
    if summary is None or not alarm_fires(summary):
        return None
    test = summary["dataset_test"]
    message = (
        f"{what} assumes that only the class prevalence changed, but the shift alarm fires: these images are not "
        f"like the run's (MMD p = {test['p_value']:.3g}; {summary['flag_rate']:.1%} flagged at level "
        f"{summary['level']:g}), so the estimate mistakes how the images look for prevalence"
    )
    note(message)
    return message


def annotate(
    frame: pd.DataFrame,
    run_dir: str | Path,
    calibrated: np.ndarray,
    embeddings: np.ndarray | None,
    options: NewDataOptions,
    show: bool = False,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """``frame`` (one row per image) with the set, shift and prior columns, and what they add up to."""
    folder = RunFolder(run_dir)
    classes = folder.read_schema().classes
    conformal, levels = fitted_sets(folder)
    sets = conformal.predict(calibrated)
    parts = [frame.reset_index(drop=True), set_columns(sets, classes, levels)]
    flags, reference = shift_alarm(run_dir, embeddings, options.shift_level, show) if options.shift else (None, None)
    record: dict[str, Any] = {}
    if flags is not None and reference is not None:
        if options.shift_level < 1 / (len(reference.val_scores) + 1):
            note(
                f"shift alarm: with {len(reference.val_scores)} validation images no p-value is at or below the "
                f"level {options.shift_level:g} (the smallest is {1 / (len(reference.val_scores) + 1):.3g}): "
                "no image can be flagged"
            )
        parts.append(pd.DataFrame(flags))
        assert embeddings is not None
        record["shift"] = shift_summary(flags, options.shift_level, reference, embeddings)
    record["empty_sets"] = empty_set_counts(sets, levels, None if flags is None else flags["out_of_distribution"])
    record["per_image"] = {f"empty_{levels[0]:.2f}": ~sets[:, :, 0].any(axis=1)}  # what a breakdown counts
    if flags is not None:
        record["per_image"]["flagged"] = flags["out_of_distribution"]
    priors = clinic_prior(folder, options.prior)
    if priors is not None:
        adjusted = reweight(calibrated, *priors)
        parts.append(pd.DataFrame(adjusted, columns=[f"prior_p_{c}" for c in classes]))
        parts.append(pd.DataFrame({"prior_decision": [classes[k] for k in adjusted.argmax(1)]}))
        record["prior"] = {"training": _named(classes, priors[0]), "given": _named(classes, priors[1])}
    return pd.concat(parts, axis=1), record


def estimated_prior(calibrated: np.ndarray, folder: RunFolder, shift: dict[str, Any] | None) -> dict[str, Any]:
    """The EM estimate of the images' prevalence (a diagnostic), with the warning when the alarm fires."""
    classes = folder.read_schema().classes
    train = run_prior(folder)
    prior, steps = estimate_prior(calibrated, train)
    return {
        "training": _named(classes, train),
        "estimated": _named(classes, prior),
        "iterations": steps,
        "warning": warn_if_shifted(shift, "--estimate-prior (EM re-weighting, Saerens et al. 2002)"),
    }


def _named(classes: Sequence[str], values: np.ndarray) -> dict[str, float]:
    return {c: float(v) for c, v in zip(classes, values, strict=True)}


def paired_difference_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    y: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    groups: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """``metric(y, second) - metric(y, first)`` with a 95% percentile CI resampling whole groups (patients)."""
    codes = pd.factorize(pd.Series(groups).astype(str))[0]
    members = [np.flatnonzero(codes == g) for g in range(codes.max() + 1)]
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n_boot):
        rows = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        value = metric(y[rows], second[rows]) - metric(y[rows], first[rows])
        if np.isfinite(value):
            diffs.append(value)
    low, high = np.quantile(diffs, [0.025, 0.975]) if diffs else (float("nan"), float("nan"))
    return {
        "first": float(metric(y, first)),
        "second": float(metric(y, second)),
        "difference": float(metric(y, second) - metric(y, first)),
        "ci_low": float(low),
        "ci_high": float(high),
        "n_groups": len(members),
    }
