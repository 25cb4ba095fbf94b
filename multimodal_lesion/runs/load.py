"""Loading a finished run folder: its config, schema, encoder, trained model and stored calibration.

A run loads on the device asked for (``--device``), whatever it was trained on: checkpoints are read
with ``map_location`` onto the CPU and moved from there, so a run trained on a GPU is used on a
CPU-only machine (with a note), never a CUDA deserialisation traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ExperimentConfig, replace
from ..data.encoder import MetadataEncoder
from ..data.schema import DatasetSchema
from ..errors import CheckpointError, ConfigError, note
from ..models import LesionModel, create_model
from ..models.inference import resolve_backend
from .checkpoints import load_model_state
from .folder import RunFolder
from .inputs import RunInputs, meta_layout, prepare_inputs, resolve_data, resolve_device


@dataclass
class LoadedRun:
    """A finished run folder, loaded: config, data, encoder, trained model and temperature."""

    folder: RunFolder
    inputs: RunInputs
    temperature: float

    @property
    def run_dir(self) -> Path:
        return self.folder.path


@dataclass
class LoadedModel:
    """A run's trained model without its dataset, with what predicting as the run was scored needs."""

    folder: RunFolder
    cfg: ExperimentConfig
    schema: DatasetSchema
    encoder: MetadataEncoder
    model: LesionModel
    device: torch.device
    temperature: float
    balanced: tuple[float, np.ndarray] | None  # (temperature, bias per class) of the balanced decision
    tta: bool  # whether the run was evaluated with flip TTA (metrics.json)

    def require_balanced(self) -> tuple[float, np.ndarray]:
        """The balanced decision; a run trained before it existed is a CheckpointError."""
        if self.balanced is None:
            raise CheckpointError(
                f"{self.folder.metrics_path}: no balanced decision in this run (trained before it "
                "existed); retrain, or predict without --balanced"
            )
        return self.balanced


def _load_weights(model: torch.nn.Module, folder: RunFolder) -> float:
    """Load ``best.pt`` into ``model`` (eval mode); returns the fitted temperature (1.0 if none)."""
    load_model_state(model, folder.load_best(), folder / "best.pt")
    model.eval()
    return folder.read_temperature()


def _device(cfg: ExperimentConfig, folder: RunFolder, asked: str | None = None) -> torch.device:
    """The device asked for (``--device``), else the run's; a GPU run is used on the CPU where there is none."""
    if asked == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch finds no CUDA GPU on this machine; use --device cpu (or auto)")
    if asked is not None and asked != "auto":
        return resolve_device(asked)
    if asked is None and cfg.train.device == "cuda" and not torch.cuda.is_available():
        note(f"{folder.path} was trained with train.device = 'cuda'; no GPU here, so it runs on the CPU")
        return torch.device("cpu")
    return resolve_device("auto" if asked == "auto" or cfg.train.device == "cuda" else cfg.train.device)


def _backend_on(cfg: ExperimentConfig, device: torch.device) -> ExperimentConfig:
    """``cfg`` with a ``train.embed_backend`` that runs on ``device``: an exported one (a CPU pass) is read as
    torch when the run is loaded on a GPU, so a run trained on a CPU computes missing embeddings or maps there
    eagerly (the same to 1e-3, one cache); ``auto`` (a hand-written config) is resolved.
    """
    t = cfg.train
    backend = resolve_backend(t.embed_backend, t.embed_precision, device) if device.type == "cpu" else "torch"
    return cfg if backend == t.embed_backend else replace(cfg, train={"embed_backend": backend})


def load_model(run_dir: str | Path, device: str | None = None) -> LoadedModel:
    """The trained model of a run without its dataset, on ``device`` (None: the run's own, see :func:`_device`)."""
    folder = RunFolder(run_dir)
    folder.check()
    cfg = folder.read_config()
    schema = folder.read_schema()
    encoder = folder.read_encoder()
    model = create_model(
        cfg.model.name,
        meta_dim=len(encoder.get_feature_names_out()),
        num_classes=schema.n_classes,
        cfg=replace(cfg, model={"weights": "none"}).model,
        meta_layout=meta_layout(encoder),
    )
    on = _device(cfg, folder, device)
    temperature = _load_weights(model, folder)  # weights are read onto the CPU (map_location), then moved
    model.to(on)
    return LoadedModel(
        folder,
        cfg,
        schema,
        encoder,
        model,
        on,
        temperature,
        _balanced(folder, schema),
        bool(folder.read_metrics().get("tta", False)),
    )


def load_run(
    run_dir: str | Path,
    data: str | Path | None = None,
    show: bool = False,
    device: str | None = None,
    data_settings: Mapping[str, Any] | None = None,
) -> LoadedRun:
    """Load a finished run folder with its data (optionally from another data root) on ``device``.

    ``data_settings`` override ``data.*`` settings of the run for reading it (``images``, ``drop_missing``).
    """
    folder = RunFolder(run_dir)
    folder.check()
    cfg = folder.read_config()
    if data is not None or data_settings:
        cfg = replace(cfg, data={**(data_settings or {}), **({"root": str(data)} if data is not None else {})})
    dataset = resolve_data(cfg, show, folder.read_schema())
    saved = folder.read_splits()
    splits = dataset.metadata[["image_id"]].merge(saved[["image_id", "split"]], on="image_id", how="left")
    splits["split"] = splits["split"].fillna("unassigned")
    on = _device(cfg, folder, device)
    cfg = _backend_on(cfg, on)
    inputs = prepare_inputs(
        replace(cfg, model={"weights": "none"}, train={"device": on.type}), dataset, splits, folder.read_encoder()
    )
    inputs.cfg = cfg
    return LoadedRun(folder, inputs, _load_weights(inputs.model, folder))


def _balanced(folder: RunFolder, schema: DatasetSchema) -> tuple[float, np.ndarray] | None:
    balanced = folder.read_balanced(schema.classes)
    if balanced is None:
        return None
    temperature, bias = balanced
    return temperature, np.array([bias[c] for c in schema.classes], dtype=np.float64)


def balanced_scaling(run_dir: str | Path) -> tuple[float, np.ndarray]:
    """(temperature, class biases) of the balanced decision that training fitted on val."""
    folder = RunFolder(run_dir)
    balanced = _balanced(folder, folder.read_schema())
    if balanced is None:
        raise CheckpointError(
            f"{folder.metrics_path}: no balanced decision in this run (trained before it "
            "existed); retrain, or predict without --balanced"
        )
    return balanced
