"""Knowing when not to trust a prediction: conformal prediction sets, selective prediction, ensembles.

- :class:`ConformalSets`: split conformal prediction sets fitted on the validation split's calibrated
  probabilities, calibrated by crepes (Boström; conformal classifiers with Mondrian categories built
  in). Why crepes: class-conditional (Mondrian) coverage is the point for rare classes such as ``df``
  and ``vasc``; MAPIE 1.x offers APS/RAPS but no Mondrian classification and refuses a one-class
  calibration subset, and TorchCP needs torch_geometric and torchsort (a compiled extension).
- :func:`risk_coverage`: the error of the retained cases as the least confident are deferred; AURC.
- :func:`deferral` and :func:`key_triage`: what deferring a share of cases, or referring every case
  above a melanoma threshold fitted on val, does to melanoma sensitivity.
- :func:`ensemble_members`: the members' probabilities averaged (e.g. an ablation's seeds).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

#: What an empty prediction set means, wherever one is shown or counted.
EMPTY_SET_MEANING = "no class is plausible at this level: refer"


def nonconformity(probs: np.ndarray, score: str) -> np.ndarray:
    """Nonconformity of every class of every case (N, C): the lower, the more the class conforms.

    ``lac`` is crepes' hinge score, ``1 - p_c``. ``aps`` (Romano et al. 2020, non-randomised) is the
    probability mass of the classes ranked at or above ``c``: a set of low-APS classes adapts its size to
    the case's difficulty. ``raps`` (Angelopoulos et al. 2021) adds ``0.01`` per rank beyond the first,
    which keeps long tails of improbable classes out of the sets.
    """
    from crepes.extras import hinge

    p = np.asarray(probs, dtype=np.float64)
    if score == "lac":
        return np.asarray(hinge(p))
    order = np.argsort(-p, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(p.shape[1])[None, :].repeat(len(p), 0), axis=1)
    cumulative = np.take_along_axis(np.cumsum(np.take_along_axis(p, order, 1), axis=1), ranks, 1)
    if score == "aps":
        return cumulative
    if score == "raps":
        return cumulative + RAPS_LAMBDA * np.maximum(ranks + 1 - RAPS_K, 0)
    raise ValueError(f"unknown conformity score {score!r} (aps, raps, lac)")


#: RAPS's penalty per rank beyond ``RAPS_K`` (the values of Angelopoulos et al.'s ImageNet experiments).
RAPS_LAMBDA, RAPS_K = 0.01, 1


class ConformalSets(BaseEstimator):
    """Split-conformal prediction sets at one or more coverage levels, optionally class-conditional.

    The calibration is crepes' ``ConformalClassifier`` (p-values from the calibration scores, Mondrian
    categories built in); this class chooses the score and the categories. Class-conditional
    (Mondrian by class): a candidate class enters a case's set when its score conforms to the
    calibration cases *of that class*, so each class is covered at the level, rare ones such as ``df``
    and ``vasc`` included. Sets use unsmoothed p-values: deterministic, coverage at least the level.

    Args:
        score: ``aps`` (adaptive sets), ``raps`` (regularised APS) or ``lac`` (least ambiguous sets).
        levels: target coverages, e.g. ``(0.90, 0.95)``.
        class_conditional: Mondrian by true class (each class covered), else marginal coverage.

    Attributes:
        n_classes_: classes of the probabilities seen in ``fit``.
        n_calibration_: calibration cases per class.
        always_in_: per level, the classes that every set holds (too few calibration cases of the
            class for a finite threshold at that level: ``(n + 1) * (1 - level) < 1``).
    """

    def __init__(self, score: str = "aps", levels: Sequence[float] = (0.90, 0.95), class_conditional: bool = True):
        self.score, self.levels, self.class_conditional = score, levels, class_conditional

    def fit(self, probs: np.ndarray, y: np.ndarray) -> ConformalSets:
        """Calibrate on calibration probabilities (N, C) and their true classes (N,)."""
        from crepes import ConformalClassifier

        probs, y = _checked(probs, y)
        self.n_classes_ = probs.shape[1]
        counts = np.bincount(y, minlength=self.n_classes_)
        self.n_calibration_ = counts.tolist()
        alphas = nonconformity(probs, self.score)[np.arange(len(y)), y]
        bins = y if self.class_conditional else None
        self.calibrator_ = ConformalClassifier().fit(alphas, bins=bins)
        sizes = counts if self.class_conditional else np.full(self.n_classes_, len(y))
        self.always_in_ = {
            float(lv): [c for c in range(self.n_classes_) if (sizes[c] + 1) * (1 - lv) < 1] for lv in self.levels
        }
        return self

    def predict(self, probs: np.ndarray) -> np.ndarray:
        """Boolean sets (N, C, L): entry [i, c, l] says class c is in case i's set at ``levels[l]``."""
        check_is_fitted(self, "calibrator_")
        alphas = nonconformity(probs, self.score)
        n = len(alphas)
        sets = np.zeros((n, self.n_classes_, len(self.levels)), dtype=bool)
        for k, level in enumerate(self.levels):
            if not self.class_conditional:
                sets[:, :, k] = self.calibrator_.predict_set(alphas, confidence=level, smoothing=False) == 1
                continue
            for c in range(self.n_classes_):
                if self.n_calibration_[c] == 0 or c in self.always_in_[float(level)]:
                    sets[:, c, k] = True
                    continue
                column = self.calibrator_.predict_set(
                    alphas[:, [c]], bins=np.full(n, c), confidence=level, smoothing=False
                )
                sets[:, c, k] = column[:, 0] == 1
        return sets


def set_metrics(sets: np.ndarray, y: np.ndarray, classes: Sequence[str], levels: Sequence[float]) -> dict[str, Any]:
    """Empirical coverage (overall and per true class, with its n), mean set size and empty sets per level
    (``empty``: their share, ``n_empty``: their count; an empty set means no class is plausible: refer)."""
    y = np.asarray(y)
    out: dict[str, Any] = {}
    for k, level in enumerate(levels):
        s = sets[:, :, k]
        covered = s[np.arange(len(y)), y]
        per_class = {
            c: {"coverage": float(covered[y == i].mean()) if (y == i).any() else float("nan"), "n": int((y == i).sum())}
            for i, c in enumerate(classes)
        }
        out[f"{level:.2f}"] = {
            "coverage": float(covered.mean()),
            "mean_size": float(s.sum(1).mean()),
            "empty": float((s.sum(1) == 0).mean()),
            "n_empty": int((s.sum(1) == 0).sum()),
            "worst_class_coverage": min(v["coverage"] for v in per_class.values() if v["n"]),
            "per_class": per_class,
            "n_images": len(y),
        }
    return out


def risk_coverage(y: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Error of the retained cases as the least confident (top-1 probability) are deferred, and AURC.

    ``risk[k]`` is the error rate of the ``k+1`` most confident cases, at coverage ``(k+1)/N``.
    AURC is the mean risk over all coverages (Geifman & El-Yaniv 2017); ``aurc_oracle`` is what a
    confidence that ranks every error last would reach at the same accuracy, ``e_aurc`` the excess.
    """
    y, p = np.asarray(y), np.asarray(probs)
    order = np.argsort(-p.max(axis=1), kind="stable")
    errors = (p.argmax(axis=1) != y)[order]
    k = np.arange(1, len(y) + 1)
    risk = np.cumsum(errors) / k
    oracle = np.cumsum(np.sort(errors)) / k
    return {
        "coverage": (k / len(y)).tolist(),
        "risk": risk.tolist(),
        "aurc": float(risk.mean()),
        "aurc_oracle": float(oracle.mean()),
        "e_aurc": float(risk.mean() - oracle.mean()),
        "n_images": len(y),
    }


def deferral(y: np.ndarray, probs: np.ndarray, key: int, shares: Sequence[float]) -> dict[str, Any]:
    """Deferring the ``share`` least confident cases to a clinician: accuracy and key-class sensitivity kept.

    ``key_sensitivity`` is the model's sensitivity on the key-class cases it keeps; ``key_deferred`` the
    share of key-class cases sent to the clinician (who sees them: the system misses only the kept ones
    the model gets wrong, ``system_key_sensitivity`` if the clinician catches every deferred one).
    """
    y, p = np.asarray(y), np.asarray(probs)
    order = np.argsort(-p.max(axis=1), kind="stable")
    pred = p.argmax(axis=1)
    out = {}
    for share in shares:
        kept = np.zeros(len(y), dtype=bool)
        kept[order[: round(len(y) * (1 - share))]] = True
        is_key = y == key
        found = is_key & kept & (pred == key)
        out[f"{share:.2f}"] = {
            "accuracy_kept": float((pred == y)[kept].mean()) if kept.any() else float("nan"),
            "key_sensitivity": float(found.sum() / (is_key & kept).sum()) if (is_key & kept).any() else float("nan"),
            "key_deferred": float((is_key & ~kept).sum() / is_key.sum()) if is_key.any() else float("nan"),
            "system_key_sensitivity": float((found | (is_key & ~kept)).sum() / is_key.sum())
            if is_key.any()
            else float("nan"),
            "n_key": int(is_key.sum()),
        }
    return out


def key_triage(
    val: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray], key: int, sensitivity: float
) -> dict[str, Any]:
    """Refer every case whose key-class probability reaches a threshold chosen on val for ``sensitivity``.

    The threshold is the highest one that refers at least ``sensitivity`` of the validation key-class
    cases; on test it reports the sensitivity reached, the share of all cases referred (the clinician's
    load) and the specificity. The rest are left to the model.
    """
    (y_val, p_val), (y_test, p_test) = val, test
    scores = np.sort(np.asarray(p_val)[np.asarray(y_val) == key, key])[::-1]
    if len(scores) == 0:
        return {"threshold": float("nan"), "n_key_val": 0}
    threshold = float(scores[max(int(np.ceil(sensitivity * len(scores))) - 1, 0)])
    referred = np.asarray(p_test)[:, key] >= threshold
    is_key = np.asarray(y_test) == key
    return {
        "target_sensitivity": sensitivity,
        "threshold": threshold,
        "sensitivity": float(referred[is_key].mean()) if is_key.any() else float("nan"),
        "specificity": float((~referred[~is_key]).mean()) if (~is_key).any() else float("nan"),
        "referred": float(referred.mean()),
        "n_key_val": len(scores),
        "n_key_test": int(is_key.sum()),
    }


def ensemble_members(member_probs: Sequence[np.ndarray]) -> np.ndarray:
    """The ensemble's probabilities: the members' mean (every member scores the same cases, same order)."""
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in member_probs])
    return stacked.mean(axis=0)


def uncertainty_summary(
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    classes: Sequence[str],
    key: str,
    *,
    score: str = "aps",
    levels: Sequence[float] = (0.90, 0.95),
    class_conditional: bool = True,
    defer: Sequence[float] = (0.10, 0.20),
    key_sensitivity: float = 0.95,
) -> dict[str, Any]:
    """Conformal sets (fitted on val), risk-coverage, deferral and key-class triage of one scored split."""
    (y_val, p_val), (y, p) = val, test
    conformal = ConformalSets(score, levels, class_conditional).fit(p_val, y_val)
    k = list(classes).index(key)
    curve = risk_coverage(y, p)
    return {
        "conformal": {
            "score": score,
            "class_conditional": class_conditional,
            "fitted_on": "val",
            "empty_set_meaning": EMPTY_SET_MEANING,
            "always_in": {f"{lv:.2f}": [classes[c] for c in cs] for lv, cs in conformal.always_in_.items()},
            **set_metrics(conformal.predict(p), y, classes, levels),
        },
        "risk_coverage": {key_: curve[key_] for key_ in ("aurc", "aurc_oracle", "e_aurc", "n_images")},
        "deferral": deferral(y, p, k, defer),
        "key_triage": key_triage((y_val, p_val), (y, p), k, key_sensitivity),
    }


def _checked(probs: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if p.ndim != 2 or len(p) != len(y) or len(p) == 0:
        raise ValueError(f"probs must be (N, C) with one target per row, got {p.shape} and {y.shape}")
    return p, y
