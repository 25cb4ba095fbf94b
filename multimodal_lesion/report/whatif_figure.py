"""The what-if figure of a case: its predicted class's probability across each patient feature's values."""

from __future__ import annotations

from pathlib import Path

from ..explain.whatif import WhatIf
from .figures import new_figure, save_figure


def plot_what_if(result: WhatIf, cls: str, path: str | Path) -> Path:
    """One panel per feature: age as an ICE curve, categories as bars; the case's own value marked."""
    features = list(result.values)
    fig = new_figure((3.2 * len(features), 2.8))
    axes = fig.subplots(1, len(features), sharey=True, squeeze=False)[0]
    for ax, feature in zip(axes, features, strict=True):
        values, curve = result.values[feature], result.curve(feature, cls)
        own = result.observed.get(feature)
        if feature == "age":
            ages = [float(v) for v in values]
            ax.plot(ages, curve, color="tab:blue")
            if own not in (None, "unknown"):
                ax.axvline(float(own), color="tab:red", ls=":", lw=1, label=f"this patient ({own})")
                ax.legend(fontsize=7, loc="best")
            ax.set(xlabel="age (years)")
        else:
            colours = ["tab:red" if v == own else "tab:blue" for v in values]
            ax.bar(range(len(values)), curve, color=colours)
            ax.set_xticks(range(len(values)), values, rotation=60, ha="right", fontsize=7)
            ax.set(xlabel=f"{feature} (red: this patient)")
        ax.set_ylim(0, 1)
    axes[0].set(ylabel=f"P({cls})")
    fig.suptitle(f"What if: P({cls}) as one patient feature changes, the image and the others fixed", fontsize=9)
    return save_figure(fig, path)
