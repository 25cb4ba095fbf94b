"""The figures of the explanation report of a :class:`CohortExplanation` (``html.write_report`` renders them)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..explain.results import CaseExplanation, CohortExplanation
from ..io import safe_stem
from .explanation_figures import (
    age_maps_png,
    beeswarm_png,
    cohort_grid_png,
    metadata_map_png,
    modality_bar_png,
    modality_by_class_png,
    overlay_png,
    randomisation_png,
    rgb_png,
    shap_bar_png,
    waterfall_png,
)
from .html import ReportFigures
from .whatif_figure import plot_what_if


def draw_explanation_figures(out: str | Path, cohort: CohortExplanation) -> ReportFigures:
    """Draw every case's image, CAM overlays, SHAP waterfall and modality bars, and the cohort plots."""
    figures = ReportFigures(cases=draw_case_figures(out, cohort.cases, cohort.shap_values))
    figures.cohort = draw_cohort_figures(out, cohort)
    return figures


def draw_case_figures(
    out: str | Path, cases: Sequence[CaseExplanation], shap_values: Any | None
) -> dict[str, dict[str, Path | None]]:
    """Draw each case's image, CAM overlays, SHAP waterfall (row ``i`` of ``shap_values``) and modality
    bars into ``out/cases/assets``; returns image id -> figure name -> file."""
    out = Path(out)
    assets = out / "cases" / "assets"
    figures: dict[str, dict[str, Path | None]] = {}
    for i, case in enumerate(cases):
        stem = safe_stem(case.image_id)
        drawn: dict[str, Path | None] = {}
        if case.pixels is not None:
            drawn["image"] = rgb_png(case.pixels, assets / f"{stem}_image.png")
            if case.original_pixels is not None:  # colour constancy: the image as it was, beside the model's
                drawn["original"] = rgb_png(case.original_pixels, assets / f"{stem}_original.png")
            if case.cam is not None:
                drawn["overlay"] = overlay_png(
                    case.pixels, case.cam, assets / f"{stem}_overlay.png", f"explained: {case.target_class}", case.mask
                )
            if case.runner_up_cam is not None:
                drawn["runner_up"] = overlay_png(
                    case.pixels,
                    case.runner_up_cam,
                    assets / f"{stem}_runner_up.png",
                    f"runner-up: {case.runner_up_class}",
                    case.mask,
                )
            if case.cam is not None and case.cam_without_metadata is not None:
                drawn["metadata_map"] = metadata_map_png(
                    case.pixels,
                    case.cam,
                    case.cam_without_metadata,
                    assets / f"{stem}_metadata_map.png",
                    case.metadata_map_spearman,
                )
            if case.age_cams:
                own = case.patient.get("age", case.patient.get("age_approx", ""))
                drawn["age_maps"] = age_maps_png(case.pixels, case.age_cams, assets / f"{stem}_age_maps.png", own)
        if shap_values is not None:
            drawn["waterfall"] = waterfall_png(shap_values[i], assets / f"{stem}_waterfall.png", case.target_class)
        if case.modality:
            drawn["modality"] = modality_bar_png(case.modality, assets / f"{stem}_modality.png", case.target_class)
        if case.what_if is not None:
            drawn["what_if"] = plot_what_if(case.what_if, case.target_class, assets / f"{stem}_what_if.png")
        figures[case.image_id] = drawn
    return figures


def draw_cohort_figures(out: str | Path, cohort: CohortExplanation) -> dict[str, Path | None]:
    """Draw the cohort's plots (the grid of maps, randomisation, beeswarm, SHAP bars, modality shares)."""
    figures: dict[str, Path | None] = {}

    folder = Path(out) / "figures"
    if any(c.cam is not None and c.pixels is not None for c in cohort.cases):
        figures["cohort_grid"] = cohort_grid_png(cohort.cases, folder / "cohort_grid.png")
    if cohort.randomisation:
        figures["randomisation"] = randomisation_png(
            cohort.randomisation, cohort.random_logit, folder / "randomisation.png"
        )
    if cohort.shap_values is not None:
        figures["beeswarm"] = beeswarm_png(cohort.shap_values, folder / "beeswarm.png")
        figures["shap_bar"] = shap_bar_png(cohort.shap_values, folder / "shap_bar.png")
    if cohort.modality_share:
        figures["modality_by_class"] = modality_by_class_png(cohort.modality_share, folder / "modality_by_class.png")
    return figures
