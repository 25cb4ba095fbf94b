"""Ablation statistics (bootstrap CIs, paired tests, corrected t-test) and the ablation figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats

from multimodal_lesion.data.constants import CLASSES
from multimodal_lesion.models import list_models
from multimodal_lesion.report.figures import plot_bars_with_ci, plot_per_class_sensitivity
from multimodal_lesion.training.stats import (
    bootstrap_ci,
    corrected_ttest,
    group_draws,
    grouped_auroc_ci,
    grouped_balanced_accuracy_ci,
    paired_comparison,
    summarise,
)


def test_bootstrap_ci_contains_mean_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n in (10, 100, 1000):
        x = rng.normal(0.6, 0.1, size=n)
        low, high = bootstrap_ci(x)
        assert low < x.mean() < high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]


def test_bootstrap_ci_agrees_with_the_normal_interval_for_large_n() -> None:
    x = np.random.default_rng(1).normal(0.5, 0.2, size=2000)
    half = stats.norm.ppf(0.975) * x.std(ddof=1) / np.sqrt(len(x))
    low, high = bootstrap_ci(x, n_boot=4000)
    assert low == pytest.approx(x.mean() - half, abs=0.15 * half)
    assert high == pytest.approx(x.mean() + half, abs=0.15 * half)


def test_bootstrap_is_reproducible_and_handles_degenerate_input() -> None:
    x = [0.61, 0.64, 0.58, 0.66, 0.60]
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    assert bootstrap_ci([0.7]) == (0.7, 0.7)
    assert all(np.isnan(bootstrap_ci([])))
    with pytest.raises(ValueError):
        bootstrap_ci(x, ci=1.5)


def test_summarise() -> None:
    x = [0.5, 0.7, 0.6, np.nan, 0.8]
    s = summarise(x)
    finite = np.array([0.5, 0.7, 0.6, 0.8])
    assert s["n"] == 4
    assert s["mean"] == pytest.approx(finite.mean())
    assert s["std"] == pytest.approx(np.std(finite, ddof=1))
    assert s["ci_low"] <= s["mean"] <= s["ci_high"]
    assert np.isnan(summarise([0.4])["std"])


def test_paired_comparison_detects_a_real_shift() -> None:
    rng = np.random.default_rng(2)
    b = rng.normal(0.55, 0.03, size=15)  # e.g. 5 folds x 3 seeds, fold difficulty varies
    a = b + 0.04 + rng.normal(0, 0.01, size=15)
    r = paired_comparison(a, b)
    assert r["test"] == "wilcoxon" and r["n"] == 15
    assert r["p_value"] < 0.05
    assert r["ci_low"] < r["mean_diff"] < r["ci_high"] and r["ci_low"] > 0
    assert r["mean_diff"] == pytest.approx(np.mean(a - b))
    assert r["p_value"] == pytest.approx(stats.wilcoxon(a, b).pvalue)


def test_paired_comparison_no_difference() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(0.6, 0.05, size=15)
    same = paired_comparison(a, a.copy())
    assert same["p_value"] == 1.0 and same["mean_diff"] == 0.0
    noise = paired_comparison(a, a + rng.normal(0, 0.02, size=15))
    assert noise["p_value"] > 0.05


def test_paired_comparison_uses_t_test_for_few_pairs() -> None:
    a = np.array([0.62, 0.60, 0.65, 0.58])
    b = np.array([0.55, 0.57, 0.59, 0.54])
    r = paired_comparison(a, b)
    assert r["test"] == "paired_t"
    assert r["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    with pytest.raises(ValueError, match="paired"):
        paired_comparison(a, b[:3])


def test_corrected_ttest_reduces_to_the_plain_t_test_and_is_more_conservative() -> None:
    rng = np.random.default_rng(4)
    d = 0.02 + rng.normal(0, 0.02, size=15)
    plain = stats.ttest_1samp(d, 0.0)
    uncorrected = corrected_ttest(d, n_train=10**12, n_test=1)  # n_test / n_train -> 0
    assert uncorrected["p_value"] == pytest.approx(plain.pvalue, rel=1e-6)
    assert uncorrected["t"] == pytest.approx(plain.statistic, rel=1e-6)
    corrected = corrected_ttest(d, n_train=4, n_test=1)  # 5-fold CV
    assert corrected["p_value"] > plain.pvalue
    assert corrected["ci_low"] < corrected["mean_diff"] < corrected["ci_high"]
    # The variance factor (1/J + 1/4) against 1/J, by hand.
    assert corrected["t"] == pytest.approx(plain.statistic * np.sqrt((1 / 15) / (1 / 15 + 1 / 4)))


def _png_ok(path: Path) -> bool:
    """Valid, decodable, non-blank PNG."""
    with Image.open(path) as im:
        fmt = im.format
        im.verify()
    with Image.open(path) as im:
        return fmt == "PNG" and np.asarray(im.convert("L")).std() > 0


def _grouped_predictions(n_groups: int = 150, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, decisions and lesion ids: 1-4 images a lesion, each lesion one class and one decision."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 5, n_groups)
    label = rng.choice(5, n_groups, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    right = rng.random(n_groups) < 0.7
    decided = np.where(right, label, (label + 1 + rng.integers(0, 4, n_groups)) % 5)
    groups = np.repeat([f"L{k}" for k in range(n_groups)], sizes)
    return np.repeat(label, sizes), np.repeat(decided, sizes), groups


def test_group_draws_weigh_rows_as_repeating_the_drawn_lesions() -> None:
    y, pred, groups = _grouped_predictions()
    n_groups, draws = group_draws(groups, n_boot=20, seed=3)
    assert n_groups == len(set(groups))
    from sklearn.metrics import balanced_accuracy_score

    expected = []
    for w in draws:
        rows = np.repeat(np.arange(len(y)), w)  # the drawn lesions' images, each as often as its lesion was drawn
        assert (pd.Series(w).groupby(groups).nunique() == 1).all()  # a lesion is drawn with all its images
        expected.append(balanced_accuracy_score(y[rows], pred[rows]))
    ci = grouped_balanced_accuracy_ci(y, pred, groups, n_boot=20, seed=3, ci=0.5)
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx(tuple(np.quantile(expected, [0.25, 0.75])), abs=1e-12)


def test_balanced_accuracy_interval_resamples_lesions_not_images() -> None:
    y, pred, groups = _grouped_predictions()
    point = np.mean([np.mean(pred[y == k] == k) for k in np.unique(y)])
    by_lesion = grouped_balanced_accuracy_ci(y, pred, groups)
    assert by_lesion["ci_low"] < point < by_lesion["ci_high"] and by_lesion["n_groups"] == 150
    # treating images as independent (each its own group) pretends to more evidence: a narrower interval
    by_image = grouped_balanced_accuracy_ci(y, pred, np.arange(len(y)).astype(str))
    assert by_image["ci_high"] - by_image["ci_low"] < by_lesion["ci_high"] - by_lesion["ci_low"]
    perfect = grouped_balanced_accuracy_ci(y, y, groups)
    assert perfect["ci_low"] == perfect["ci_high"] == 1.0


def test_grouped_auroc_ci_weights_equal_repeated_rows() -> None:
    y, _, groups = _grouped_predictions()
    scores = np.round(np.random.default_rng(1).random(len(y)) + 0.4 * (y == 0), 1)  # ties included
    from sklearn.metrics import roc_auc_score

    _, draws = group_draws(groups, n_boot=50, seed=0)
    repeated = [roc_auc_score(y[r] == 0, scores[r]) for r in (np.repeat(np.arange(len(y)), w) for w in draws)]
    ci = grouped_auroc_ci(y == 0, scores, groups, n_boot=50, seed=0)
    assert ci["n_boot_used"] == 50 and ci["n_groups"] == 150
    assert (ci["ci_low"], ci["ci_high"]) == pytest.approx(tuple(np.quantile(repeated, [0.025, 0.975])), abs=1e-12)


def test_ablation_figures_are_written(tmp_path: Path) -> None:
    models = list_models()
    rng = np.random.default_rng(5)
    rows = []
    for model in models:
        values = rng.normal(0.5, 0.05, size=15)
        rows.append({"model": model, "metric": "balanced_accuracy", **summarise(values)})
        rows.append({"model": model, "metric": "macro_auroc", **summarise(values + 0.3)})
    summary = pd.DataFrame(rows)
    per_class = pd.DataFrame(
        [{"model": m, "class": c, **summarise(rng.uniform(0.2, 0.9, 15))} for m in models for c in CLASSES]
    )
    paths = [
        plot_bars_with_ci(summary, "balanced_accuracy", tmp_path / "ba.png"),
        plot_bars_with_ci(
            summary[summary.metric == "macro_auroc"].drop(columns="metric"), "macro_auroc", tmp_path / "auroc.png"
        ),
        plot_per_class_sensitivity(per_class, tmp_path / "per_class.png"),
        plot_per_class_sensitivity(per_class[["model", "class", "mean"]], tmp_path / "per_class_noci.png"),
    ]
    assert all(p.exists() and _png_ok(p) for p in paths)
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(p.name for p in paths)
    with pytest.raises(ValueError, match="ci_low"):
        plot_bars_with_ci(summary.drop(columns="ci_low"), "balanced_accuracy", tmp_path / "x.png")
