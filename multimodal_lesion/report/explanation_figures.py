"""Figures of the explanation report: the case image, its Grad-CAM overlays (explained and runner-up
class, lesion contour where there is a mask), the SHAP waterfall, the modality split, and the cohort's
thumbnail grid, beeswarm / bar / modality-by-class plots and randomisation curve (PNG, written atomically)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.constants import CLASS_NAMES
from ..explain.randomisation import SIMILAR, StageResult
from ..explain.results import CaseExplanation
from .figures import new_figure, save_figure
from .panels import SIDE, Bar, Panel, colours, compose, save_png, scaled, with_contour

#: The image's colour, then the patient features' in the run's feature order (repeating past the end).
IMAGE_COLOUR = "#4c72b0"
FEATURE_COLOURS = ("#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")


def player_colours(players: Sequence[str]) -> dict[str, str]:
    """A colour per player: the image its own, each patient feature the next of :data:`FEATURE_COLOURS`."""
    features = [p for p in players if p != "image"]
    colours = {p: FEATURE_COLOURS[i % len(FEATURE_COLOURS)] for i, p in enumerate(features)}
    return {p: IMAGE_COLOUR if p == "image" else colours[p] for p in players}


def rgb_png(pixels: np.ndarray, path: str | Path) -> Path:
    """Save a uint8 (H, W, 3) image as PNG."""
    return save_png(Image.fromarray(pixels), path)


def _overlay(pixels: np.ndarray, cam: np.ndarray, weight: float = 0.45) -> np.ndarray:
    """The map (H, W in [0, 1]) over the image, jet colour map (pytorch-grad-cam's overlay), uint8."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = pixels.astype(np.float32) / 255.0
    return show_cam_on_image(rgb, cam, use_rgb=True, image_weight=1 - weight)


def _contour(ax: Any, mask: np.ndarray | None) -> None:
    if mask is not None and mask.any() and not mask.all():
        ax.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=1.2)


CAM_BAR = Bar("jet", 0.0, 1.0, "CAM (scaled)")


def overlay_png(
    pixels: np.ndarray, cam: np.ndarray, path: str | Path, title: str = "", mask: np.ndarray | None = None
) -> Path:
    """The Grad-CAM map over the image with a colour bar and the lesion's contour (white) when known."""
    return compose([Panel(with_contour(scaled(_overlay(pixels, cam)), mask), title, CAM_BAR)], path)


def metadata_map_png(
    pixels: np.ndarray,
    with_metadata: np.ndarray,
    without_metadata: np.ndarray,
    path: str | Path,
    spearman: float | None = None,
) -> Path:
    """Three panels: the CAM with the case's metadata, with every feature absent, and their difference
    (red: the metadata raises the map, blue: it lowers it), headed with the rank correlation."""
    difference = colours("RdBu_r", (np.asarray(with_metadata) - np.asarray(without_metadata) + 1) / 2)
    rho = "undefined" if spearman is None or not np.isfinite(spearman) else f"{spearman:.3f}"
    panels = [
        Panel(scaled(_overlay(pixels, with_metadata)), "with the patient's metadata"),
        Panel(scaled(_overlay(pixels, without_metadata)), "every patient feature absent", Bar("jet", 0, 1, "CAM")),
        Panel(scaled(difference), "difference (with - without)", Bar("RdBu_r", -1, 1, "with - without")),
    ]
    return compose(panels, path, f"Spearman rank correlation of the two maps over pixels: {rho}")


def age_maps_png(pixels: np.ndarray, maps: Mapping[str, np.ndarray], path: str | Path, observed: str = "") -> Path:
    """The CAM at each age of ``maps`` (age -> map), side by side; the patient's own age in the heading."""
    side = max(160, SIDE - 40 * max(len(maps) - 3, 0))  # four or five maps stay about a page wide
    panels = [Panel(scaled(_overlay(pixels, cam), side), f"age {age}") for age, cam in maps.items()]
    return compose(panels, path, f"this patient's age: {observed}" if observed else "")


def cohort_grid_png(cases: Sequence[CaseExplanation], path: str | Path, per_row: int = 4) -> Path:
    """Thumbnails of every case with a map: the image and its CAM, the lesion contour where there is a
    mask, titled with the selection, truth, prediction and probability; one shared colour bar."""
    import matplotlib as mpl

    shown = [c for c in cases if c.pixels is not None and c.cam is not None]
    rows = max(1, -(-len(shown) // per_row))
    fig = new_figure((2.2 * 2 * per_row, 2.0 * rows + 0.4))
    axes = np.atleast_2d(fig.subplots(rows, 2 * per_row, squeeze=False))
    for ax in axes.ravel():
        ax.set_axis_off()
    for k, case in enumerate(shown):
        left, right = axes[k // per_row, 2 * (k % per_row)], axes[k // per_row, 2 * (k % per_row) + 1]
        left.imshow(case.pixels)
        right.imshow(_overlay(case.pixels, case.cam))  # type: ignore[arg-type]
        for ax in (left, right):
            _contour(ax, case.mask)
        p = case.probabilities.get(case.target_class, float("nan"))
        left.set_title(f"{case.selection}: {case.true_label} → {case.target_class}", fontsize=7)
        right.set_title(f"CAM, p = {'<0.001' if p < 1e-3 else f'{p:.3f}'}", fontsize=7)
    fig.colorbar(mpl.cm.ScalarMappable(mpl.colors.Normalize(0, 1), "jet"), ax=axes, shrink=0.6, label="CAM (scaled)")
    return save_figure(fig, path, dpi=90)


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
    """Horizontal bars of the Shapley values of the image and each patient feature of one case."""
    fig = new_figure((6.0, 2.8))
    ax = fig.subplots()
    names = list(values)
    vals = [values[n] for n in names]
    colours = player_colours(names)
    ax.barh(names[::-1], vals[::-1], color=[colours[n] for n in names[::-1]])
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"Shapley value (change in P({target}))")
    ax.set_title("Where this prediction came from: image vs patient features")
    return save_figure(fig, path)


def randomisation_png(stages: Sequence[StageResult], random_logit: StageResult | None, path: str | Path) -> Path:
    """Cascading randomisation: mean Spearman and SSIM of each stage's maps with the trained maps, from
    the head down; stages where most randomised models were invalid are marked with a red cross."""
    fig = new_figure((7.5, 3.4))
    ax = fig.subplots()
    x = np.arange(len(stages))
    for attr, colour in (("spearman", "#4c72b0"), ("ssim", "#dd8452")):
        ax.plot(x, [getattr(s, attr) for s in stages], "o-", color=colour, label=attr if attr == "ssim" else "Spearman")
    invalid = [i for i, s in enumerate(stages) if s.verdict == "invalid"]
    if invalid:
        ax.plot(
            invalid,
            [0.0] * len(invalid),
            "x",
            color="#b3452f",
            ms=10,
            mew=2,
            label="invalid (dead model / constant map)",
        )
    if random_logit is not None and random_logit.n_valid:
        ax.axhline(random_logit.spearman, color="#55a868", ls=":", label="random logit (Spearman)")
    ax.axhline(SIMILAR, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, [s.stage for s in stages], rotation=40, ha="right", fontsize=8)
    ax.set_ylim(-0.3, 1.05)
    ax.set_ylabel("similarity to the trained map")
    ax.set_xlabel("randomised down to (cumulative, from the head)")
    ax.set_title("Cascading model randomisation")
    ax.legend(fontsize=7, loc="upper right")
    return save_figure(fig, path)


def modality_by_class_png(shares: Mapping[str, Mapping[str, float]], path: str | Path) -> Path:
    """Stacked bars: share of |attribution| per player for each explained class (and all cases)."""
    fig = new_figure((7.0, 3.4))
    ax = fig.subplots()
    labels = list(shares)
    left = np.zeros(len(labels))
    players = list(next(iter(shares.values()))) if shares else []
    colours = player_colours(players)
    for player in players:
        width = np.array([shares[k].get(player, 0.0) for k in labels])
        ax.barh(labels, width, left=left, color=colours[player], label=player)
        left += width
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of |Shapley value|")
    ax.set_ylabel("explained class")
    ax.set_title("Image versus patient features, per explained class")
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)
