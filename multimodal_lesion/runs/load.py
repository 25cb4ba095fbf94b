"""Loading a finished run folder: its config, encoder, trained model and fitted temperature."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ExperimentConfig, replace
from ..data.constants import CLASSES
from ..data.encoder import MetadataEncoder
from ..errors import CheckpointError, note
from ..models import LesionModel, create_model
from .checkpoints import load_model_state
from .folder import RunFolder
from .inputs import RunInputs, prepare_inputs, resolve_data, resolve_device


@dataclass
class LoadedRun:
    """A finished run folder, loaded: config, data, encoder, trained model and temperature."""

    folder: RunFolder
    inputs: RunInputs
    temperature: float

    @property
    def run_dir(self) -> Path:
        return self.folder.path


def _load_weights(model: torch.nn.Module, folder: RunFolder) -> float:
    """Load ``best.pt`` into ``model`` (eval mode); returns the fitted temperature (1.0 if none)."""
    load_model_state(model, folder.load_best(), folder / "best.pt")
    model.eval()
    return folder.read_temperature()


def _device(cfg: ExperimentConfig, folder: RunFolder) -> torch.device:
    """The run's device; a run trained on a GPU is used on the CPU where there is none (with a note)."""
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        note(f"{folder.path} was trained with train.device = 'cuda'; no GPU here, so it runs on the CPU")
        return torch.device("cpu")
    return resolve_device(cfg.train.device)


def load_model(run_dir: str | Path) -> tuple[ExperimentConfig, MetadataEncoder, LesionModel, float]:
    """The trained model of a run without its dataset: (config, encoder, model, temperature)."""
    folder = RunFolder(run_dir)
    folder.check()
    cfg = folder.read_config()
    encoder = folder.read_encoder()
    model = create_model(
        cfg.model.name,
        meta_dim=len(encoder.get_feature_names_out()),
        num_classes=len(CLASSES),
        cfg=replace(cfg, model={"weights": "none"}).model,
    )
    model.to(_device(cfg, folder))
    return cfg, encoder, model, _load_weights(model, folder)


def load_run(run_dir: str | Path, data: str | Path | None = None, show: bool = False) -> LoadedRun:
    """Load a finished run folder with its data (optionally from another data root)."""
    folder = RunFolder(run_dir)
    folder.check()
    cfg = folder.read_config()
    if data is not None:
        cfg = replace(cfg, data={"root": str(data)})
    ham = resolve_data(cfg, show)
    saved = folder.read_splits()
    splits = ham.metadata[["image_id"]].merge(saved[["image_id", "split"]], on="image_id", how="left")
    splits["split"] = splits["split"].fillna("unassigned")
    device = _device(cfg, folder)
    inputs = prepare_inputs(
        replace(cfg, model={"weights": "none"}, train={"device": device.type}), ham, splits, folder.read_encoder()
    )
    inputs.cfg = cfg
    return LoadedRun(folder, inputs, _load_weights(inputs.model, folder))


def balanced_scaling(run_dir: str | Path) -> tuple[float, np.ndarray]:
    """(temperature, class biases) of the balanced decision that training fitted on val."""
    folder = RunFolder(run_dir)
    balanced = folder.read_balanced()
    if balanced is None:
        raise CheckpointError(
            f"{folder.metrics_path}: no balanced decision in this run (trained before it "
            "existed); retrain, or predict without --balanced"
        )
    temperature, bias = balanced
    return temperature, np.array([bias[c] for c in CLASSES], dtype=np.float32)
