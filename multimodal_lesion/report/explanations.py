"""The figures of the explanation report of a :class:`CohortExplanation` (``html.write_report`` renders them)."""

from __future__ import annotations

from pathlib import Path

from ..explain.results import CohortExplanation
from ..io import safe_stem
from .explanation_figures import (
    beeswarm_png,
    modality_bar_png,
    modality_by_class_png,
    overlay_png,
    rgb_png,
    shap_bar_png,
    waterfall_png,
)
from .html import ReportFigures


def draw_explanation_figures(out: str | Path, cohort: CohortExplanation) -> ReportFigures:
    """Draw every case's image, CAM overlay, SHAP waterfall and modality bars, and the cohort plots."""
    out = Path(out)
    assets = out / "cases" / "assets"
    figures = ReportFigures()
    for i, case in enumerate(cohort.cases):
        stem = safe_stem(case.image_id)
        drawn: dict[str, Path | None] = {}
        if case.pixels is not None:
            drawn["image"] = rgb_png(case.pixels, assets / f"{stem}_image.png")
            if case.cam is not None:
                drawn["overlay"] = overlay_png(case.pixels, case.cam, assets / f"{stem}_overlay.png")
        if cohort.shap_values is not None:
            drawn["waterfall"] = waterfall_png(
                cohort.shap_values[i], assets / f"{stem}_waterfall.png", case.target_class
            )
        if case.modality:
            drawn["modality"] = modality_bar_png(case.modality, assets / f"{stem}_modality.png", case.target_class)
        figures.cases[case.image_id] = drawn
    folder = out / "figures"
    if cohort.shap_values is not None:
        figures.cohort["beeswarm"] = beeswarm_png(cohort.shap_values, folder / "beeswarm.png")
        figures.cohort["shap_bar"] = shap_bar_png(cohort.shap_values, folder / "shap_bar.png")
    if cohort.modality_share:
        figures.cohort["modality_by_class"] = modality_by_class_png(
            cohort.modality_share, folder / "modality_by_class.png"
        )
    return figures
