"""The files of a run folder and their names: the only code that reads or writes them.

A run folder holds everything needed to reuse a model: the resolved ``config.toml``, ``splits.csv``,
the fitted metadata encoder (``encoder.json``), the checkpoints (``last.pt`` to resume, ``best.pt``
the kept weights), ``history.csv``, ``metrics.json``, ``predictions_<split>.csv``, ``figures/`` and
``versions.json``. ``mmlesion evaluate`` writes the same files of one split under ``eval/<split>/``.
"""

from __future__ import annotations

import csv
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import ExperimentConfig, load_config, to_toml
from ..data.encoder import MetadataEncoder
from ..errors import CheckpointError, DataError
from ..io import atomic_write, read_json, remove_stale_temps, write_json
from .checkpoints import load_checkpoint, save_checkpoint

CONFIG = "config.toml"
SPLITS = "splits.csv"
ENCODER = "encoder.json"
BEST = "best.pt"
LAST = "last.pt"
HISTORY = "history.csv"
METRICS = "metrics.json"
VERSIONS = "versions.json"
FIGURES = "figures"
EVAL = "eval"
#: The files without which a folder is not a finished run.
REQUIRED = (CONFIG, SPLITS, ENCODER, BEST)
HISTORY_FIELDS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_balanced_accuracy",
    "val_macro_auroc",
    "lr",
    "seconds",
    "images_per_s",
)
LIBRARIES = (
    "multimodal_lesion",
    "torch",
    "torchvision",
    "timm",
    "numpy",
    "pandas",
    "scikit-learn",
    "shap",
    "captum",
    "grad-cam",
)


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def write_provenance(folder: Path, cfg: ExperimentConfig, **machine: Any) -> None:
    """The resolved ``config.toml`` and ``versions.json`` (libraries + ``machine``) of any result folder."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / CONFIG) as fh:
        fh.write(to_toml(cfg))
    write_json(folder / VERSIONS, {**library_versions(), **machine})


@dataclass(frozen=True)
class RunFolder:
    """One run folder (or one ``eval/<split>`` folder inside it) and the files in it."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # --- writing ------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the folder and remove temp files that a killed process left behind."""
        if self.path.is_dir():
            remove_stale_temps(self.path)
        self.path.mkdir(parents=True, exist_ok=True)

    def write_inputs(
        self, cfg: ExperimentConfig, splits: pd.DataFrame, encoder: MetadataEncoder, **machine: Any
    ) -> None:
        """What a run was trained from: config, split, fitted encoder and the library versions."""
        write_provenance(self.path, cfg, **machine)
        with atomic_write(self.path / SPLITS) as fh:
            splits.to_csv(fh, index=False)
        write_json(self.path / ENCODER, encoder.to_json())

    def save_last(self, state: dict[str, Any]) -> None:
        """Everything needed to resume (``last.pt``), written atomically."""
        save_checkpoint(state, self.path / LAST)

    def save_best(self, weights: dict[str, Any], epoch: int) -> None:
        """The kept weights (``best.pt``) and the epoch they come from."""
        save_checkpoint({"model": weights, "epoch": epoch}, self.path / BEST)

    def write_history(self, history: Sequence[dict[str, float]]) -> None:
        with atomic_write(self.path / HISTORY) as fh:
            writer = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS)
            writer.writeheader()
            writer.writerows(history)

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        return write_json(self.path / METRICS, metrics)

    def write_predictions(
        self, split: str, ids: Sequence[str], targets: Sequence[str], probs: np.ndarray, classes: Sequence[str]
    ) -> Path:
        """``predictions_<split>.csv``: image id, true class and one probability column per class."""
        df = pd.DataFrame(probs, columns=[f"p_{c}" for c in classes])
        df.insert(0, "target", list(targets))
        df.insert(0, "image_id", list(ids))
        path = self.path / f"predictions_{split}.csv"
        with atomic_write(path) as fh:
            df.to_csv(fh, index=False)
        return path

    def figure(self, name: str) -> Path:
        """Where a figure of this folder goes (``figures/<name>``); the folder is created."""
        folder = self.path / FIGURES
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    def evaluation(self, split: str) -> RunFolder:
        """The folder that ``mmlesion evaluate`` writes for one split: ``eval/<split>``."""
        return RunFolder(self.path / EVAL / split)

    # --- reading ------------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise a CheckpointError naming what is missing unless this is a finished run folder."""
        missing = [f for f in REQUIRED if not (self.path / f).is_file()]
        if not self.path.is_dir() or missing:
            raise CheckpointError(f"{self.path}: not a run folder (missing {', '.join(missing) or 'folder'})")

    def has_last(self) -> bool:
        return (self.path / LAST).is_file()

    def read_config(self) -> ExperimentConfig:
        return load_config(self.path / CONFIG)

    def read_splits(self) -> pd.DataFrame:
        return _guarded(self.path / SPLITS, lambda p: pd.read_csv(p, dtype={"image_id": str}))

    def read_encoder(self) -> MetadataEncoder:
        return _guarded(self.path / ENCODER, lambda p: MetadataEncoder.from_json(read_json(p)))

    def read_metrics(self) -> dict[str, Any]:
        """``metrics.json``, or {} when the run has none yet."""
        path = self.path / METRICS
        return _guarded(path, read_json) if path.is_file() else {}

    def load_last(self) -> dict[str, Any]:
        return load_checkpoint(self.path / LAST)

    def load_best(self) -> dict[str, Any]:
        """The kept weights of ``best.pt`` (a state dict); anything else is a CheckpointError."""
        ckpt = load_checkpoint(self.path / BEST)
        if not isinstance(ckpt, dict) or "model" not in ckpt:
            raise CheckpointError(f"{self.path / BEST}: not a multimodal_lesion checkpoint")
        return ckpt["model"]


def _guarded(path: Path, read: Any) -> Any:
    """Read one run file; a damaged or unreadable one is a one-line DataError naming it."""
    try:
        return read(path)
    except DataError as exc:
        raise DataError(f"{path}: not readable ({exc})") from None
    except (OSError, ValueError, KeyError, TypeError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: not readable ({type(exc).__name__}: {exc})") from None
