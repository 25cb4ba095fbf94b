"""Metrics by sex, age band and localization, per model, from the ablation's out-of-fold predictions.

Within a seed every image is tested exactly once (its fold's cell), so the pooled out-of-fold
predictions cover the whole dataset; each subgroup's metrics are computed per seed and averaged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score, recall_score

from ..data.constants import CLASSES
from ..data.ham10000 import Ham10000
from ..io import atomic_write

AGE_BANDS = ((0, 30, "<30"), (30, 50, "30-50"), (50, 70, "50-70"), (70, 200, ">=70"))
MIN_LESIONS = 30  # fewer lesions than this in a subgroup: too small to judge
MIN_CLASSES = 2  # balanced accuracy needs at least two classes present


def age_band(age: pd.Series) -> pd.Series:
    """Age bands <30, 30-50, 50-70, >=70 and 'unknown' for a missing age."""
    bands = pd.Series("unknown", index=age.index, dtype=object)
    for low, high, name in AGE_BANDS:
        bands[(age >= low) & (age < high)] = name
    return bands


def _subgroup_metrics(frame: pd.DataFrame) -> dict[str, Any]:
    y, pred = frame["target"].to_numpy(), frame["pred"].to_numpy()
    mel = CLASSES.index("mel")
    has_mel = bool((y == mel).any())
    return {
        "n_images": len(frame),
        "n_lesions": frame["lesion_id"].nunique(),
        "n_classes": len(np.unique(y)),
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred) if len(np.unique(y)) >= MIN_CLASSES else np.nan,
        "melanoma_sensitivity": recall_score(y == mel, pred == mel, zero_division=0) if has_mel else np.nan,
    }


def subgroup_frame(records: list[dict[str, Any]], ham: Ham10000) -> pd.DataFrame:
    """Per model, attribute and value: metrics averaged over seeds, with lesion counts and a too-small flag."""
    meta = ham.metadata.set_index("image_id")
    attributes = {"sex": meta["sex"], "age_band": age_band(meta["age"]), "localization": meta["localization"]}
    rows = []
    pooled = pd.DataFrame(
        [
            {"model": r["model"], "seed": r["seed"], "image_id": i, "pred": int(np.argmax(p))}
            for r in records
            for i, p in zip(r["image_ids"], r["probs"], strict=True)
        ]
    )
    pooled["target"] = meta["dx"].map({c: i for i, c in enumerate(CLASSES)}).reindex(pooled["image_id"]).to_numpy()
    pooled["lesion_id"] = meta["lesion_id"].reindex(pooled["image_id"]).to_numpy()
    for attr, values in attributes.items():
        pooled["value"] = values.reindex(pooled["image_id"]).to_numpy()
        for (model, value), group in pooled.groupby(["model", "value"], sort=True):
            per_seed = pd.DataFrame([_subgroup_metrics(g) for _, g in group.groupby("seed")])
            row = {
                "model": model,
                "attribute": attr,
                "value": value,
                **per_seed.mean(numeric_only=True).to_dict(),
                "balanced_accuracy_std": per_seed["balanced_accuracy"].std(ddof=1) if len(per_seed) > 1 else np.nan,
            }
            row["too_small"] = bool(row["n_lesions"] < MIN_LESIONS or row["n_classes"] < MIN_CLASSES)
            rows.append(row)
    out = pd.DataFrame(rows)
    out[["n_images", "n_lesions", "n_classes"]] = out[["n_images", "n_lesions", "n_classes"]].round().astype(int)
    return out


def subgroup_markdown(table: pd.DataFrame) -> str:
    """Balanced accuracy per model (columns) for every subgroup (rows), small cells marked."""
    lines = [
        "# Subgroups",
        "",
        f"Balanced accuracy, mean over seeds of the pooled out-of-fold predictions. "
        f"'(too small)': fewer than {MIN_LESIONS} lesions or one class only.",
        "",
    ]
    models = list(dict.fromkeys(table["model"]))
    for attr, group in table.groupby("attribute", sort=False):
        lines += [
            f"## {attr}",
            "",
            "| value | lesions | " + " | ".join(models) + " |",
            "|---" * (len(models) + 2) + "|",
        ]
        for value, g in group.groupby("value", sort=True):
            g = g.set_index("model")
            flag = " (too small)" if bool(g["too_small"].iloc[0]) else ""
            cells = [f"{g.loc[m, 'balanced_accuracy']:.3f}" if m in g.index else "" for m in models]
            lines.append(f"| {value}{flag} | {int(g['n_lesions'].iloc[0])} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_subgroups(records: list[dict[str, Any]], ham: Ham10000, out: Path) -> dict[str, Path]:
    """Write subgroups.csv and subgroups.md into ``out``."""
    table = subgroup_frame(records, ham)
    with atomic_write(out / "subgroups.csv") as fh:
        table.to_csv(fh, index=False)
    with atomic_write(out / "subgroups.md") as fh:
        fh.write(subgroup_markdown(table))
    return {"subgroups": out / "subgroups.csv", "subgroups_md": out / "subgroups.md"}
