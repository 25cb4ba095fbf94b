"""Exploratory data analysis of a HAM10000-shaped metadata table: counts, figures, missing values.

``run_eda(metadata, out)`` writes the two figures of the original project (``class_counts.png``,
``class_pie.png``), the patient-feature figures (``age_by_class.png``, ``sex_by_class.png``,
``localization_by_class.png``), ``missing_values.csv`` and ``summary.json``. Figures are drawn on
explicit Agg canvases (no pyplot, so no global backend switch and nothing left open) and every file
is written atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.constants import CLASS_NAMES, CLASSES, METADATA_COLUMNS, UNKNOWN
from ..errors import DataError
from ..io import atomic_write, write_json
from .figures import new_figure, save_figure

REQUIRED_COLUMNS = ("lesion_id", "image_id", "dx", "age", "sex", "localization")
#: Columns whose missing value is the string "unknown" rather than an empty cell.
UNKNOWN_COLUMNS = ("sex", "localization")
SEX_COLOURS = {"female": "#d95f02", "male": "#1b9e77", UNKNOWN: "#bbbbbb"}


def _check(metadata: pd.DataFrame) -> pd.DataFrame:
    """Validate the columns and dx values; return a copy with a numeric age."""
    missing = [c for c in REQUIRED_COLUMNS if c not in metadata.columns]
    if missing:
        raise DataError(f"EDA metadata lacks column(s) {', '.join(missing)}")
    unknown = sorted(set(metadata["dx"]) - set(CLASSES))
    if unknown:
        raise DataError(f"EDA metadata column dx has unknown value(s) {unknown[:5]}")
    df = metadata.copy()
    df["age"] = pd.to_numeric(df["age"], errors="coerce")
    for col in UNKNOWN_COLUMNS:
        df[col] = df[col].fillna(UNKNOWN).astype(str).str.lower().replace("", UNKNOWN)
    return df


def missing_counts(df: pd.DataFrame) -> dict[str, int]:
    """Missing values per official column: empty cells, and ``unknown`` for sex / localization."""
    counts = {}
    for col in (c for c in METADATA_COLUMNS if c in df.columns):
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if col in UNKNOWN_COLUMNS:
            empty |= df[col].astype(str).str.lower() == UNKNOWN
        counts[col] = int(empty.sum())
    return counts


def summarise(df: pd.DataFrame) -> dict:
    """The numbers of ``summary.json``; class counts in ``CLASSES`` order, zero classes included."""
    per_lesion = df.groupby("lesion_id").size()
    return {
        "n_images": len(df),
        "n_lesions": int(per_lesion.size),
        "n_lesions_with_several_images": int((per_lesion > 1).sum()),
        "class_counts": {c: int((df["dx"] == c).sum()) for c in CLASSES},
        "missing": missing_counts(df),
    }


def _label(dx: str) -> str:
    """Full class name for a figure, e.g. "Melanocytic nevi (nv)"."""
    return CLASS_NAMES[dx]


def _class_counts(df: pd.DataFrame, ax) -> None:
    """Horizontal bar chart of images per class, counts annotated."""
    counts = df["dx"].value_counts().reindex(CLASSES, fill_value=0)
    bars = ax.barh([_label(c) for c in CLASSES], counts.to_numpy(), color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:,}" for v in counts], padding=3)
    ax.invert_yaxis()
    ax.margins(x=0.12)
    ax.set(title=f"Images per diagnosis (n = {len(df):,})", xlabel="Number of images", ylabel="Diagnosis")


def _class_pie(df: pd.DataFrame, ax) -> None:
    """Pie of the class shares; names in a legend so small slices stay readable."""
    counts = df["dx"].value_counts().reindex(CLASSES, fill_value=0)
    share = counts / max(counts.sum(), 1) * 100
    wedges, _ = ax.pie(counts.to_numpy(), startangle=90, counterclock=False, wedgeprops={"edgecolor": "white"})
    ax.legend(
        wedges,
        [f"{_label(c)}: {share[c]:.1f}%" for c in CLASSES],
        title="Diagnosis",
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        frameon=False,
    )
    ax.set_title(f"Share of images per diagnosis (n = {len(df):,})")
    ax.axis("equal")


def _age_by_class(df: pd.DataFrame, ax) -> None:
    """Box plot of age per class; missing ages are left out and counted in the title."""
    data = [df.loc[(df["dx"] == c) & df["age"].notna(), "age"].to_numpy() for c in CLASSES]
    ax.boxplot(
        [d if d.size else np.array([np.nan]) for d in data],
        patch_artist=True,
        boxprops={"facecolor": "#c6dbef"},
        medianprops={"color": "black"},
    )
    ax.set_xticks(
        range(1, len(CLASSES) + 1),
        [f"{_label(c)}\nn = {d.size:,}" for c, d in zip(CLASSES, data, strict=True)],
        rotation=25,
        ha="right",
    )
    ax.set(
        title=f"Age by diagnosis ({int(df['age'].isna().sum())} images without age left out)",
        xlabel="Diagnosis",
        ylabel="Age (years)",
    )


def _sex_by_class(df: pd.DataFrame, ax) -> None:
    """Stacked percentage bars of sex within each class."""
    table = pd.crosstab(df["dx"], df["sex"]).reindex(index=CLASSES, fill_value=0)
    order = sorted(table.columns, key=lambda s: (list(SEX_COLOURS).index(s) if s in SEX_COLOURS else 9, s))
    share = table[order].div(table.sum(axis=1).replace(0, 1), axis=0) * 100
    left = np.zeros(len(CLASSES))
    for sex in order:
        ax.barh([_label(c) for c in CLASSES], share[sex], left=left, label=sex, color=SEX_COLOURS.get(sex, "#7570b3"))
        left += share[sex].to_numpy()
    ax.invert_yaxis()
    ax.legend(title="Sex", loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    ax.set(title="Sex by diagnosis", xlabel="Share of the diagnosis' images (%)", ylabel="Diagnosis", xlim=(0, 100))


def _localization_by_class(df: pd.DataFrame, ax) -> None:
    """Heatmap localization x class: colour = share of the class, numbers = image counts."""
    table = pd.crosstab(df["localization"], df["dx"]).reindex(columns=CLASSES, fill_value=0)
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
    ax.set_xticks(range(len(CLASSES)), [_label(c) for c in CLASSES], rotation=30, ha="right")
    ax.set_yticks(range(len(table.index)), table.index)
    ax.figure.colorbar(image, ax=ax, label="Share of the diagnosis' images (%)")
    ax.set(title="Localization by diagnosis (numbers: images)", xlabel="Diagnosis", ylabel="Localization")


#: Figure file -> (painter, size in inches).
FIGURES: dict[str, tuple[Callable[[pd.DataFrame, object], None], tuple[float, float]]] = {
    "class_counts.png": (_class_counts, (9, 4.5)),
    "class_pie.png": (_class_pie, (10, 5.5)),
    "age_by_class.png": (_age_by_class, (10, 5)),
    "sex_by_class.png": (_sex_by_class, (10, 4.5)),
    "localization_by_class.png": (_localization_by_class, (11, 8)),
}


def _save_figure(painter: Callable, df: pd.DataFrame, size: tuple[float, float], path: Path) -> None:
    """Draw one EDA figure and write it as PNG."""
    fig = new_figure(size, dpi=110)
    painter(df, fig.add_subplot())
    save_figure(fig, path, dpi="figure")


def run_eda(metadata: pd.DataFrame, out: str | Path) -> dict:
    """Write the EDA figures, ``missing_values.csv`` and ``summary.json`` to ``out``; return the summary."""
    df = _check(metadata)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(df)
    for name, (painter, size) in FIGURES.items():
        _save_figure(painter, df, size, out / name)
    with atomic_write(out / "missing_values.csv") as fh:
        pd.DataFrame(list(summary["missing"].items()), columns=["column", "count"]).to_csv(fh, index=False)
    write_json(out / "summary.json", summary)
    return summary
