"""Tables, statistics and plots of an ablation: results.csv, summary.csv/.md, comparison.csv, figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ..config import ExperimentConfig
from ..data.dataset import LesionDataset
from ..io import atomic_write, write_json
from ..training.stats import corrected_ttest, paired_comparison, summarise
from .ensembles import ensemble_comparison, ensemble_frame, ensemble_markdown
from .subgroups import write_subgroups

HEADLINE = ("balanced_accuracy", "macro_auroc", "melanoma_auroc", "ece")
SCALARS = (
    *HEADLINE,
    "accuracy",
    "macro_f1",
    "nll",
    "brier",
    "melanoma_sensitivity_at_specificity_0.80",
    "key_auroc",
    "key_sensitivity_at_specificity_0.80",
)


def results_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per (model, fold, seed) with every scalar metric and per-class sensitivity / AUROC."""
    rows = []
    for r in records:
        m = r["metrics"]
        row = {
            "model": r["model"],
            "fold": r["fold"],
            "seed": r["seed"],
            "n_images": m["n_images"],
            "n_lesions": m["n_lesions"],
            **{k: m.get(k, float("nan")) for k in SCALARS},  # cells of older versions lack the key_* ones
            "seconds": round(r["seconds"], 3),
        }
        for c in m["per_class"]:  # the run's classes, in logit order
            row[f"sensitivity_{c}"] = m["per_class"][c]["sensitivity"]
            row[f"auroc_{c}"] = m["per_class"][c]["auroc"]
        rows.append(row)
    return pd.DataFrame(rows)


def summary_frame(results: pd.DataFrame, n_boot: int) -> pd.DataFrame:
    """Per model and metric: mean, standard deviation, 95% bootstrap CI over folds x seeds."""
    metrics = list(HEADLINE) + [c for c in results.columns if c.startswith("sensitivity_")]
    rows = [
        {"model": model, "metric": metric, **summarise(group[metric].to_numpy(float), n_boot=n_boot)}
        for model, group in results.groupby("model", sort=False)
        for metric in metrics
    ]
    return pd.DataFrame(rows)


def comparison_frame(
    results: pd.DataFrame, baseline: str, n_folds: int, n_boot: int, metrics: tuple[str, ...] = ("balanced_accuracy",)
) -> pd.DataFrame:
    """Each model against ``baseline`` on the same folds and seeds: paired difference, 95% CI, p-values.

    ``p_value`` is the paired test over cells; ``p_corrected`` is Nadeau & Bengio's corrected
    resampled t-test, which accounts for the training data the folds share.
    """
    base = results[results.model == baseline].set_index(["fold", "seed"])
    rows = []
    for model, group in results[results.model != baseline].groupby("model", sort=False):
        g = group.set_index(["fold", "seed"]).reindex(base.index)
        for metric in metrics:
            a, b = g[metric].to_numpy(float), base[metric].to_numpy(float)
            paired = paired_comparison(a, b, n_boot=n_boot)
            corrected = corrected_ttest(a - b, n_train=max(n_folds - 2, 1), n_test=1)
            rows.append(
                {"model": model, "baseline": baseline, "metric": metric, **paired, "p_corrected": corrected["p_value"]}
            )
    return pd.DataFrame(rows)


def _fmt(row: pd.Series) -> str:
    return f"{row['mean']:.3f} ± {row['std']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}]"


def summary_markdown(
    summary: pd.DataFrame,
    comparison: pd.DataFrame,
    per_class: pd.DataFrame,
    cfg: ExperimentConfig,
    n_lesions: int,
    timing: dict[str, Any],
    groups: str = "lesions",
) -> str:
    """The human-readable summary: headline table, comparison with the baseline, where metadata hurts.

    ``groups`` is what the folds keep together, in the plural (the schema's ``group_noun``).
    """
    wide = summary.assign(text=summary.apply(_fmt, axis=1)).pivot(index="model", columns="metric", values="text")
    order = [m for m in summary.model.unique()]
    lines = [
        f"# Ablation: {len(order)} models x {cfg.ablation.folds} {groups[:-1]}-grouped folds x "
        f"{len(cfg.ablation.seeds)} seeds",
        "",
        f"Test sets: each fold in turn ({n_lesions} {groups} in all, every {groups[:-1]} tested once per seed). "
        f"Values: mean ± std [95% bootstrap CI] over folds x seeds. Path: {cfg.train.mode} "
        f"({cfg.model.backbone}, weights {cfg.model.weights}).",
        "",
        "| model | " + " | ".join(HEADLINE) + " |",
        "|---" * (len(HEADLINE) + 1) + "|",
    ]
    lines += [f"| {m} | " + " | ".join(wide.loc[m, k] for k in HEADLINE) + " |" for m in order]
    lines += [
        "",
        f"## Against {cfg.ablation.baseline} (paired over the same folds and seeds)",
        "",
        "| model | Δ balanced accuracy | 95% CI | p (paired) | p (corrected t) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.model} | {r.mean_diff:+.3f} | [{r.ci_low:+.3f}, {r.ci_high:+.3f}] | {r.p_value:.3g} "
        f"({r.test}) | {r.p_corrected:.3g} |"
        for r in comparison.itertuples()
    ]
    classes = list(dict.fromkeys(per_class["class"])) if len(per_class) else []
    lines += [
        "",
        "## Per-class sensitivity: where metadata helps and where it hurts",
        "",
        "| model | " + " | ".join(classes) + " |",
        "|---" * (len(classes) + 1) + "|",
    ]
    for model, group in per_class.groupby("model", sort=False):
        cells = {r["class"]: f"{r['diff']:+.3f}{' ↓' if r['diff'] < 0 else ''}" for _, r in group.iterrows()}
        lines.append(f"| {model} | " + " | ".join(cells.get(c, "") for c in classes) + " |")
    lines += [
        "",
        f"(difference in mean sensitivity against {cfg.ablation.baseline}; ↓ marks a class that loses)",
        "",
        f"Timing: {timing}",
        "",
    ]
    return "\n".join(lines)


def per_class_differences(summary: pd.DataFrame, baseline: str) -> pd.DataFrame:
    """Mean per-class sensitivity of each model minus the baseline's (negative = metadata hurts)."""
    sens = summary[summary.metric.str.startswith("sensitivity_")].copy()
    sens["class"] = sens.metric.str.removeprefix("sensitivity_")
    base = sens[sens.model == baseline].set_index("class")["mean"]
    other = sens[sens.model != baseline]
    return other.assign(diff=other["mean"].to_numpy() - base.reindex(other["class"]).to_numpy())[
        ["model", "class", "mean", "diff"]
    ]


def _csv(df: pd.DataFrame, path: Path) -> Path:
    with atomic_write(path) as fh:
        df.to_csv(fh, index=False)
    return path


def write_summaries(
    records: list[dict[str, Any]], cfg: ExperimentConfig, dataset: LesionDataset, out: Path, timing: dict[str, Any]
) -> dict[str, Path]:
    """Write every ablation output and return their paths by name."""
    from ..report.figures import plot_bars_with_ci, plot_per_class_sensitivity

    results = results_frame(records)
    summary = summary_frame(results, cfg.ablation.bootstrap)
    comparison = comparison_frame(results, cfg.ablation.baseline, cfg.ablation.folds, cfg.ablation.bootstrap)
    per_class = per_class_differences(summary, cfg.ablation.baseline)
    n_lesions = int(dataset.metadata["lesion_id"].nunique())
    paths = {
        "results": _csv(results, out / "results.csv"),
        "summary": _csv(summary, out / "summary.csv"),
        "comparison": _csv(comparison, out / "comparison.csv"),
        "per_class": _csv(per_class, out / "per_class_sensitivity.csv"),
    }
    with atomic_write(out / "summary.md") as fh:
        fh.write(summary_markdown(summary, comparison, per_class, cfg, n_lesions, timing, dataset.schema.group_noun))
    paths["summary_md"] = out / "summary.md"
    for metric in ("balanced_accuracy", "macro_auroc"):
        paths[f"plot_{metric}"] = plot_bars_with_ci(summary[summary.metric == metric], metric, out / f"{metric}.png")
    sens = summary[summary.metric.str.startswith("sensitivity_")]
    paths["plot_per_class"] = plot_per_class_sensitivity(
        sens.assign(**{"class": sens.metric.str.removeprefix("sensitivity_")}), out / "per_class_sensitivity.png"
    )
    paths.update(write_subgroups(records, dataset, out, cfg.uncertainty.bootstrap))
    ensembles = ensemble_frame(records, dataset, cfg)
    if not ensembles.empty:
        paths["ensembles"] = _csv(ensembles, out / "ensembles.csv")
        compared = ensemble_comparison(ensembles, cfg.ablation.bootstrap)
        paths["ensemble_comparison"] = _csv(compared, out / "ensemble_comparison.csv")
        with atomic_write(out / "ensembles.md") as fh:
            fh.write(ensemble_markdown(compared, cfg))
        paths["ensembles_md"] = out / "ensembles.md"
    write_json(out / "timing.json", timing)
    return paths
