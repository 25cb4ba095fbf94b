"""The subgroup audit of an ablation: per model, metrics and calibration by sex, age band and localization.

Within a seed every image is tested exactly once (its fold's cell), so the pooled out-of-fold
predictions cover the whole dataset. Each model's predictions of all seeds are pooled and audited with
:func:`~multimodal_lesion.training.audit.subgroup_audit` (fairlearn's ``MetricFrame``); the bootstrap
of the largest gaps resamples lesions, so an image's seeds and its lesion's other images go together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data.dataset import LesionDataset
from ..data.patient import subgroup_attributes
from ..io import atomic_write, write_json
from ..training.audit import AUDITED, MIN_LESIONS, subgroup_audit


def audit_records(records: list[dict[str, Any]], dataset: LesionDataset, n_boot: int) -> dict[str, dict[str, Any]]:
    """Model -> its subgroup audit over the pooled out-of-fold predictions of every seed."""
    schema = dataset.schema
    meta = dataset.metadata.set_index("image_id")
    targets = meta["dx"].map({c: i for i, c in enumerate(schema.classes)})
    attributes = subgroup_attributes(meta, schema.features)
    out = {}
    for model in dict.fromkeys(r["model"] for r in records):
        mine = [r for r in records if r["model"] == model]
        ids = pd.Index([i for r in mine for i in r["image_ids"]])
        probs = np.concatenate([np.asarray(r["probs"], dtype=np.float64) for r in mine])
        out[model] = subgroup_audit(
            targets.reindex(ids).to_numpy(),
            probs,
            {name: values.reindex(ids).reset_index(drop=True) for name, values in attributes.items()},
            meta["lesion_id"].reindex(ids).to_numpy(),
            schema.key_index,
            n_boot=n_boot,
        )
    return out


def subgroup_frame(audits: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per model, attribute and value: counts, audited metrics and the too-small flag."""
    rows = [
        {"model": model, "attribute": attr, "value": value, **group}
        for model, audit in audits.items()
        for attr, a in audit.items()
        for value, group in a["groups"].items()
    ]
    out = pd.DataFrame(rows)
    out[["n_images", "n_lesions"]] = out[["n_images", "n_lesions"]].round().astype(int)
    return out


def gap_frame(audits: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """One row per model, attribute and metric: the largest gap between groups, its 95% CI, the two groups."""
    return pd.DataFrame(
        [
            {
                "model": model,
                "attribute": attr,
                "metric": metric,
                "gap": g["gap"],
                "ci_low": g["ci"][0],
                "ci_high": g["ci"][1],
                "between": " vs ".join(g["between"]),
            }
            for model, audit in audits.items()
            for attr, a in audit.items()
            for metric, g in a["gaps"].items()
        ]
    )


def subgroup_markdown(table: pd.DataFrame, gaps: pd.DataFrame, groups: str = "lesions") -> str:
    """Balanced accuracy and ECE per model (columns) for every subgroup (rows), then the largest gaps.

    ``groups`` is what the bootstrap resamples, in the plural (the schema's ``group_noun``).
    """
    lines = [
        "# Subgroup audit",
        "",
        "Pooled out-of-fold predictions of every seed (fairlearn MetricFrame). Cells: balanced accuracy / ECE. "
        f"'(too small)': fewer than {MIN_LESIONS} {groups}; left out of the gaps.",
        "",
    ]
    models = list(dict.fromkeys(table["model"]))
    for attr, group in table.groupby("attribute", sort=False):
        lines += [
            f"## {attr}",
            "",
            f"| value | {groups} | " + " | ".join(models) + " |",
            "|---" * (len(models) + 2) + "|",
        ]
        for value, g in group.groupby("value", sort=True):
            g = g.set_index("model")
            flag = " (too small)" if bool(g["too_small"].iloc[0]) else ""
            cells = [
                f"{g.loc[m, 'balanced_accuracy']:.3f} / {g.loc[m, 'ece']:.3f}" if m in g.index else "" for m in models
            ]
            lines.append(f"| {value}{flag} | {int(g['n_lesions'].iloc[0])} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        f"## Largest gap between groups (95% {groups[:-1]}-bootstrap CI)",
        "",
        "A gap is the best group's value minus the worst group's; resampling inflates such a range (every "
        "small group's noise widens it), so its percentile interval can lie above the point estimate. "
        "Intervals are computed for balanced accuracy and ECE.",
        "",
        "| model | attribute | " + " | ".join(AUDITED) + " |",
    ]
    lines.append("|---" * (len(AUDITED) + 2) + "|")
    for (model, attr), g in gaps.groupby(["model", "attribute"], sort=False):
        g = g.set_index("metric")
        cells = [f"{g.loc[m, 'gap']:.3f}{_interval(g.loc[m, 'ci_low'], g.loc[m, 'ci_high'])}" for m in AUDITED]
        lines.append(f"| {model} | {attr} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _interval(low: float, high: float) -> str:
    """' [low, high]', or nothing when no interval was computed."""
    return "" if np.isnan(low) or np.isnan(high) else f" [{low:.3f}, {high:.3f}]"


def write_subgroups(
    records: list[dict[str, Any]], dataset: LesionDataset, out: Path, n_boot: int = 200
) -> dict[str, Path]:
    """Write subgroups.csv, subgroup_gaps.csv, subgroups.md and subgroups.json into ``out``."""
    audits = audit_records(records, dataset, n_boot)
    table, gaps = subgroup_frame(audits), gap_frame(audits)
    for name, frame in (("subgroups.csv", table), ("subgroup_gaps.csv", gaps)):
        with atomic_write(out / name) as fh:
            frame.to_csv(fh, index=False)
    with atomic_write(out / "subgroups.md") as fh:
        fh.write(subgroup_markdown(table, gaps, dataset.schema.group_noun))
    write_json(out / "subgroups.json", audits)
    return {
        "subgroups": out / "subgroups.csv",
        "subgroup_gaps": out / "subgroup_gaps.csv",
        "subgroups_md": out / "subgroups.md",
    }
