"""Explanations of a fused image + metadata model.

- :class:`GradCamExplainer`: where in the image (pytorch-grad-cam on the image branch, metadata bound).
- :class:`GroupShapExplainer`: which patient feature (exact grouped SHAP on the cached embedding).
- :func:`modality_shapley`: how much came from the image versus each patient feature.
- :mod:`.faithfulness`: whether the maps are faithful (deletion/insertion, pointing game,
  energy inside the lesion, model randomisation), each against random and centre baselines.
"""

from .faithfulness import (
    centre_map,
    curve_auc,
    energy_inside,
    faithfulness_report,
    perturbation_curve,
    pointing_game,
    random_map,
    randomisation_check,
    randomised_cams,
    randomised_copy,
)
from .gradcam import CAM_METHODS, BoundMetadata, GradCamExplainer
from .modality import GradientAttribution, ModalityAttribution, integrated_gradients, modality_shapley
from .shap_groups import GroupShapExplainer

__all__ = [
    "CAM_METHODS",
    "BoundMetadata",
    "GradCamExplainer",
    "GradientAttribution",
    "GroupShapExplainer",
    "ModalityAttribution",
    "centre_map",
    "curve_auc",
    "energy_inside",
    "faithfulness_report",
    "integrated_gradients",
    "modality_shapley",
    "perturbation_curve",
    "pointing_game",
    "random_map",
    "randomisation_check",
    "randomised_cams",
    "randomised_copy",
]
