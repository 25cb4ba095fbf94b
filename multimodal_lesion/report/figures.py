"""Evaluation and ablation figures: confusion matrix, ROC curves, reliability diagram, CI bars.

Each function draws on its own ``matplotlib.figure.Figure`` attached to an Agg canvas, so nothing
goes through pyplot: no global backend switch (a notebook's inline backend keeps working), no
figure left registered with pyplot, and it runs headless. matplotlib and pandas are imported
inside the functions to keep ``import multimodal_lesion`` fast. Every file is written to a temp
name beside its target and renamed (``atomic_write``); the format follows the suffix (png, pdf,
svg). Each function returns the written path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.constants import CLASS_NAMES
from ..io import atomic_write
from ..training.metrics import expected_calibration_error, reliability_curve
from ..training.uncertainty import risk_coverage

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from ..training.runner import Evaluation

_DPI = 150
#: zlib level of every PNG a report writes: about 4x faster to encode than the default 6, files ~20% larger.
PNG_LEVEL = 1


def plot_confusion(
    cm: Any, classes: Sequence[str], path: str | Path, normalize: bool = True, names: Sequence[str] | None = None
) -> Path:
    """Confusion matrix heatmap (rows = true class); ``normalize`` divides each row by its support.

    ``names`` are the classes' long names (default: HAM10000's where known, else the codes).
    """
    counts = np.asarray(cm, dtype=float)
    if counts.shape != (len(classes), len(classes)):
        raise ValueError(f"cm must be {len(classes)}x{len(classes)}, got shape {counts.shape}")
    support = counts.sum(axis=1, keepdims=True)
    shown = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0) if normalize else counts
    fig = new_figure((9.5, 8))
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(shown.max(), 1))
    fig.colorbar(image, ax=ax, label="Share of true class" if normalize else "Images")
    for (i, j), value in np.ndenumerate(shown):
        text = f"{value:.2f}\n({int(counts[i, j])})" if normalize else f"{int(counts[i, j])}"
        colour = "white" if value > 0.5 * (1 if normalize else shown.max()) else "black"
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
    names = list(names) if names is not None else _names(classes)
    ax.set_xticks(range(len(classes)), names, rotation=40, ha="right")
    ax.set_yticks(range(len(classes)), names)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title("Confusion matrix" + (" (row-normalised; counts in brackets)" if normalize else ""))
    return save_figure(fig, path)


def plot_roc(
    y_true: Any, probs: Any, classes: Sequence[str], path: str | Path, names: Sequence[str] | None = None
) -> Path:
    """One-vs-rest ROC curve per class with its AUROC in the legend; absent classes are listed as such."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y, p = np.asarray(y_true).reshape(-1), np.asarray(probs, dtype=float)
    fig = new_figure((8, 7))
    ax = fig.add_subplot()
    for k, name in enumerate(list(names) if names is not None else _names(classes)):
        positive = y == k
        if positive.all() or not positive.any():
            ax.plot([], [], " ", label=f"{name}: not in data")
            continue
        fpr, tpr, _ = roc_curve(positive, p[:, k])
        ax.plot(fpr, tpr, lw=1.6, label=f"{name} (AUROC {roc_auc_score(positive, p[:, k]):.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="Chance")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        xlabel="False positive rate (1 - specificity)",
        ylabel="True positive rate (sensitivity)",
        title="One-vs-rest ROC curves",
    )
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)


def plot_reliability(y_true: Any, probs: Any, path: str | Path, bins: int = 15) -> Path:
    """Reliability diagram of top-1 confidence (accuracy per bin vs the diagonal) over a count histogram."""
    curve = reliability_curve(y_true, probs, bins=bins)
    ece = expected_calibration_error(y_true, probs, bins=bins)
    width = 1.0 / bins
    filled = curve.counts > 0
    fig = new_figure((7, 8))
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(
        curve.centers[filled],
        curve.accuracies[filled],
        width=width,
        edgecolor="black",
        color="tab:blue",
        alpha=0.8,
        label="Accuracy",
    )
    top.plot(curve.centers[filled], curve.confidences[filled], "o", color="tab:red", ms=4, label="Mean confidence")
    top.plot([0, 1], [0, 1], ls="--", color="grey", label="Perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="Accuracy", title=f"Reliability diagram (ECE {ece:.3f}, {bins} bins)")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(curve.centers, curve.counts, width=width, edgecolor="black", color="tab:grey")
    bottom.set(xlabel="Confidence (top-1 probability)", ylabel="Images")
    return save_figure(fig, path)


def plot_risk_coverage(y_true: Any, probs: Any, path: str | Path, deferred: Sequence[float] = (0.1, 0.2)) -> Path:
    """Risk (error of the kept cases) against coverage as the least confident are deferred, with the oracle."""
    rc = risk_coverage(np.asarray(y_true), np.asarray(probs))
    coverage, risk = np.asarray(rc["coverage"]), np.asarray(rc["risk"])
    errors = np.sort(np.asarray(probs).argmax(1) != np.asarray(y_true))
    oracle = np.cumsum(errors) / np.arange(1, len(errors) + 1)
    fig = new_figure((6, 4.5))
    ax = fig.subplots()
    ax.plot(coverage, risk, color="tab:blue", label=f"calibrated confidence (AURC {rc['aurc']:.3f})")
    ax.plot(coverage, oracle, ls="--", color="grey", label=f"oracle ranking (AURC {rc['aurc_oracle']:.3f})")
    for share in deferred:
        ax.axvline(1 - share, color="tab:red", lw=0.8, ls=":")
        ax.text(
            1 - share,
            ax.get_ylim()[1] * 0.6,
            f"defer {share:.0%} ",
            color="tab:red",
            fontsize=8,
            rotation=90,
            ha="right",
        )
    ax.set(
        xlabel="Coverage (share of cases the model keeps)",
        ylabel="Risk (error rate of the kept cases)",
        title=f"Risk-coverage ({rc['n_images']} images)",
        xlim=(0, 1),
    )
    ax.legend(loc="upper left", fontsize=8)
    return save_figure(fig, path)


def plot_bars_with_ci(df: pd.DataFrame, metric: str, path: str | Path) -> Path:
    """Bar per model of a metric's mean with its confidence interval as error bars.

    Args:
        df: one row per model with columns ``model``, ``mean``, ``ci_low``, ``ci_high``; when it
            also has a ``metric`` column, only the rows where it equals ``metric`` are drawn.
        metric: metric name, used to select rows and for the axis label and title.
        path: output file.
    """
    _require(df, ("model", "mean", "ci_low", "ci_high"))
    rows = df[df["metric"] == metric] if "metric" in df.columns else df
    if rows.empty:
        raise ValueError(f"no rows to plot for metric {metric!r}")
    mean = rows["mean"].to_numpy(float)
    errors = np.nan_to_num(
        np.vstack([mean - rows["ci_low"].to_numpy(float), rows["ci_high"].to_numpy(float) - mean]), nan=0.0
    )
    fig = new_figure((max(5, 1.3 * len(rows) + 2), 5))
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    ax.bar(x, mean, yerr=errors, capsize=5, color="tab:blue", edgecolor="black", alpha=0.85)
    for xi, m in zip(x, mean, strict=True):
        ax.annotate(f"{m:.3f}", (xi, m), xytext=(6, 3), textcoords="offset points", fontsize=8)
    ax.set_xticks(x, rows["model"].astype(str), rotation=30, ha="right")
    label = metric.replace("_", " ")
    ax.set(xlabel="Model", ylabel=label, title=f"{label.capitalize()} by model (mean and 95% CI)")
    return save_figure(fig, path)


def plot_per_class_sensitivity(df: pd.DataFrame, path: str | Path) -> Path:
    """Grouped bars: per-class sensitivity (x = class, one bar per model), to show where metadata hurts.

    Args:
        df: one row per (model, class) with columns ``model``, ``class`` (a class code, in the order given) and
            ``mean``; optional ``ci_low``/``ci_high`` add error bars.
        path: output file.
    """
    _require(df, ("model", "class", "mean"))
    models = list(dict.fromkeys(df["model"]))
    classes = list(dict.fromkeys(df["class"]))
    width = 0.8 / len(models)
    fig = new_figure((max(8, 1.4 * len(classes) + 2), 5.5))
    ax = fig.add_subplot()
    for i, model in enumerate(models):
        sub = df[df["model"] == model].set_index("class").reindex(classes)
        x = np.arange(len(classes)) + (i - (len(models) - 1) / 2) * width
        ax.bar(
            x,
            sub["mean"].to_numpy(float),
            width=width,
            yerr=_errors(sub),
            capsize=2,
            edgecolor="black",
            linewidth=0.5,
            label=str(model),
        )
    ax.set_xticks(np.arange(len(classes)), _names(classes), rotation=30, ha="right")
    ax.set(ylim=(0, 1.05), xlabel="True class", ylabel="Sensitivity (recall)", title="Per-class sensitivity by model")
    ax.legend(title="Model", fontsize=8)
    return save_figure(fig, path)


def _errors(rows: pd.DataFrame) -> np.ndarray | None:
    """Asymmetric error bars from ci_low/ci_high columns, or None when they are absent."""
    if not {"ci_low", "ci_high"} <= set(rows.columns):
        return None
    mean = rows["mean"].to_numpy(float)
    return np.nan_to_num(
        np.vstack([mean - rows["ci_low"].to_numpy(float), rows["ci_high"].to_numpy(float) - mean]), nan=0.0
    )


def _require(df: pd.DataFrame, columns: Sequence[str]) -> None:
    """Raise ValueError naming the missing columns of a plotting table."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"table is missing column(s) {missing}; has {list(df.columns)}")


def _names(classes: Sequence[str]) -> list[str]:
    """Full class names for axes and legends (the code itself when unknown)."""
    return [CLASS_NAMES.get(c, c) for c in classes]


def new_figure(size: tuple[float, float], dpi: float | None = None) -> Figure:
    """A pyplot-free figure on an Agg canvas with constrained layout (pictures alone are composed in
    :mod:`.panels`, without matplotlib)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: float | str = _DPI) -> Path:
    """Write a figure atomically in the format named by the suffix, then release it: every figure
    of the package is saved here."""
    path = Path(path)
    kind = path.suffix.lstrip(".").lower() or "png"
    encoding: dict[str, Any] = {"pil_kwargs": {"compress_level": PNG_LEVEL}} if kind == "png" else {}
    with atomic_write(path, "wb") as fh:
        fig.savefig(fh, format=kind, dpi=dpi, **encoding)
    fig.clear()
    return path


def save_evaluation_figures(evaluation: Evaluation) -> list[Path]:
    """The confusion matrix, ROC curves, reliability diagram and risk-coverage curve of each evaluated split."""
    paths = []
    schema = evaluation.schema
    classes, names = schema.classes, [schema.class_name(c) for c in schema.classes]
    for split, scores in evaluation.scores.items():
        cm = np.array(evaluation.metrics[split]["calibrated"]["confusion_matrix"])
        paths += [
            plot_confusion(cm, classes, evaluation.folder.figure(f"confusion_{split}.png"), names=names),
            plot_roc(scores.targets, scores.calibrated, classes, evaluation.folder.figure(f"roc_{split}.png"), names),
            plot_reliability(scores.targets, scores.raw, evaluation.folder.figure(f"reliability_{split}.png")),
            plot_risk_coverage(
                scores.targets, scores.calibrated, evaluation.folder.figure(f"risk_coverage_{split}.png")
            ),
        ]
    return paths
