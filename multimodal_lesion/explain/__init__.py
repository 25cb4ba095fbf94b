"""Explanations of a fused image + metadata model.

- :class:`GradCamExplainer`: where in the image (pytorch-grad-cam on the image branch, metadata bound,
  the same flips and temperature as the displayed probability).
- :class:`GroupShapExplainer`: which patient feature (exact grouped SHAP on the cached embedding).
- :func:`modality_shapley`: how much came from the image versus each patient feature.
- :mod:`.faithfulness`: whether the maps are faithful (deletion/insertion, ROAD, pointing game, energy
  inside the lesion), each paired against the mean training mask, a fitted centre prior and a smooth
  random map, with bootstrap CIs and verdicts.
- :mod:`.randomisation`: sanity checks that can fail (cascading model randomisation, random logit).
"""

from .faithfulness import (
    BaselineMaps,
    PairedComparison,
    baseline_maps,
    centre_map,
    compare_to_baselines,
    curve_auc,
    energy_inside,
    faithfulness_report,
    fit_centre_sigma,
    paired_comparison,
    perturbation_curve,
    pointing_game,
    random_map,
    road_scores,
    smooth_random_map,
)
from .gradcam import (
    CAM_METHODS,
    BoundMetadata,
    GradCamExplainer,
    LayerGeometry,
    ScoredMaps,
    layer_geometry,
    shown_view,
)
from .modality import GradientAttribution, ModalityAttribution, integrated_gradients, modality_shapley
from .randomisation import (
    RANDOMISERS,
    CamSetup,
    MapSimilarity,
    StageResult,
    cascading_randomisation,
    map_similarity,
    random_logit_check,
    randomisation_stages,
)
from .shap_groups import GroupShapExplainer

__all__ = [
    "CAM_METHODS",
    "RANDOMISERS",
    "BaselineMaps",
    "BoundMetadata",
    "CamSetup",
    "GradCamExplainer",
    "GradientAttribution",
    "GroupShapExplainer",
    "LayerGeometry",
    "MapSimilarity",
    "ModalityAttribution",
    "PairedComparison",
    "ScoredMaps",
    "StageResult",
    "baseline_maps",
    "cascading_randomisation",
    "centre_map",
    "compare_to_baselines",
    "curve_auc",
    "energy_inside",
    "faithfulness_report",
    "fit_centre_sigma",
    "integrated_gradients",
    "layer_geometry",
    "map_similarity",
    "modality_shapley",
    "paired_comparison",
    "perturbation_curve",
    "pointing_game",
    "random_logit_check",
    "random_map",
    "randomisation_stages",
    "road_scores",
    "shown_view",
    "smooth_random_map",
]
