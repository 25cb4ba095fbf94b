"""The run-folder contract: assemble a run's inputs, the files of a run folder, load a run, predict.

Training, evaluation, explanation, ablation and the benchmark all go through this package; nothing
else reads or writes the files of a run folder.
"""

from .batch import (
    Cases,
    adapt_to_cases,
    cases_in_csv,
    cases_in_folder,
    predict_arrays,
    predict_cases,
    predict_table,
    prediction_frame,
)
from .checkpoints import load_checkpoint, load_model_state, save_checkpoint
from .embeddings import cached_embeddings, compute_embeddings
from .folder import RunFolder, library_versions, write_provenance
from .inputs import (
    EpochLoader,
    RunInputs,
    class_targets,
    inputs_from_config,
    make_splits,
    prepare_inputs,
    resolve_data,
    resolve_device,
    seed_everything,
    synthetic_root,
    with_concrete_backend,
)
from .load import LoadedModel, LoadedRun, balanced_scaling, load_model, load_run
from .predict import (
    FITS,
    Case,
    CasePrediction,
    Fit,
    Predictor,
    Probabilities,
    aspect_differs,
    fit_image,
    predict_case,
    predict_image,
    predict_logits,
    to_device,
    tta_spread,
    view_probabilities,
)

__all__ = [
    "FITS",
    "Case",
    "CasePrediction",
    "Cases",
    "EpochLoader",
    "Fit",
    "LoadedModel",
    "LoadedRun",
    "Predictor",
    "Probabilities",
    "RunFolder",
    "RunInputs",
    "adapt_to_cases",
    "aspect_differs",
    "balanced_scaling",
    "cached_embeddings",
    "cases_in_csv",
    "cases_in_folder",
    "class_targets",
    "compute_embeddings",
    "fit_image",
    "inputs_from_config",
    "library_versions",
    "load_checkpoint",
    "load_model",
    "load_model_state",
    "load_run",
    "make_splits",
    "predict_arrays",
    "predict_case",
    "predict_cases",
    "predict_image",
    "predict_logits",
    "predict_table",
    "prediction_frame",
    "prepare_inputs",
    "resolve_data",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "synthetic_root",
    "to_device",
    "tta_spread",
    "view_probabilities",
    "with_concrete_backend",
    "write_provenance",
]
