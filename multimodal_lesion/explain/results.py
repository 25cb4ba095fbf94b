"""Typed results of an explanation run: what explain computes and the report draws.

``explanations.json`` is :meth:`CohortExplanation.to_json`; the pixels, the maps and the shap
``Explanation`` object travel in memory only (the maps are saved beside the JSON as ``.npy``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class CaseExplanation:
    """One explained case: its prediction, patient, SHAP and modality values, faithfulness and map."""

    image_id: str
    target_class: str  # the explained class (the predicted one)
    probabilities: dict[str, float]  # calibrated, per class
    true_label: str | None = None  # None when unknown
    patient: dict[str, str] = field(default_factory=dict)  # feature -> value as shown
    shap: dict[str, float] = field(default_factory=dict)  # patient feature group -> SHAP value
    shap_base_value: float | None = None
    model_output: float | None = None  # the explained output: base + sum of SHAP
    modality: dict[str, float] = field(default_factory=dict)  # image / patient features -> Shapley value
    modality_base_value: float | None = None
    faithfulness: dict[str, float | bool] = field(default_factory=dict)
    cam_file: str | None = None  # the saved map, relative to the report folder
    pixels: np.ndarray | None = field(default=None, repr=False)  # uint8 (H, W, 3) as the model saw it
    cam: np.ndarray | None = field(default=None, repr=False)  # (H, W) in [0, 1]

    def to_json(self) -> dict[str, Any]:
        """The case's entry of ``explanations.json``."""
        return {
            "image_id": self.image_id,
            "true_label": self.true_label,
            "target_class": self.target_class,
            "probabilities": self.probabilities,
            "shap": self.shap,
            "shap_base_value": self.shap_base_value,
            "model_output": self.model_output,
            "modality": self.modality,
            "modality_base_value": self.modality_base_value,
            "faithfulness": self.faithfulness,
            "cam": self.cam_file,
            "patient": self.patient,
        }


@dataclass(frozen=True)
class FaithfulnessRow:
    """One faithfulness metric: the CAM's mean and its baselines' (None where a baseline does not apply)."""

    metric: str
    cam: float | bool | None
    random: float | bool | None = None
    centre: float | bool | None = None
    note: str = ""


@dataclass
class CohortExplanation:
    """Every explained case of a run with the cohort's summaries and the provenance of the numbers."""

    title: str
    provenance: dict[str, str]
    cases: list[CaseExplanation]
    mean_abs_shap: dict[str, dict[str, float]] = field(default_factory=dict)  # class (and "all") -> feature
    modality_share: dict[str, dict[str, float]] = field(default_factory=dict)  # class (and "all") -> player
    faithfulness: list[FaithfulnessRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    shap_values: Any = field(default=None, repr=False)  # shap.Explanation over the cases (cohort plots)

    def to_json(self) -> dict[str, Any]:
        """The content of ``explanations.json``."""
        return {
            "provenance": self.provenance,
            "timings_seconds": self.timings,
            "cases": [c.to_json() for c in self.cases],
        }
