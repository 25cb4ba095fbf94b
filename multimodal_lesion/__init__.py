"""Skin-lesion classification from a dermoscopic image and patient metadata, explained jointly.

The public API, for ``import multimodal_lesion as mml``::

    cfg = mml.load_config("concat", ["train.epochs=5"])   # a preset, a TOML file or the defaults
    run = mml.train(cfg, out="runs/concat")                # no data: the synthetic dataset
    run.metrics.to_frame()                                 # validation and test scores
    run.predict("lesion.jpg", age=55, sex="male", localization="back")
    run.explain(n=4, out="runs/concat-report")             # Grad-CAM + SHAP + modality report
    mml.load_run("runs/concat").evaluate(data="/data/isic2019", schema="isic2019")

Every name is imported on first use, so ``import multimodal_lesion`` (and ``mmlesion --help``) loads
neither torch nor timm nor shap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it (imported on first access).
_PUBLIC: dict[str, str] = {
    **{
        name: "multimodal_lesion.api"
        for name in (
            "AblationResult",
            "Attributions",
            "Embeddings",
            "Evaluation",
            "ExperimentConfig",
            "ExplanationReport",
            "Prediction",
            "Run",
            "RunMetrics",
            "ablate",
            "ablation_folds",
            "cache_home",
            "eda",
            "image_embeddings",
            "lesion_subset",
            "list_models",
            "list_presets",
            "load_config",
            "load_run",
            "read_dataset",
            "replace",
            "split",
            "synthetic_dataset",
            "train",
        )
    },
    "LesionDataset": "multimodal_lesion.data.dataset",
    "DatasetSchema": "multimodal_lesion.data.schema",
    "PLANTED": "multimodal_lesion.data.synthetic",
    "MMLesionError": "multimodal_lesion.errors",
    "ConfigError": "multimodal_lesion.errors",
    "DataError": "multimodal_lesion.errors",
    "group_draws": "multimodal_lesion.training.stats",
}

__all__ = [
    "PLANTED",
    "AblationResult",
    "Attributions",
    "ConfigError",
    "DataError",
    "DatasetSchema",
    "Embeddings",
    "Evaluation",
    "ExperimentConfig",
    "ExplanationReport",
    "LesionDataset",
    "MMLesionError",
    "Prediction",
    "Run",
    "RunMetrics",
    "__version__",
    "ablate",
    "ablation_folds",
    "cache_home",
    "eda",
    "group_draws",
    "image_embeddings",
    "lesion_subset",
    "list_models",
    "list_presets",
    "load_config",
    "load_run",
    "read_dataset",
    "replace",
    "split",
    "synthetic_dataset",
    "train",
]


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562), so importing the package stays instant."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'multimodal_lesion' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


if TYPE_CHECKING:
    from .api import (
        AblationResult,
        Attributions,
        Embeddings,
        Evaluation,
        ExperimentConfig,
        ExplanationReport,
        Prediction,
        Run,
        RunMetrics,
        ablate,
        ablation_folds,
        cache_home,
        eda,
        image_embeddings,
        lesion_subset,
        list_models,
        list_presets,
        load_config,
        load_run,
        read_dataset,
        replace,
        split,
        synthetic_dataset,
        train,
    )
    from .data.dataset import LesionDataset
    from .data.schema import DatasetSchema
    from .data.synthetic import PLANTED
    from .errors import ConfigError, DataError, MMLesionError
