"""Classification and calibration metrics for lesion diagnosis (any class list), built on scikit-learn.

Every macro average (balanced accuracy, macro F1, macro AUROC) runs over the classes present in
``y_true``: a class with no true case has no defined sensitivity or AUROC, so it is reported as NaN
in ``per_class`` and left out of the macro average rather than counted as 0 or 1. The returned
dictionary holds plain Python floats and ints only, so it can go straight to ``write_json``
(NaN is written as ``NaN``, which Python's ``json`` reads back).

The key class (the schema's ``key_class``, melanoma by default) gets its own headline numbers:
``key_auroc`` and ``key_sensitivity_at_specificity_0.80``; the ``melanoma_*`` names of runs made
before schemas stay (the ``mel`` class's, NaN without one). A binary task (two classes, one of them
the key class: the model has two logits, so temperature scaling, the balanced decision and the
conformal sets work unchanged) adds ``binary``: the key class's AUROC, and the sensitivity and
specificity of the arg-max decision, whose mean is the balanced accuracy.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    multilabel_confusion_matrix,
    roc_auc_score,
    roc_curve,
)

from multimodal_lesion.data.constants import CLASSES
from multimodal_lesion.training.stats import grouped_balanced_accuracy_ci

#: The class whose detection matters most clinically; gets its own headline metrics.
MELANOMA = "mel"
#: Specificity at which melanoma sensitivity is reported (a common screening operating point).
MELANOMA_SPECIFICITY = 0.80
#: Tolerance on probability rows summing to one (float32 softmax outputs drift a little).
_SUM_TOLERANCE = 1e-3


class ReliabilityCurve(NamedTuple):
    """Per-bin statistics of top-1 confidence; empty bins hold NaN accuracy and confidence."""

    centers: np.ndarray
    accuracies: np.ndarray
    confidences: np.ndarray
    counts: np.ndarray


def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    classes: Sequence[str] = CLASSES,
    key_class: str = MELANOMA,
    lesion_ids: Sequence[str] | None = None,
    n_boot: int = 0,
    ci_groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """All evaluation metrics of one prediction set, as a JSON-ready dict.

    Args:
        y_true: integer targets, shape (N,), indices into ``classes``.
        probs: class probabilities, shape (N, C), rows summing to one.
        classes: class codes in logit order.
        key_class: the class of the clinical headline metrics (must be in ``classes``).
        lesion_ids: lesion id per image; ``n_lesions`` counts the unique ones (N when None).
        n_boot: bootstrap draws of whole groups (``ci_groups``, else ``lesion_ids``) behind
            ``balanced_accuracy_ci``, its 95% interval; 0 or no groups = none.
        ci_groups: the bootstrap's unit per image when it is not the lesion (patients).
    """
    y, p = _validate(y_true, probs, len(classes))
    if key_class not in classes:
        raise ValueError(f"key class {key_class!r} is not one of the classes {', '.join(classes)}")
    pred = p.argmax(axis=1)
    present = np.unique(y)
    per_class = _per_class(y, p, pred, classes)
    aurocs = [per_class[c]["auroc"] for c in classes]
    mel = per_class.get(MELANOMA, {})
    key = list(classes).index(key_class)
    out = {
        "accuracy": float(np.mean(pred == y)),
        "balanced_accuracy": _balanced_accuracy(y, pred),
        "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
        "macro_auroc": _nanmean(aurocs),
        "per_class": per_class,
        "key_auroc": per_class[key_class]["auroc"],
        f"key_sensitivity_at_specificity_{MELANOMA_SPECIFICITY:.2f}": _sensitivity_at(y, p, key),
        "melanoma_auroc": float(mel.get("auroc", np.nan)),
        f"melanoma_sensitivity_at_specificity_{MELANOMA_SPECIFICITY:.2f}": _melanoma_sensitivity(y, p, classes),
        "ece": expected_calibration_error(y, p),
        "nll": float(log_loss(y, p, labels=np.arange(len(classes)))),
        "brier": brier_score(y, p),
        "confusion_matrix": confusion_matrix(y, pred, labels=np.arange(len(classes))).tolist(),
        "n_images": len(y),
        "n_lesions": len(set(lesion_ids)) if lesion_ids is not None else len(y),
    }
    groups = ci_groups if ci_groups is not None else lesion_ids
    if n_boot and groups is not None:
        out["balanced_accuracy_ci"] = grouped_balanced_accuracy_ci(y, pred, np.asarray(groups), n_boot)
    if len(classes) == 2:
        out["binary"] = binary_metrics(y == key, p[:, key], pred == key)
    return out


def binary_metrics(is_key: np.ndarray, scores: np.ndarray, decided: np.ndarray) -> dict[str, float]:
    """Key class vs rest: AUROC of ``scores``, and sensitivity / specificity / balanced accuracy of ``decided``.

    Args:
        is_key: whether each case is of the key class (N,).
        scores: the key class's probability (N,).
        decided: whether the decision says key class (N,): the arg-max of two probabilities.
    """
    is_key, decided = np.asarray(is_key, bool), np.asarray(decided, bool)
    sensitivity = _ratio(int((decided & is_key).sum()), int(is_key.sum()))
    specificity = _ratio(int((~decided & ~is_key).sum()), int((~is_key).sum()))
    return {
        "auroc": _binary_auroc(is_key, np.asarray(scores, np.float64)),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": _nanmean([sensitivity, specificity]),
        f"sensitivity_at_specificity_{MELANOMA_SPECIFICITY:.2f}": sensitivity_at_specificity(
            is_key, scores, MELANOMA_SPECIFICITY
        ),
        "n_key": int(is_key.sum()),
        "n_rest": int((~is_key).sum()),
    }


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """ECE of top-1 confidence: bin-size-weighted mean |accuracy - confidence| over equal-width bins."""
    curve = reliability_curve(y_true, probs, bins=bins)
    filled = curve.counts > 0
    gaps = np.abs(curve.accuracies[filled] - curve.confidences[filled])
    return float(np.sum(gaps * curve.counts[filled]) / curve.counts.sum())


def reliability_curve(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> ReliabilityCurve:
    """Accuracy and mean confidence per equal-width bin (lo, hi] of the top-1 probability."""
    y, p = _validate(y_true, probs, np.asarray(probs).shape[-1])
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.searchsorted(edges[1:-1], confidence, side="left")
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracies = np.bincount(index, weights=correct, minlength=bins) / counts
        confidences = np.bincount(index, weights=confidence, minlength=bins) / counts
    return ReliabilityCurve((edges[:-1] + edges[1:]) / 2, accuracies, confidences, counts)


def brier_score(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of the summed squared error to the one-hot target."""
    y, p = _validate(y_true, probs, np.asarray(probs).shape[-1])
    onehot = np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def sensitivity_at_specificity(is_positive: np.ndarray, scores: np.ndarray, specificity: float) -> float:
    """Highest sensitivity on the ROC curve among thresholds whose specificity is >= ``specificity``.

    Every threshold is kept (``drop_intermediate=False``): dropping collinear points could hide the
    best operating point under the constraint. NaN when either class is absent.
    """
    is_positive = np.asarray(is_positive, dtype=bool)
    if is_positive.all() or not is_positive.any():
        return float("nan")
    fpr, tpr, _ = roc_curve(is_positive, scores, drop_intermediate=False)
    allowed = (1.0 - fpr) >= specificity - 1e-12
    return float(tpr[allowed].max())


def _per_class(y: np.ndarray, p: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> dict[str, dict]:
    """Sensitivity, specificity, one-vs-rest AUROC and support for every class (NaN when undefined)."""
    counts = multilabel_confusion_matrix(y, pred, labels=np.arange(len(classes)))
    out = {}
    for k, (name, ((tn, fp), (fn, tp))) in enumerate(zip(classes, counts, strict=True)):
        out[name] = {
            "sensitivity": _ratio(tp, tp + fn),
            "specificity": _ratio(tn, tn + fp),
            "auroc": _binary_auroc(y == k, p[:, k]),
            "support": int(tp + fn),
        }
    return out


def _binary_auroc(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """One-vs-rest AUROC, NaN when the class is absent (or is the only class)."""
    if is_positive.all() or not is_positive.any():
        return float("nan")
    return float(roc_auc_score(is_positive, scores))


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y`` (sklearn warns when ``pred`` has other classes)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y, pred))


def _melanoma_sensitivity(y: np.ndarray, p: np.ndarray, classes: Sequence[str]) -> float:
    """Melanoma-vs-rest sensitivity at the reference specificity; NaN without a melanoma class."""
    if MELANOMA not in classes:
        return float("nan")
    return _sensitivity_at(y, p, list(classes).index(MELANOMA))


def _sensitivity_at(y: np.ndarray, p: np.ndarray, k: int) -> float:
    """Class ``k``-vs-rest sensitivity at the reference specificity."""
    return sensitivity_at_specificity(y == k, p[:, k], MELANOMA_SPECIFICITY)


def _ratio(num: int, den: int) -> float:
    """``num / den`` as a float, NaN when ``den`` is zero."""
    return float(num / den) if den else float("nan")


def _nanmean(values: Sequence[float]) -> float:
    """Mean of the finite values, NaN when there are none (without numpy's empty-slice warning)."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _validate(y_true: np.ndarray, probs: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Check shapes, label range and that rows are probabilities; return int64 targets, float64 probs."""
    y = np.asarray(y_true).reshape(-1)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape != (len(y), n_classes):
        raise ValueError(f"probs must have shape ({len(y)}, {n_classes}), got {p.shape}")
    if len(y) == 0:
        raise ValueError("no predictions to score (empty y_true)")
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= n_classes:
        raise ValueError(
            f"y_true must hold integer class indices in [0, {n_classes}), got {y.dtype} "
            f"values in [{y.min()}, {y.max()}]"
        )
    sums = p.sum(axis=1)
    if not np.all(np.isfinite(p)) or p.min() < 0 or np.max(np.abs(sums - 1.0)) > _SUM_TOLERANCE:
        raise ValueError("probs must be finite, non-negative and sum to 1 per row (pass softmax outputs, not logits)")
    return y.astype(np.int64), p / sums[:, None]


def key_vs_rest(y_true: np.ndarray, probs: np.ndarray, key: int) -> tuple[np.ndarray, np.ndarray]:
    """A multi-class prediction scored as key class vs rest: targets 1 = key, probabilities (N, 2) = (rest, key).

    The rest's probability is the sum of the other classes', so the rows still sum to one.
    """
    p = np.asarray(probs, dtype=np.float64)
    return (np.asarray(y_true) == key).astype(np.int64), np.stack([1.0 - p[:, key], p[:, key]], axis=1)
