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
LATE_FUSION = ("concat", "gated", "film")  # fusion on the pooled embedding, the map-fusion models' reference
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


def best_late_model(results: pd.DataFrame, metric: str = "balanced_accuracy") -> str | None:
    """The late-fusion model (reads image and metadata, fuses on the pooled embedding) with the best mean ``metric``."""
    from ..models import fuses_on_maps, list_models

    late = [m for m in results.model.unique() if m in LATE_FUSION and m in list_models() and not fuses_on_maps(m)]
    if not late:
        return None
    means = results[results.model.isin(late)].groupby("model")[metric].mean()
    return str(means.idxmax())


def map_fusion_comparison(results: pd.DataFrame, n_folds: int, n_boot: int) -> pd.DataFrame:
    """Each map-fusion model against the ablation's best late-fusion model (paired, as :func:`comparison_frame`)."""
    from ..models import fuses_on_maps, list_models

    best = best_late_model(results)
    known = set(list_models())
    maps = [m for m in results.model.unique() if m in known and fuses_on_maps(m)]
    if best is None or not maps:
        return pd.DataFrame()
    return comparison_frame(results[results.model.isin([best, *maps])], best, n_folds, n_boot)


def missing_metadata_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Per model and variant (full, no_<feature>, none): balanced accuracy and macro AUROC, mean and std over cells."""
    rows = [
        {"model": r["model"], "fold": r["fold"], "seed": r["seed"], "variant": name.split("/")[0], **scores}
        for r in records
        for name, scores in r.get("missing_metadata", {}).items()
        if isinstance(scores, dict)
    ]
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    out = frame.groupby(["model", "variant"], sort=False)[["balanced_accuracy", "macro_auroc"]].agg(["mean", "std"])
    out.columns = [f"{metric}_{stat}" for metric, stat in out.columns]
    return out.reset_index().assign(n_cells=frame.groupby(["model", "variant"], sort=False).size().to_numpy())


def _missing_markdown(missing: pd.DataFrame) -> list[str]:
    if missing.empty:
        return []
    variants = list(dict.fromkeys(missing.variant))
    wide = missing.assign(
        text=[
            f"{m:.3f} ± {s:.3f}"
            for m, s in zip(missing.balanced_accuracy_mean, missing.balanced_accuracy_std, strict=True)
        ]
    ).pivot(index="model", columns="variant", values="text")
    lines = [
        "",
        "## Missing metadata (test folds; features read as missing, the encoding meta dropout trains on)",
        "",
        "| model | " + " | ".join(variants) + " |",
        "|---" * (len(variants) + 1) + "|",
    ]
    lines += [f"| {m} | " + " | ".join(wide.loc[m].get(v, "") for v in variants) + " |" for m in wide.index]
    return [*lines, "", "(balanced accuracy, mean ± std over folds x seeds)"]


def _comparison_rows(comparison: pd.DataFrame) -> list[str]:
    return [
        f"| {r.model} | {r.mean_diff:+.3f} | [{r.ci_low:+.3f}, {r.ci_high:+.3f}] | {r.p_value:.3g} "
        f"({r.test}) | {r.p_corrected:.3g} |"
        for r in comparison.itertuples()
    ]


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
    against_late: pd.DataFrame | None = None,
    missing: pd.DataFrame | None = None,
) -> str:
    """The human-readable summary: headline table, comparison with the baseline, where metadata hurts.

    ``groups`` is what the folds keep together, in the plural (the schema's ``group_noun``);
    ``against_late``: map-fusion models against the best late model; ``missing``: the missing-metadata table.
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
    lines += _comparison_rows(comparison)
    if against_late is not None and not against_late.empty:
        lines += [
            "",
            f"## Map fusion against the best late-fusion model ({against_late.baseline.iloc[0]}, paired)",
            "",
            "| model | Δ balanced accuracy | 95% CI | p (paired) | p (corrected t) |",
            "|---|---|---|---|---|",
            *_comparison_rows(against_late),
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
        *_missing_markdown(missing if missing is not None else pd.DataFrame()),
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
    against_late = map_fusion_comparison(results, cfg.ablation.folds, cfg.ablation.bootstrap)
    missing = missing_metadata_frame(records)
    n_lesions = int(dataset.metadata["lesion_id"].nunique())
    paths = {
        "results": _csv(results, out / "results.csv"),
        "summary": _csv(summary, out / "summary.csv"),
        "comparison": _csv(pd.concat([comparison, against_late], ignore_index=True), out / "comparison.csv"),
        "per_class": _csv(per_class, out / "per_class_sensitivity.csv"),
    }
    if not missing.empty:
        paths["missing_metadata"] = _csv(missing, out / "missing_metadata.csv")
    with atomic_write(out / "summary.md") as fh:
        fh.write(
            summary_markdown(
                summary,
                comparison,
                per_class,
                cfg,
                n_lesions,
                timing,
                dataset.schema.group_noun,
                against_late=against_late,
                missing=missing,
            )
        )
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
