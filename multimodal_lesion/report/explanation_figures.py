"""Figures of the explanation report: the case image, its Grad-CAM overlay, the SHAP waterfall, the
modality split, and the cohort's beeswarm / bar / modality-by-class plots (PNG, written atomically)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.constants import CLASS_NAMES
from ..io import atomic_write
from .figures import new_figure, save_figure

PLAYER_COLOURS = {"image": "#4c72b0", "age": "#dd8452", "sex": "#55a868", "localization": "#c44e52"}


def rgb_png(pixels: np.ndarray, path: str | Path) -> Path:
    """Save a uint8 (H, W, 3) image as PNG."""
    return _save_image(Image.fromarray(pixels), path)


def overlay_png(pixels: np.ndarray, cam: np.ndarray, path: str | Path, weight: float = 0.45) -> Path:
    """The Grad-CAM map (H, W in [0, 1]) over the image, jet colour map (pytorch-grad-cam's overlay)."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = pixels.astype(np.float32) / 255.0
    return _save_image(Image.fromarray(show_cam_on_image(rgb, cam, use_rgb=True, image_weight=1 - weight)), path)


def _save_image(img: Image.Image, path: str | Path) -> Path:
    with atomic_write(path, "wb") as fh:
        img.save(fh, format="PNG")
    return Path(path)


def _pyplot_png(draw, path: str | Path, size: tuple[float, float]) -> Path:
    """Run a shap plotting call (which draws on pyplot's current figure) and save that figure."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=size)
    try:
        draw()
        fig = plt.gcf()
        fig.set_size_inches(*size)
        fig.tight_layout()
        return save_figure(fig, path, dpi=100)
    finally:
        plt.close("all")


def waterfall_png(explanation: Any, path: str | Path, target: str) -> Path:
    """shap's waterfall of one case: base value -> each patient feature -> the explained probability."""
    import shap

    def draw() -> None:
        shap.plots.waterfall(explanation, show=False)
        import matplotlib.pyplot as plt

        plt.title(f"Patient features: P({CLASS_NAMES.get(target, target)})", fontsize=10)

    return _pyplot_png(draw, path, (6.0, 3.2))


def beeswarm_png(explanation: Any, path: str | Path) -> Path:
    """shap's beeswarm over every explained case (values of each case's explained class)."""
    import shap

    return _pyplot_png(lambda: shap.plots.beeswarm(explanation, show=False, color_bar=False), path, (6.5, 3.2))


def shap_bar_png(explanation: Any, path: str | Path) -> Path:
    """shap's bar plot of mean |SHAP| per patient feature."""
    import shap

    return _pyplot_png(lambda: shap.plots.bar(explanation, show=False), path, (6.0, 3.0))


def modality_bar_png(values: Mapping[str, float], path: str | Path, target: str) -> Path:
    """Horizontal bars of the image / age / sex / localization Shapley values of one case."""
    fig = new_figure((6.0, 2.8))
    ax = fig.subplots()
    names = list(values)
    vals = [values[n] for n in names]
    ax.barh(names[::-1], vals[::-1], color=[PLAYER_COLOURS.get(n, "#888888") for n in names[::-1]])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"Shapley value (change in P({target}))")
    ax.set_title("Where this prediction came from: image vs patient features")
    return save_figure(fig, path)


def modality_by_class_png(shares: Mapping[str, Mapping[str, float]], path: str | Path) -> Path:
    """Stacked bars: share of |attribution| per player for each explained class (and all cases)."""
    fig = new_figure((7.0, 3.4))
    ax = fig.subplots()
    labels = list(shares)
    left = np.zeros(len(labels))
    players = list(next(iter(shares.values()))) if shares else []
    for player in players:
        width = np.array([shares[k].get(player, 0.0) for k in labels])
        ax.barh(labels, width, left=left, color=PLAYER_COLOURS.get(player, "#888888"), label=player)
        left += width
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of |Shapley value|")
    ax.set_ylabel("explained class")
    ax.set_title("Image versus patient features, per explained class")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)
