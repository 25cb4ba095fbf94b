"""The files of a run folder and their names: the only code that reads or writes them.

A run folder holds everything needed to reuse a model: the resolved ``config.toml`` and dataset
``schema.toml`` (classes, features, groups; a folder without one is a HAM10000 run), ``splits.csv``,
the fitted metadata encoder (``encoder.json``), the checkpoints (``last.pt`` to resume, ``best.pt``
the kept weights), ``history.csv``, ``metrics.json``, ``predictions_<split>.csv``, ``figures/`` and
``versions.json``. ``mmlesion evaluate`` writes the same files of one split under ``eval/<split>/``.

Every file is read through one guarded loader that checks its shape (columns, keys, value types), not
only that it parses: a damaged file is a one-line error ``RUN/<file>: not readable (...)``. A folder
holding a run is never trained into again unless asked to resume it (with the same settings) or to
replace it.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import shutil
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import tomllib

from ..config import ExperimentConfig, differences, from_dict, to_toml
from ..data.encoder import MetadataEncoder
from ..data.schema import DatasetSchema, preset
from ..data.schema_file import load_schema, resolve_schema, schema_to_toml
from ..errors import CheckpointError, DataError, MMLesionError
from ..io import atomic_write, read_json, remove_stale_temps, write_json
from .checkpoints import load_checkpoint, save_checkpoint

T = TypeVar("T")

CONFIG = "config.toml"
SCHEMA = "schema.toml"
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
#: Every file and folder a run writes, in the order ``overwrite`` removes them (the finished-run marks first).
RUN_FILES = (METRICS, BEST, LAST, HISTORY, EVAL, FIGURES, ENCODER, SPLITS, VERSIONS, SCHEMA, CONFIG)
PREDICTIONS = "predictions_*.csv"
SPLIT_NAMES = ("train", "val", "test")
#: Settings a run may be resumed with changed: where and how fast it runs, not what it computes.
#: (``data.root`` may move: the resumed run's split is checked against ``splits.csv`` instead.)
RESUME_FREE = (
    "data.root",
    "data.images",
    "data.cache_dir",
    "data.num_workers",
    "train.threads",
    "train.device",
    "train.embed_backend",  # the float32 backends agree to 1e-3 and share one cache of embeddings and maps
    "explain",
    "ablation",
    "tracking",
)
#: Settings whose default changed after runs were first written, with what a ``config.toml`` without them
#: meant: such a run reloads as it was trained (``train.embed_backend`` was torch before ``auto`` existed).
EARLIER_DEFAULTS = (("train", "embed_backend", "torch"),)
#: The files only training writes: a folder holding one of them holds a trained (or training) model.
TRAINED = (METRICS, BEST, LAST, HISTORY, ENCODER, SPLITS)
#: What ``last.pt`` holds (see training/engine.py).
LAST_KEYS = ("model", "optimizer", "scheduler", "best_model", "state")
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


def _with_earlier_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """A parsed ``config.toml`` with each missing key of :data:`EARLIER_DEFAULTS` at its earlier default."""
    for section, key, value in EARLIER_DEFAULTS:
        part = raw.setdefault(section, {})
        if isinstance(part, dict):  # anything else is from_dict's error to report
            part.setdefault(key, value)
    return raw


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

    def begin_training(self, cfg: ExperimentConfig, *, resume: bool = False, overwrite: bool = False) -> None:
        """Make the folder ready for a run of ``cfg``, refusing anything that would damage a run in it.

        A folder holding any run file is refused unless ``resume`` (it must have ``last.pt`` and the same
        settings, :meth:`check_resume`) or ``overwrite`` (the old run's files, ``eval/`` included, are
        removed first). Nothing is written before these checks pass.
        """
        if resume and overwrite:
            raise CheckpointError(f"{self.path}: resume and overwrite exclude each other")
        if resume:
            if not self.has_last():
                raise CheckpointError(f"{self.path}: nothing to resume (no last.pt)")
            self.check_resume(cfg)
        elif self.run_files():
            if not overwrite:
                raise CheckpointError(
                    f"{self.path}: already holds a run ({', '.join(self.run_files()[:4])}, ...); use --overwrite "
                    "to replace it or --resume to continue it"
                )
            self.remove_run()
        self.prepare()

    def remove_run(self) -> None:
        """Remove the run's files (only those: other files in the folder stay).

        They are first renamed, one by one, into a hidden ``.overwritten.<pid>.tmp/`` folder (the
        finished-run marks first), then deleted: a crash leaves an incomplete old run or none, never
        old files among new ones, and the next start deletes the leftover folder.
        """
        if (self.path / "cells").is_dir() or (self.path / "folds.csv").is_file():
            raise CheckpointError(f"{self.path}: is an ablation folder (cells/, folds.csv); not replacing it")
        trash = self.path / f".overwritten.{os.getpid()}.tmp"
        trash.mkdir(exist_ok=True)
        for name in self.run_files():
            os.replace(self.path / name, trash / name)
        shutil.rmtree(trash)

    def write_inputs(
        self,
        cfg: ExperimentConfig,
        splits: pd.DataFrame,
        encoder: MetadataEncoder,
        schema: DatasetSchema | None = None,
        **machine: Any,
    ) -> None:
        """What a run was trained from: config, resolved schema, split, fitted encoder and the library versions.

        ``schema`` defaults to the one ``cfg`` names (``data.schema``, ``data.duplicates``).
        """
        write_provenance(self.path, cfg, **machine)
        d = cfg.data
        self.write_schema(schema if schema is not None else resolve_schema(d.schema, duplicates=d.duplicates))
        with atomic_write(self.path / SPLITS) as fh:
            splits.to_csv(fh, index=False)
        write_json(self.path / ENCODER, encoder.to_json())

    def write_schema(self, schema: DatasetSchema) -> None:
        """The resolved dataset schema (``schema.toml``): the run reloads with it, whatever file named it."""
        with atomic_write(self.path / SCHEMA) as fh:
            fh.write(schema_to_toml(schema))

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

    @property
    def metrics_path(self) -> Path:
        """``metrics.json``: what a run (or one ``eval/<split>``) scored."""
        return self.path / METRICS

    def write_metrics(self, metrics: dict[str, Any]) -> Path:
        return write_json(self.metrics_path, metrics)

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

    def run_files(self) -> list[str]:
        """The run files present (see :data:`RUN_FILES`, plus the predictions), in removal order."""
        if not self.path.is_dir():
            return []
        names = [name for name in RUN_FILES if os.path.lexists(self.path / name)]
        return names + sorted(p.name for p in self.path.glob(PREDICTIONS))

    def trained_files(self) -> list[str]:
        """The files of :data:`TRAINED` present: what tells a training run from other result folders."""
        return [name for name in TRAINED if (self.path / name).exists()]

    def check_resume(self, cfg: ExperimentConfig) -> None:
        """Refuse to resume this run with settings that change what it computes (see :data:`RESUME_FREE`)."""
        changed = differences(self.read_config(), cfg, ignore=RESUME_FREE)
        if changed:
            raise CheckpointError(
                f"{self.path}: cannot resume with settings that differ from its {CONFIG}: {'; '.join(changed)} "
                "(resume with the run's settings, or start anew with --overwrite)"
            )

    def check_resume_splits(self, splits: pd.DataFrame) -> None:
        """Refuse to resume on data that split differently from the run's ``splits.csv`` (other data)."""
        saved = self.read_splits().set_index("image_id")["split"]
        new = splits.set_index("image_id")["split"]
        if not saved.sort_index().equals(new.sort_index()):
            differ = len(saved.index.symmetric_difference(new.index)) or int((saved != new.reindex(saved.index)).sum())
            raise CheckpointError(
                f"{self.path / SPLITS}: the data split differently from the run being resumed ({differ} image(s) "
                "differ); resume on the run's data"
            )

    def read_config(self) -> ExperimentConfig:
        """``config.toml``; a key it lacks whose default has changed since takes its earlier default."""
        return _guarded(self.path / CONFIG, lambda p: from_dict(_with_earlier_defaults(tomllib.loads(p.read_text()))))

    def read_schema(self) -> DatasetSchema:
        """The run's dataset schema (``schema.toml``: classes, features, key class); a run made before
        schemas has none and is HAM10000."""
        path = self.path / SCHEMA
        return _guarded(path, load_schema) if path.is_file() else preset("ham10000")

    def read_splits(self) -> pd.DataFrame:
        return _guarded(self.path / SPLITS, _read_splits)

    def read_encoder(self) -> MetadataEncoder:
        return _guarded(self.path / ENCODER, lambda p: _checked_encoder(MetadataEncoder.from_json(read_json(p))))

    def read_metrics(self) -> dict[str, Any]:
        """``metrics.json``, or {} when the run has none yet."""
        path = self.metrics_path
        return _guarded(path, lambda p: _expect(read_json(p), dict, "a JSON object")) if path.is_file() else {}

    def read_temperature(self) -> float:
        """The temperature fitted on val (``metrics.json``), 1.0 when the run has none yet."""
        metrics = self.read_metrics()
        return _guarded(self.metrics_path, lambda p: _positive(metrics.get("temperature", 1.0), "temperature"))

    def read_balanced(self, classes: Sequence[str] | None = None) -> tuple[float, dict[str, float]] | None:
        """(temperature, bias per class) of the balanced decision in ``metrics.json``; None if it has none.

        ``classes``: the run's class codes (default: its schema's); each must have a bias.
        """
        classes = tuple(classes) if classes is not None else self.read_schema().classes
        metrics = self.read_metrics()
        if "balanced_bias" not in metrics:
            return None

        def check(_: Path) -> tuple[float, dict[str, float]]:
            bias = _expect(metrics["balanced_bias"], dict, "balanced_bias: an object of one number per class")
            absent = [c for c in classes if c not in bias]
            if absent:
                raise ValueError(f"balanced_bias has no value for {', '.join(absent)}")
            return _positive(metrics.get("balanced_temperature"), "balanced_temperature"), {
                c: _finite(bias[c], f"balanced_bias.{c}") for c in classes
            }

        return _guarded(self.metrics_path, check)

    def read_predictions(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(class indices, calibrated probabilities) of ``predictions_<split>.csv``; a DataError names a bad file."""
        path = self.path / f"predictions_{split}.csv"
        if not path.is_file():
            raise DataError(f"{path}: missing (evaluate the run on {split} first)")
        classes = self.read_schema().classes
        return _guarded(path, lambda p: _read_predictions(p, classes))

    def load_last(self) -> dict[str, Any]:
        """Everything needed to resume (``last.pt``); anything else is a CheckpointError."""
        ckpt = load_checkpoint(self.path / LAST)
        missing = [k for k in LAST_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(LAST_KEYS)
        if missing:
            raise CheckpointError(f"{self.path / LAST}: not a resumable checkpoint (no {', '.join(missing)})")
        return ckpt

    def load_best(self) -> dict[str, Any]:
        """The kept weights of ``best.pt`` (a state dict); anything else is a CheckpointError."""
        ckpt = load_checkpoint(self.path / BEST)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise CheckpointError(f"{self.path / BEST}: not a multimodal_lesion checkpoint")
        return ckpt["model"]


def _guarded(path: Path, read: Callable[[Path], T]) -> T:
    """Read one run file; a damaged, unreadable or wrongly shaped one is a one-line DataError naming it."""
    try:
        return read(path)
    except MMLesionError as exc:
        raise DataError(f"{path}: not readable ({exc})") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, pd.errors.ParserError) as exc:
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{path}: not readable ({type(exc).__name__}: {detail})") from None


def _expect(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind):
        raise ValueError(f"expected {what}, got {type(value).__name__}")
    return value


def _finite(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key}: expected a finite number, got {value!r}")
    return float(value)


def _positive(value: Any, key: str) -> float:
    if _finite(value, key) <= 0:
        raise ValueError(f"{key}: expected a number > 0, got {value!r}")
    return float(value)


def _read_predictions(path: Path, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    frame = pd.read_csv(path, dtype={"target": str})
    columns = [f"p_{c}" for c in classes]
    absent = [c for c in ["target", *columns] if c not in frame.columns]
    if absent:
        raise ValueError(f"no column(s) {', '.join(absent)}")
    unknown = sorted(set(frame["target"]) - set(classes))
    if unknown:
        raise ValueError(f"unknown class(es) {', '.join(map(str, unknown[:5]))} in column 'target'")
    probs = frame[columns].to_numpy(np.float64)
    if not np.isfinite(probs).all():
        raise ValueError("probabilities that are not finite numbers")
    return frame["target"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64), probs


def _read_splits(path: Path) -> pd.DataFrame:
    """``splits.csv``: one row per image with a unique ``image_id`` and a ``split`` of train / val / test."""
    df = pd.read_csv(path, dtype={"image_id": str, "split": str}, encoding="utf-8")
    absent = [c for c in ("image_id", "split") if c not in df.columns]
    if absent:
        raise ValueError(f"no column(s) {', '.join(map(repr, absent))}; has {', '.join(map(repr, df.columns[:6]))}")
    if df["image_id"].isna().any() or df["image_id"].duplicated().any():
        raise ValueError("column 'image_id' has empty or repeated ids")
    odd = sorted(set(df["split"].fillna("(empty)")) - set(SPLIT_NAMES))
    if odd:
        raise ValueError(f"column 'split': {', '.join(map(repr, odd[:3]))} is not one of {', '.join(SPLIT_NAMES)}")
    return df


def _checked_encoder(encoder: MetadataEncoder) -> MetadataEncoder:
    """A loaded encoder whose learned state has the shape :class:`MetadataEncoder` writes."""
    means = _expect(encoder.means_, dict, "means_: an object of one number per numeric feature")
    stds = _expect(encoder.stds_, dict, "stds_: an object of one number per numeric feature")
    for name in encoder.numeric:
        _finite(means.get(name), f"means_.{name}")
        _positive(stds.get(name), f"stds_.{name}")
    cats = _expect(encoder.categories_, dict, "categories_: an object of category lists")
    groups = _expect(encoder.feature_groups_, dict, "feature_groups_: an object of column lists")
    if list(groups) != encoder.features:
        raise ValueError(f"feature_groups_ name {', '.join(map(str, groups))}, not {', '.join(encoder.features)}")
    for column, values in cats.items():
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise ValueError(f"categories_.{column}: expected a non-empty list of strings")
    columns = sorted(i for idx in groups.values() for i in _expect(idx, list, "a list of column numbers"))
    width = len(encoder.get_feature_names_out())
    if columns != list(range(width)):
        raise ValueError("feature_groups_ do not cover the encoded columns exactly once")
    with warnings.catch_warnings():  # encode one patient with every feature unknown: it must fit
        warnings.simplefilter("ignore")
        encoded = encoder.transform(pd.DataFrame([dict.fromkeys(encoder.features)]))
    if encoded.shape != (1, width):
        raise ValueError(f"encodes {encoded.shape[1]} columns, names {width}")
    return encoder
