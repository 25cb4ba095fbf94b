"""Frozen dataclass configs: the only schema. TOML experiment files and ``--set`` overrides fill them.

An experiment file is a short list of overrides of these defaults, e.g.::

    [model]
    name = "gated"   # metadata gates the image channels

Unknown sections, unknown keys and values of the wrong type are a :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib

from .errors import ConfigError

TrainMode = Literal["frozen", "end2end"]
Balance = Literal["weighted_loss", "sampler", "none"]
Augment = Literal["none", "light", "strong"]
Device = Literal["auto", "cpu", "cuda"]
CamMethodName = Literal["gradcam", "gradcam++", "hirescam", "scorecam"]
AblationBackend = Literal["local", "ray"]


@dataclass(frozen=True)
class DataConfig:
    root: str = ""  # HAM10000 root; empty = the synthetic dataset generated under the run folder
    synthetic_n: int = 1000  # images in the synthetic dataset when root is empty
    synthetic_seed: int = 0  # seed of the synthetic dataset
    image_size: tuple[int, int] = (168, 224)  # (height, width) fed to the backbone; keeps the 3:4 aspect
    test_size: float = 0.15  # share of lesions held out for test
    val_size: float = 0.15  # share of lesions held out for validation (early stopping, calibration)
    folds: int = 0  # >0: lesion-grouped K folds instead of a fixed val split
    fold: int = 0  # which fold is validation when folds > 0
    split_seed: int = 0  # seed of the lesion-grouped split
    drop_missing: bool = False  # drop (and report) listed images that are missing on disk
    cache_dir: str = ""  # decoded images / embeddings cache; empty = $MMLESION_CACHE or ~/.cache/multimodal_lesion
    num_workers: int = 0  # DataLoader workers; 0 keeps everything in-process (fast on cached arrays)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "concat"  # a registered model (`mmlesion models` lists them)
    backbone: str = "tf_efficientnet_lite0"  # any timm model name
    weights: str = "offline-imagenet"  # none | timm (hub) | offline-imagenet | path to a checkpoint
    meta_hidden: int = 64  # width of the metadata MLP embedding
    head_hidden: int = 256  # width of the fusion MLP
    dropout: float = 0.3  # dropout in the heads
    multiscale: bool = False  # concatenate pooled features of the last stages (frozen path)


@dataclass(frozen=True)
class TrainConfig:
    mode: TrainMode = "frozen"  # frozen: heads on cached embeddings | end2end: fine-tune the whole network
    epochs: int = 60  # maximum epochs (early stopping may end sooner)
    batch_size: int = 64  # images per step
    lr: float = 3e-3  # peak learning rate of the heads
    backbone_lr: float = 3e-4  # peak learning rate of the backbone (end2end)
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    warmup_epochs: int = 2  # linear warm-up before the cosine decay
    label_smoothing: float = 0.05  # cross-entropy label smoothing
    balance: Balance = "weighted_loss"  # weighted_loss | sampler | none: how class imbalance is handled
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    patience: int = 10  # early stopping on validation balanced accuracy
    seed: int = 0  # seed of initialisation, shuffling and augmentation
    augment: Augment = "light"  # none | light (flips) | strong (flips, rotations, colour jitter)
    flip_average: bool = True  # frozen path: average embeddings over flips
    tta: bool = False  # evaluate with flip test-time augmentation
    device: Device = "auto"  # auto | cpu | cuda
    amp: bool = False  # mixed precision (GPU)
    channels_last: bool = False  # channels-last memory format (GPU)
    threads: int = 0  # torch CPU threads; 0 = torch's default
    ema_decay: float = 0.0  # >0: validate, keep and save an exponential moving average of the weights


@dataclass(frozen=True)
class ExplainConfig:
    method: CamMethodName = "gradcam"  # gradcam | gradcam++ | hirescam | scorecam
    target_layer: str = ""  # dotted module path inside the backbone; empty = its last feature stage
    background_size: int = 50  # training cases used as the SHAP / modality background
    n_cases: int = 12  # cases explained when none are named
    faithfulness_cases: int = 8  # cases that also get deletion/insertion curves (the costly part)
    randomisation_cases: int = 8  # cases that get the model-randomisation sanity check
    steps: int = 10  # perturbation steps of the deletion / insertion curves
    seed: int = 0  # seed of the case sample, the background sample and the random baseline map


@dataclass(frozen=True)
class AblationConfig:
    models: tuple[str, ...] = ("image_only", "metadata_only", "concat", "gated", "film")  # registered names
    baseline: str = "image_only"  # what every fusion model is compared with
    gbm: bool = True  # add scikit-learn gradient boosting on the patient features as the floor
    folds: int = 5  # lesion-grouped folds
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds per fold
    bootstrap: int = 2000  # bootstrap resamples for confidence intervals
    workers: int = 2  # cells trained in parallel processes (one torch thread each); 1 = in this process
    mode: TrainMode = "frozen"  # frozen: heads on cached embeddings | end2end: every cell a full fine-tuning run
    backend: AblationBackend = "local"  # local: a process pool on this machine | ray: Ray tasks (a cluster)


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # an existing Ray cluster (e.g. "10.0.0.1:6379" or "auto"); empty = start a local one
    num_cpus: int = 0  # CPUs of the local instance when one is started; 0 = Ray's default (all)
    cpus_per_cell: float = 1.0  # CPUs each cell asks for (also its torch threads, rounded up)
    gpus_per_cell: float = 0.0  # GPUs (or a fraction of one) each cell asks for
    max_retries: int = 2  # times a cell whose worker died is run again


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    ray: RayConfig = field(default_factory=RayConfig)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp``; convert lists to tuples."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}': expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")  # pragma: no cover


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build a config from nested ``{section: {key: value}}``, rejecting unknown keys by name."""
    sections = {}
    top_types = _section_types(ExperimentConfig)
    for name, values in raw.items():
        if name not in top_types:
            raise ConfigError(f"unknown config section '{name}' (valid: {', '.join(top_types)})")
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{name}' must be a table")
        cls = top_types[name]
        hints = _section_types(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                raise ConfigError(f"unknown config key '{name}.{key}' (valid: {', '.join(hints)})")
            kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
        sections[name] = cls(**kwargs)
    return ExperimentConfig(**sections)


def _parse_value(text: str, key: str) -> Any:
    """Parse the value of a ``--set key=value`` pair as TOML, falling back to a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if any(c in text for c in "[]{}=\"'"):
            raise ConfigError(f"--set {key}: cannot parse value {text!r}") from None
        return text


def parse_overrides(pairs: list[str]) -> dict[str, dict[str, Any]]:
    """Turn ``["train.lr=0.01", ...]`` into nested dicts; a malformed pair is a ConfigError."""
    out: dict[str, dict[str, Any]] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip()
        if not sep or key.count(".") != 1 or not all(key.split(".")) or not text.strip():
            raise ConfigError(f"--set expects section.key=value, got {pair!r}")
        section, name = key.split(".")
        out.setdefault(section, {})[name] = _parse_value(text.strip(), key)
    return out


def _merge(base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        if isinstance(merged.get(section), dict):
            merged[section].update(values)
        else:
            merged[section] = dict(values)
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a TOML experiment file (or the defaults) and apply ``--set`` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    raw = _merge(raw, parse_overrides(overrides or []))
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def replace(cfg: ExperimentConfig, **sections: dict[str, Any]) -> ExperimentConfig:
    """Return a copy of ``cfg`` with some keys of some sections changed, type-checked."""
    return from_dict(_merge(to_dict(cfg), sections))


def to_dict(cfg: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """Nested plain-dict form of a config (tuples become lists)."""

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {
        f.name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, f.name)).items()}
        for f in dataclasses.fields(cfg)
    }


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)  # pragma: no cover


def to_toml(cfg: ExperimentConfig) -> str:
    """The resolved config as TOML text: written next to every run's results."""
    lines = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


__all__ = [
    "AblationConfig",
    "DataConfig",
    "ExperimentConfig",
    "ExplainConfig",
    "ModelConfig",
    "RayConfig",
    "TrainConfig",
    "from_dict",
    "load_config",
    "parse_overrides",
    "replace",
    "to_dict",
    "to_toml",
]
