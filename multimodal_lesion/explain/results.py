"""Typed results of an explanation run: what explain computes and the report draws.

``explanations.json`` is :meth:`CohortExplanation.to_json`; the pixels, the maps and the shap
``Explanation`` object travel in memory only (the maps are saved beside the JSON as ``.npy``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .faithfulness import PairedComparison
from .randomisation import StageResult
from .whatif import WhatIf


@dataclass
class CaseExplanation:
    """One explained case: its prediction, patient, SHAP and modality values, faithfulness and maps."""

    image_id: str
    target_class: str  # the explained class (the predicted one)
    probabilities: dict[str, float]  # calibrated, per class: the displayed prediction
    true_label: str | None = None  # None when unknown
    selection: str = ""  # why the case was picked: correct | error | least confident | named
    explained_probability: float | None = None  # the explained class's probability in the CAM's own pass
    patient: dict[str, str] = field(default_factory=dict)  # feature -> value as shown
    shap: dict[str, float] = field(default_factory=dict)  # patient feature group -> SHAP value
    shap_error: dict[str, float] = field(default_factory=dict)  # -> background sampling error (bootstrap sd)
    shap_base_value: float | None = None
    model_output: float | None = None  # the explained output: base + sum of SHAP
    modality: dict[str, float] = field(default_factory=dict)  # image / patient features -> Shapley value
    modality_error: dict[str, float] = field(default_factory=dict)
    modality_base_value: float | None = None
    faithfulness: dict[str, float | bool] = field(default_factory=dict)
    runner_up_class: str | None = None  # the second most probable class, mapped too
    prediction_sets: dict[str, list[str]] = field(default_factory=dict)  # level -> classes (conformal, fitted on val)
    tta_spread: float | None = None  # sd over the image's flips of the predicted class's probability
    shift: dict[str, float | bool] | None = None  # the shift alarm: shift_score, shift_p, out_of_distribution, level
    embedding: np.ndarray | None = field(default=None, repr=False)  # (F,) the image embedding the head read
    what_if: WhatIf | None = None  # the prediction across each patient feature's values
    cam_file: str | None = None  # the saved map, relative to the report folder
    pixels: np.ndarray | None = field(default=None, repr=False)  # uint8 (H, W, 3) as the model saw it
    original_pixels: np.ndarray | None = field(default=None, repr=False)  # uint8 as it was, before colour constancy
    cam: np.ndarray | None = field(default=None, repr=False)  # (H, W) in [0, 1]
    runner_up_cam: np.ndarray | None = field(default=None, repr=False)  # (H, W) in [0, 1]
    mask: np.ndarray | None = field(default=None, repr=False)  # (H, W) bool lesion mask, when the data has one
    metadata_map_spearman: float | None = None  # rank correlation of the CAM with and without the metadata
    fusion: str = ""  # where the model meets the metadata: maps | late | image only
    cam_without_metadata: np.ndarray | None = field(default=None, repr=False)  # (H, W): every feature absent
    cam_without_metadata_file: str | None = None  # its saved map, relative to the report folder
    age_cams: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # age -> (H, W) map at that age

    def to_json(self) -> dict[str, Any]:
        """The case's entry of ``explanations.json``."""
        return {
            "image_id": self.image_id,
            "true_label": self.true_label,
            "target_class": self.target_class,
            "selection": self.selection,
            "probabilities": self.probabilities,
            "explained_probability": self.explained_probability,
            "shap": self.shap,
            "shap_error": self.shap_error,
            "shap_base_value": self.shap_base_value,
            "model_output": self.model_output,
            "modality": self.modality,
            "modality_error": self.modality_error,
            "modality_base_value": self.modality_base_value,
            "faithfulness": self.faithfulness,
            "runner_up_class": self.runner_up_class,
            "prediction_sets": self.prediction_sets,
            "tta_spread": self.tta_spread,
            "shift": self.shift,
            "what_if": None if self.what_if is None else self.what_if.to_json(),
            "cam": self.cam_file,
            "metadata_on_map": self.metadata_on_map(),
            "patient": self.patient,
        }

    def metadata_on_map(self) -> dict[str, Any] | None:
        """What the metadata does to the map, JSON-ready: the rank correlation (None when undefined) of the
        CAM with the case's metadata and with every feature absent, that map's file and the fusion kind."""
        if self.cam_without_metadata is None and self.cam_without_metadata_file is None:
            return None
        rho = self.metadata_map_spearman
        return {
            "spearman": None if rho is None or not np.isfinite(rho) else float(rho),
            "cam_without_metadata": self.cam_without_metadata_file,
            "fusion": self.fusion,
        }


@dataclass(frozen=True)
class FaithfulnessRow:
    """One faithfulness measure: the CAM's mean and each baseline's (by name) over the same cases."""

    metric: str
    cam: float | bool | None
    baselines: dict[str, float | None] = field(default_factory=dict)
    note: str = ""


@dataclass
class CohortExplanation:
    """Every explained case of a run with the cohort's summaries and the provenance of the numbers."""

    title: str
    provenance: dict[str, str]
    cases: list[CaseExplanation]
    mean_abs_shap: dict[str, dict[str, float]] = field(default_factory=dict)  # class (and "all") -> feature
    modality_share: dict[str, dict[str, float]] = field(default_factory=dict)  # class (and "all") -> player
    class_counts: dict[str, int] = field(default_factory=dict)  # explained class (and "all") -> cases
    faithfulness: list[FaithfulnessRow] = field(default_factory=list)
    comparisons: list[PairedComparison] = field(default_factory=list)  # CAM minus each baseline, paired
    randomisation: list[StageResult] = field(default_factory=list)  # cascading, from the head down
    random_logit: StageResult | None = None
    shap_scale: str = "probability"
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    shap_values: Any = field(default=None, repr=False)  # shap.Explanation over the cases (cohort plots)
    classes: list[str] = field(default_factory=list)  # the run's classes in logit order (report rows)
    class_names: dict[str, str] = field(default_factory=dict)  # class code -> long name
    fusion: str = ""  # where the model meets the metadata: maps | late | image only
    metadata_map_spearman: dict[str, float] = field(default_factory=dict)  # class (and "all") -> mean rank corr.

    def to_json(self) -> dict[str, Any]:
        """The content of ``explanations.json``."""
        return {
            "provenance": self.provenance,
            "timings_seconds": self.timings,
            "shap_scale": self.shap_scale,
            "comparisons": [asdict(c) for c in self.comparisons],
            "metadata_on_map": {
                "fusion": self.fusion,
                "mean_spearman": {k: None if not np.isfinite(v) else v for k, v in self.metadata_map_spearman.items()},
            },
            "randomisation": [stage_json(s) for s in self.randomisation],
            "random_logit": stage_json(self.random_logit) if self.random_logit is not None else None,
            "cases": [c.to_json() for c in self.cases],
        }


def stage_json(stage: StageResult) -> dict[str, Any]:
    """A randomisation stage's summary and per-case similarities, JSON-ready (NaN as None)."""

    def num(x: float) -> float | None:
        return None if np.isnan(x) else float(x)

    return {
        "stage": stage.stage,
        "verdict": stage.verdict,
        "spearman": num(stage.spearman),
        "ssim": num(stage.ssim),
        "n": len(stage.cases),
        "n_valid": stage.n_valid,
        "invalid": stage.reasons(),
        "cases": [
            {"spearman": num(c.spearman), "ssim": num(c.ssim), "valid": c.valid, "reason": c.reason}
            for c in stage.cases
        ],
    }
