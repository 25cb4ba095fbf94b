"""Summary statistics and paired model comparisons for ablations over folds x seeds.

Caveat: the per-(fold, seed) scores are not independent. Cross-validation folds share most of their
training data and seeds share all of it, so the spread across cells understates the variance of the
score on new data. The bootstrap intervals and the paired Wilcoxon / t-test p-values below are
therefore optimistic (too narrow, too small); Nadeau & Bengio (2003) show this and propose the
corrected resampled t-test, provided as :func:`corrected_ttest` for a more conservative answer.
Non-finite values (e.g. an AUROC undefined in a fold) are dropped before any statistic; ``n``
reports how many values were used.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

#: Fewest paired differences for the Wilcoxon test: with n <= 5 its smallest two-sided p is >= 0.0625.
MIN_WILCOXON_N = 6


def bootstrap_ci(values: ArrayLike, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean; (v, v) for one value, NaNs for none."""
    x = _finite(values)
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}")
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def summarise(values: ArrayLike, n_boot: int = 2000, ci: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Mean, sample standard deviation (ddof=1; NaN for n < 2), bootstrap CI of the mean and n."""
    x = _finite(values)
    low, high = bootstrap_ci(x, n_boot=n_boot, ci=ci, seed=seed)
    return {
        "mean": float(x.mean()) if len(x) else float("nan"),
        "std": float(x.std(ddof=1)) if len(x) > 1 else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "n": len(x),
    }


def paired_comparison(a: ArrayLike, b: ArrayLike, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Compare two models scored on the same (fold, seed) cells through the differences ``a - b``.

    Returns mean_diff, its bootstrap 95% CI, a two-sided p-value, n and ``test``: "wilcoxon"
    (signed-rank) when n >= 6 and some difference is non-zero, else "paired_t". When every
    difference is zero the t statistic is 0/0 and the p-value is reported as 1.0 (no evidence); a
    constant non-zero difference with n < 6 gets 0.0.
    Pairs where either value is non-finite are dropped.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-D and paired (same length), got shapes {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    diffs = a[keep] - b[keep]
    low, high = bootstrap_ci(diffs, n_boot=n_boot, seed=seed)
    test, p_value = _paired_test(diffs)
    return {
        "mean_diff": float(diffs.mean()) if len(diffs) else float("nan"),
        "ci_low": low,
        "ci_high": high,
        "p_value": p_value,
        "n": len(diffs),
        "test": test,
    }


def corrected_ttest(diffs: ArrayLike, n_train: int, n_test: int, ci: float = 0.95) -> dict[str, Any]:
    """Corrected resampled t-test (Nadeau & Bengio 2003) on per-split score differences.

    The variance of the mean difference is inflated from var/J to (1/J + n_test/n_train) * var to
    account for overlapping training sets (J = number of splits, e.g. folds x seeds; for K-fold CV
    n_test / n_train = 1 / (K - 1)). Returns mean_diff, t, df, a two-sided p_value, the matching
    CI (ci_low, ci_high) and n.
    """
    d = _finite(diffs)
    if len(d) < 2 or n_train <= 0 or n_test <= 0:
        raise ValueError(
            f"need >= 2 differences and positive n_train/n_test, got n={len(d)}, n_train={n_train}, n_test={n_test}"
        )
    mean, df = float(d.mean()), len(d) - 1
    se = float(np.sqrt((1.0 / len(d) + n_test / n_train) * d.var(ddof=1)))
    t = mean / se if se > 0 else (0.0 if mean == 0 else float(np.copysign(np.inf, mean)))
    half = float(stats.t.ppf(0.5 + ci / 2.0, df)) * se
    return {
        "mean_diff": mean,
        "t": float(t),
        "df": int(df),
        "p_value": float(2.0 * stats.t.sf(abs(t), df)),
        "ci_low": mean - half,
        "ci_high": mean + half,
        "n": len(d),
    }


def _paired_test(diffs: np.ndarray) -> tuple[str, float]:
    """(test name, two-sided p-value) for paired differences, following :func:`paired_comparison`."""
    if len(diffs) >= MIN_WILCOXON_N and np.any(diffs != 0):
        return "wilcoxon", float(stats.wilcoxon(diffs).pvalue)
    if len(diffs) < 2:
        return "paired_t", float("nan")
    if np.ptp(diffs) == 0:  # zero variance: t is 0/0 (no evidence) or +-inf (a constant shift)
        return "paired_t", 1.0 if diffs[0] == 0 else 0.0
    return "paired_t", float(stats.ttest_1samp(diffs, 0.0).pvalue)


def _finite(values: ArrayLike) -> np.ndarray:
    """The finite values as a 1-D float array."""
    x = np.asarray(values, dtype=float).reshape(-1)
    return x[np.isfinite(x)]


def group_draws(groups: ArrayLike, n_boot: int, seed: int = 0) -> tuple[int, Iterator[np.ndarray]]:
    """The number of groups and ``n_boot`` bootstrap draws of whole groups, each as per-row multiplicities.

    Each draw picks as many groups as there are, with replacement, and gives every row the number of
    times its group was picked (0 for groups left out): a weight that equals repeating the group's rows.
    """
    codes, uniques = pd_factorize(np.asarray(groups))
    rng = np.random.default_rng(seed)

    def draws() -> Iterator[np.ndarray]:
        for _ in range(n_boot):
            yield np.bincount(rng.integers(0, len(uniques), len(uniques)), minlength=len(uniques))[codes]

    return len(uniques), draws()


def _quantiles(values: Sequence[float], ci: float) -> tuple[float, float]:
    alpha = (1.0 - ci) / 2.0
    if not values:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return float(low), float(high)


def grouped_auroc_ci(
    is_positive: ArrayLike, scores: ArrayLike, groups: ArrayLike, n_boot: int = 2000, ci: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """AUROC with a percentile bootstrap CI that resamples whole groups (patients or lesions).

    Images of one patient are not independent, so the groups are drawn with replacement, each with all
    its images; a draw without both classes is skipped (``n_boot_used`` says how many counted). With
    few positives the interval is wide: that width is the honest answer, not a defect.
    """
    from sklearn.metrics import roc_auc_score

    y, s, g = np.asarray(is_positive, bool), np.asarray(scores, float), np.asarray(groups)
    if y.all() or not y.any():
        return {"auroc": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n_boot_used": 0}
    n_groups, draws = group_draws(g, n_boot, seed)
    values = []
    for w in draws:
        if (w * y).any() and (w * ~y).any():
            values.append(roc_auc_score(y, s, sample_weight=w))
    low, high = _quantiles(values, ci)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "ci_low": low,
        "ci_high": high,
        "ci": ci,
        "n_boot_used": len(values),
        "n_groups": n_groups,
        "n_positive": int(y.sum()),
        "n_positive_groups": len(set(g[y].tolist())),
    }


def grouped_balanced_accuracy_ci(
    y_true: ArrayLike, y_pred: ArrayLike, groups: ArrayLike, n_boot: int = 2000, ci: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Percentile bootstrap CI of balanced accuracy (mean recall over the classes present), resampling groups.

    A single run's balanced accuracy moves with which lesions the test split holds, most through its rare
    classes (one more of 17 dermatofibroma images right moves a 7-class figure by 0.008): this interval is
    that spread. Two runs on one split are compared by their paired difference over the same draws
    (``experiments/lesion_bootstrap.py``), a narrower interval than either run's.
    """
    y, hit = np.asarray(y_true, int), np.asarray(y_pred) == np.asarray(y_true)
    n_groups, draws = group_draws(groups, n_boot, seed)
    values = []
    for w in draws:
        drawn = np.bincount(y, weights=w)
        present = drawn > 0
        values.append(float(np.mean(np.bincount(y, weights=w * hit)[present] / drawn[present])))
    low, high = _quantiles(values, ci)
    return {"ci_low": low, "ci_high": high, "ci": ci, "n_boot": n_boot, "n_groups": n_groups}


def pd_factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes and the unique values of ``values`` (first-seen order)."""
    uniques, first, codes = np.unique(values.astype(str), return_index=True, return_inverse=True)
    order = np.argsort(first)
    remap = np.empty_like(order)
    remap[order] = np.arange(len(order))
    return remap[codes], uniques[order]
