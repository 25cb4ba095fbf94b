"""The what-if figure of a case: its predicted class's probability across each patient feature's values."""

from __future__ import annotations

from pathlib import Path

from ..explain.whatif import WhatIf
from .figures import new_figure, save_figure

#: Panels per row of the figure (a schema with 21 features wraps onto 4 rows).
PER_ROW = 6


def plot_what_if(result: WhatIf, cls: str, path: str | Path) -> Path:
    """One panel per feature: numbers (age) as an ICE curve, categories as bars; the case's own value marked."""
    features = list(result.values)
    rows, cols = -(-len(features) // PER_ROW), min(len(features), PER_ROW)
    fig = new_figure((3.2 * cols, 2.8 * rows))
    grid = fig.subplots(rows, cols, sharey=True, squeeze=False)
    for ax in grid.flat[len(features) :]:
        ax.set_visible(False)
    for ax, feature in zip(grid.flat, features, strict=False):
        values, curve = result.values[feature], result.curve(feature, cls)
        own = result.observed.get(feature)
        numbers = _numbers(values)
        if numbers is not None:
            ax.plot(numbers, curve, color="tab:blue")
            if own not in (None, "unknown") and _numbers([own]) is not None:
                ax.axvline(float(own), color="tab:red", ls=":", lw=1, label=f"this patient ({own})")
                ax.legend(fontsize=7, loc="best")
            ax.set(xlabel="age (years)" if feature == "age" else feature)
        else:
            colours = ["tab:red" if v == own else "tab:blue" for v in values]
            ax.bar(range(len(values)), curve, color=colours)
            ax.set_xticks(range(len(values)), values, rotation=60, ha="right", fontsize=7)
            ax.set(xlabel=f"{feature} (red: this patient)")
        ax.set_ylim(0, 1)
    for row in grid:
        row[0].set(ylabel=f"P({cls})")
    fig.suptitle(f"What if: P({cls}) as one patient feature changes, the image and the others fixed", fontsize=9)
    return save_figure(fig, path)


def _numbers(values: list[str]) -> list[float] | None:
    """The values as numbers when every one is a number (a numeric feature's grid), else None."""
    try:
        return [float(v) for v in values]
    except ValueError:
        return None
