"""Exploratory data analysis of a dataset's canonical table: counts, figures, missing values.

``run_eda(metadata, out, schema)`` writes the class figures (``class_counts.png``, ``class_pie.png``),
one figure per patient feature of the schema (``<feature>_by_class.png``: a box plot per class for a
numeric feature; stacked shares for a categorical or boolean one with few values, a heatmap for one
with many), ``missing_values.png``, ``missing_values.csv`` and ``summary.json``. HAM10000 (the
default schema) gets the original figures: ``age_by_class``, ``sex_by_class``, ``localization_by_class``.
Figures are drawn on explicit Agg canvases (no pyplot, so no global backend switch and nothing left
open) and every file is written atomically.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.constants import UNKNOWN
from ..data.schema import DatasetSchema, preset
from ..errors import DataError
from ..io import atomic_write, write_json
from .figures import new_figure, save_figure

#: Columns every canonical table has (see data/schema.py).
REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx")
#: Columns that are not data (absolute file paths).
FILE_COLUMNS = ("path", "mask_path")
SEX_COLOURS = {"female": "#d95f02", "male": "#1b9e77", UNKNOWN: "#bbbbbb"}
#: A categorical feature with more values than this is drawn as a heatmap, not stacked bars.
MAX_STACKED = 5


def _check(metadata: pd.DataFrame, schema: DatasetSchema) -> pd.DataFrame:
    """Validate the columns and labels; return a copy with numeric features as numbers."""
    missing = [c for c in (*REQUIRED_COLUMNS, *schema.features.names) if c not in metadata.columns]
    if missing:
        raise DataError(f"EDA metadata lacks column(s) {', '.join(missing)}")
    unknown = sorted(set(metadata["dx"]) - set(schema.classes))
    if unknown:
        raise DataError(f"EDA metadata column dx has unknown value(s) {unknown[:5]}")
    df = metadata.copy()
    for col in schema.features.numeric:
        df[col] = pd.to_numeric(df[col], errors="coerce")
    for col in (*schema.features.categorical, *schema.features.boolean):
        df[col] = df[col].fillna(UNKNOWN).astype(str).str.lower().replace("", UNKNOWN)
    return df


def missing_counts(df: pd.DataFrame, schema: DatasetSchema | None = None) -> dict[str, int]:
    """Missing values per column of the table: empty cells, and ``unknown`` for categorical / boolean features."""
    schema = schema or preset("ham10000")
    coded = (*schema.features.categorical, *schema.features.boolean)
    counts = {}
    for col in (c for c in df.columns if c not in FILE_COLUMNS):
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if col in coded:
            empty |= df[col].astype(str).str.lower() == UNKNOWN
        counts[col] = int(empty.sum())
    return counts


def summarise(df: pd.DataFrame, schema: DatasetSchema | None = None) -> dict:
    """The numbers of ``summary.json``; class counts in the schema's class order, zero classes included."""
    schema = schema or preset("ham10000")
    per_lesion = df.groupby("lesion_id").size()
    summary = {
        "schema": schema.name,
        "n_images": len(df),
        "n_lesions": int(per_lesion.size),
        "n_lesions_with_several_images": int((per_lesion > 1).sum()),
        "class_counts": {c: int((df["dx"] == c).sum()) for c in schema.classes},
        "missing": missing_counts(df, schema),
    }
    if "patient_id" in df.columns:
        summary["n_patients"] = int(df["patient_id"].nunique())
    return summary


def _class_counts(schema: DatasetSchema, df: pd.DataFrame, ax) -> None:
    """Horizontal bar chart of images per class, counts annotated."""
    counts = df["dx"].value_counts().reindex(schema.classes, fill_value=0)
    bars = ax.barh([schema.class_name(c) for c in schema.classes], counts.to_numpy(), color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:,}" for v in counts], padding=3)
    ax.invert_yaxis()
    ax.margins(x=0.12)
    ax.set(title=f"Images per diagnosis (n = {len(df):,})", xlabel="Number of images", ylabel="Diagnosis")


def _class_pie(schema: DatasetSchema, df: pd.DataFrame, ax) -> None:
    """Pie of the class shares; names in a legend so small slices stay readable."""
    counts = df["dx"].value_counts().reindex(schema.classes, fill_value=0)
    share = counts / max(counts.sum(), 1) * 100
    wedges, _ = ax.pie(counts.to_numpy(), startangle=90, counterclock=False, wedgeprops={"edgecolor": "white"})
    ax.legend(
        wedges,
        [f"{schema.class_name(c)}: {share[c]:.1f}%" for c in schema.classes],
        title="Diagnosis",
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        frameon=False,
    )
    ax.set_title(f"Share of images per diagnosis (n = {len(df):,})")
    ax.axis("equal")


def _numeric_by_class(schema: DatasetSchema, column: str, df: pd.DataFrame, ax) -> None:
    """Box plot of a numeric feature per class; missing values are left out and counted in the title."""
    classes = schema.classes
    data = [df.loc[(df["dx"] == c) & df[column].notna(), column].to_numpy() for c in classes]
    ax.boxplot(
        [d if d.size else np.array([np.nan]) for d in data],
        patch_artist=True,
        boxprops={"facecolor": "#c6dbef"},
        medianprops={"color": "black"},
    )
    ax.set_xticks(
        range(1, len(classes) + 1),
        [f"{schema.class_name(c)}\nn = {d.size:,}" for c, d in zip(classes, data, strict=True)],
        rotation=25,
        ha="right",
    )
    is_age = column == schema.features.age_feature
    ax.set(
        title=f"{'Age' if is_age else column} by diagnosis ({int(df[column].isna().sum())} images without "
        f"{'age' if is_age else 'a value'} left out)",
        xlabel="Diagnosis",
        ylabel="Age (years)" if is_age else column,
    )


def _stacked_by_class(schema: DatasetSchema, column: str, df: pd.DataFrame, ax) -> None:
    """Stacked percentage bars of a categorical (or boolean) feature within each class."""
    classes = schema.classes
    table = pd.crosstab(df["dx"], df[column]).reindex(index=classes, fill_value=0)
    order = sorted(table.columns, key=lambda s: (list(SEX_COLOURS).index(s) if s in SEX_COLOURS else 9, s))
    order = [*(v for v in order if v != UNKNOWN), *(v for v in order if v == UNKNOWN)]
    share = table[order].div(table.sum(axis=1).replace(0, 1), axis=0) * 100
    left = np.zeros(len(classes))
    palette = ["#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"]
    for i, value in enumerate(order):
        colour = SEX_COLOURS.get(value, palette[i % len(palette)])
        ax.barh([schema.class_name(c) for c in classes], share[value], left=left, label=value, color=colour)
        left += share[value].to_numpy()
    ax.invert_yaxis()
    name = "Sex" if column == "sex" else column
    ax.legend(title=name, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set(title=f"{name} by diagnosis", xlabel="Share of the diagnosis' images (%)", ylabel="Diagnosis", xlim=(0, 100))


def _heatmap_by_class(schema: DatasetSchema, column: str, df: pd.DataFrame, ax) -> None:
    """Heatmap value x class of a categorical feature: colour = share of the class, numbers = image counts."""
    classes = schema.classes
    table = pd.crosstab(df[column], df["dx"]).reindex(columns=classes, fill_value=0)
    table = table.loc[table.sum(axis=1).sort_values(ascending=False).index]
    share = table / table.sum(axis=0).replace(0, 1)
    image = ax.imshow(share.to_numpy() * 100, cmap="Blues", aspect="auto", vmin=0)
    for (i, j), value in np.ndenumerate(table.to_numpy()):
        ax.text(
            j,
            i,
            f"{value:,}",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if share.iat[i, j] > 0.5 * share.to_numpy().max() else "black",
        )
    ax.set_xticks(range(len(classes)), [schema.class_name(c) for c in classes], rotation=30, ha="right")
    ax.set_yticks(range(len(table.index)), table.index)
    ax.figure.colorbar(image, ax=ax, label="Share of the diagnosis' images (%)")
    name = "Localization" if column == "localization" else column
    ax.set(title=f"{name} by diagnosis (numbers: images)", xlabel="Diagnosis", ylabel=name)


def _missing(schema: DatasetSchema, df: pd.DataFrame, ax) -> None:
    """Share of images with each patient feature missing (unknown)."""
    counts = missing_counts(df, schema)
    names = list(schema.features.names)
    share = np.array([counts[n] / max(len(df), 1) * 100 for n in names])
    bars = ax.barh(names, share, color="#dd8452")
    ax.bar_label(bars, labels=[f"{counts[n]:,}" for n in names], padding=3)
    ax.invert_yaxis()
    ax.set(
        title=f"Missing values per feature (numbers: images; n = {len(df):,})",
        xlabel="Share of images (%)",
        xlim=(0, 110),
    )


Painter = Callable[[pd.DataFrame, object], None]


def figure_plan(schema: DatasetSchema, df: pd.DataFrame) -> dict[str, tuple[Painter, tuple[float, float]]]:
    """Figure file -> (painter, size in inches): the class figures, one per feature, the missing values."""
    plan: dict[str, tuple[Painter, tuple[float, float]]] = {
        "class_counts.png": (partial(_class_counts, schema), (9, 4.5)),
        "class_pie.png": (partial(_class_pie, schema), (10, 5.5)),
    }
    f = schema.features
    for column in f.numeric:
        plan[_file(column)] = (partial(_numeric_by_class, schema, column), (10, 5))
    for column in (*f.categorical, *f.boolean):
        if df[column].nunique() > MAX_STACKED:
            plan[_file(column)] = (partial(_heatmap_by_class, schema, column), (11, 8))
        else:
            plan[_file(column)] = (partial(_stacked_by_class, schema, column), (10, 4.5))
    if f.names:
        plan["missing_values.png"] = (partial(_missing, schema), (9, 1.5 + 0.35 * len(f.names)))
    return plan


def _file(column: str) -> str:
    """``<feature>_by_class.png`` with any character that is not safe in a file name replaced."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", column) + "_by_class.png"


def _save_figure(painter: Callable, df: pd.DataFrame, size: tuple[float, float], path: Path) -> None:
    """Draw one EDA figure and write it as PNG."""
    fig = new_figure(size, dpi=110)
    painter(df, fig.add_subplot())
    save_figure(fig, path, dpi="figure")


def run_eda(metadata: pd.DataFrame, out: str | Path, schema: DatasetSchema | None = None) -> dict:
    """Write the EDA figures, ``missing_values.csv`` and ``summary.json`` to ``out``; return the summary.

    ``schema`` (default: HAM10000) names the classes and the features drawn.
    """
    schema = schema or preset("ham10000")
    df = _check(metadata, schema)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(df, schema)
    for name, (painter, size) in figure_plan(schema, df).items():
        _save_figure(painter, df, size, out / name)
    with atomic_write(out / "missing_values.csv") as fh:
        pd.DataFrame(list(summary["missing"].items()), columns=["column", "count"]).to_csv(fh, index=False)
    write_json(out / "summary.json", summary)
    return summary
