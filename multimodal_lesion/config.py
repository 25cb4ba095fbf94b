"""Frozen dataclass configs: the only schema. TOML experiment files and ``--set`` overrides fill them.

An experiment file is a short list of overrides of these defaults, e.g.::

    [model]
    name = "gated"   # metadata gates the image channels

Unknown sections, unknown keys, values of the wrong type and values outside the range declared next to
their field (``Annotated[int, Range(1)]``) are a :class:`ConfigError` naming the key, the value and
where it came from: the ``--set`` pair or the file.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import tomllib

from .errors import ConfigError

TrainMode = Literal["frozen", "end2end", "partial"]
EmbedBackend = Literal["auto", "torch", "onnxruntime", "openvino"]
EmbedPrecision = Literal["float32", "bfloat16"]
Balance = Literal["weighted_loss", "sampler", "none"]
Augment = Literal["none", "light", "strong", "acquisition"]
ColorConstancyName = Literal["none", "shades_of_gray"]
Device = Literal["auto", "cpu", "cuda"]
CamMethodName = Literal["gradcam", "gradcam++", "hirescam", "scorecam"]
AblationBackend = Literal["local", "ray"]
ConformalScore = Literal["aps", "raps", "lac"]
ShapScale = Literal["probability", "log_odds"]
RandomiserName = Literal["gaussian", "reset"]


@dataclass(frozen=True)
class Range:
    """The valid values of a number, declared next to its field: ``epochs: Annotated[int, Range(1)] = 60``.

    ``also`` lists single values allowed outside the range (``0`` meaning "off", say).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: ``low`` itself is not allowed
    high_open: bool = False
    also: tuple[float, ...] = ()

    def holds(self, value: float) -> bool:
        if value in self.also:
            return True
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        return " or ".join([*(f"{v:g}" for v in self.also), text])


@dataclass(frozen=True)
class Distinct:
    """A list with at least ``min_items`` items and no repeats: ``Annotated[tuple[str, ...], Distinct()]``."""

    min_items: int = 1

    def holds(self, value: tuple[Any, ...]) -> bool:
        return len(value) >= self.min_items and len(set(value)) == len(value)

    def __str__(self) -> str:
        return f"a list of at least {self.min_items} item(s) without repeats"


Constraint = Range | Distinct
PositiveInt = Annotated[int, Range(1)]
Count = Annotated[int, Range(0)]  # 0 allowed
Seed = Annotated[int, Range(0)]  # numpy's generators take no negative seed
Positive = Annotated[float, Range(0, low_open=True)]
NonNegative = Annotated[float, Range(0)]
Share = Annotated[float, Range(0, 1, low_open=True, high_open=True)]  # a share strictly between 0 and 1
Probability0 = Annotated[float, Range(0, 1, high_open=True)]  # [0, 1)
#: The smallest image side: the total stride (32) of the timm backbones used here (EfficientNet,
#: ResNet), so their last feature map is at least one pixel. The largest: beyond it the image cache
#: (N x H x W x 3 bytes) outgrows any memory (HAM10000's images are 600 x 450).
MIN_IMAGE_SIDE, MAX_IMAGE_SIDE = 32, 4096
ImageSide = Annotated[int, Range(MIN_IMAGE_SIDE, MAX_IMAGE_SIDE)]
#: The smallest synthetic dataset worth a run: each lesion-grouped split and each of 5 ablation folds
#: gets several images (n=50: train / val / test 33 / 8 / 9, folds of 9 to 11; n=7 gives no val or test).
MIN_SYNTHETIC_N = 50


@dataclass(frozen=True)
class DataConfig:
    root: str = ""  # data root (the schema's metadata files); empty = the synthetic HAM10000-shaped dataset
    schema: str = "ham10000"  # a dataset preset (ham10000 | isic2019 | isic2020 | pad_ufes_20) or a schema .toml file
    images: str = ""  # image root when the images live apart from the metadata; empty = root; "none" = no images
    duplicates: str = ""  # a file of image pairs of one lesion (kept in one group); replaces the schema's
    synthetic_n: Annotated[int, Range(MIN_SYNTHETIC_N)] = 1000  # images in the synthetic dataset when root is empty
    synthetic_seed: Seed = 0  # seed of the synthetic dataset
    image_size: tuple[ImageSide, ImageSide] = (168, 224)  # (height, width) fed to the backbone; keeps the 3:4 aspect
    test_size: Share = 0.15  # share of lesions held out for test
    val_size: Share = 0.15  # share of lesions held out for validation (early stopping, calibration)
    folds: Annotated[int, Range(2, also=(0,))] = 0  # >0: lesion-grouped K folds instead of a fixed val split
    fold: Count = 0  # which fold is validation when folds > 0
    split_seed: Seed = 0  # seed of the lesion-grouped split
    drop_missing: bool = False  # drop (and report) listed images that are missing on disk
    splits: str = ""  # a CSV of image id and split (train/val/test) or fold: used instead of drawing a split
    allow_leaks: bool = False  # accept a given split (data.splits, split_column) that puts a group on two sides
    cache_dir: str = ""  # decoded images / embeddings cache; empty = $MMLESION_CACHE or ~/.cache/multimodal_lesion
    num_workers: Count = 0  # DataLoader workers; 0 keeps everything in-process (fast on cached arrays)
    # none | shades_of_gray: each image's illuminant divided out (training, evaluation, prediction, explanation)
    color_constancy: ColorConstancyName = "none"
    color_constancy_p: Annotated[float, Range(1)] = 6.0  # Minkowski norm of Shades of Gray (1 = Gray World)
    color_constancy_gamma: Positive = 1.0  # estimate and correct in I**gamma (1 = the stored pixels)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "concat"  # a registered model (`mmlesion models` lists them)
    backbone: str = "tf_efficientnet_lite0"  # any timm model name
    weights: str = "offline-imagenet"  # none | timm (hub) | offline-imagenet | path to a checkpoint
    meta_hidden: PositiveInt = 64  # width of the metadata MLP embedding
    head_hidden: PositiveInt = 256  # width of the fusion MLP
    dropout: Probability0 = 0.3  # dropout in the heads
    multiscale: bool = False  # concatenate pooled features of the last stages (frozen path)
    # partial: last backbone blocks (stages) fine-tuned on the cached maps before them; 0 = the last block's
    # maps are cached and the whole backbone stays frozen (map-fusion models then fuse on those maps)
    tail_blocks: Count = 1


@dataclass(frozen=True)
class TrainConfig:
    # frozen: heads on cached embeddings | end2end: fine-tune the whole network | partial: fine-tune the
    # stages after the stride-16 maps (cached once, 4 flips, float16) and the heads
    mode: TrainMode = "frozen"
    epochs: PositiveInt = 60  # maximum epochs (early stopping may end sooner)
    batch_size: PositiveInt = 64  # images per step
    lr: Positive = 3e-3  # peak learning rate of the heads
    backbone_lr: Positive = 3e-4  # peak learning rate of the backbone (end2end)
    weight_decay: NonNegative = 1e-4  # AdamW decoupled weight decay
    warmup_epochs: Count = 2  # linear warm-up before the cosine decay
    label_smoothing: Probability0 = 0.05  # cross-entropy label smoothing
    balance: Balance = "weighted_loss"  # weighted_loss | sampler | none: how class imbalance is handled
    grad_clip: NonNegative = 1.0  # max gradient norm; 0 disables clipping
    patience: PositiveInt = 10  # early stopping on validation balanced accuracy
    seed: Seed = 0  # seed of initialisation, shuffling and augmentation
    # none | light (flips) | strong (flips, rotations, colour jitter) | acquisition (strong's geometry with
    # framing, colour cast, illumination, blur, noise, vignette and black corners, hair: what changes between clinics)
    augment: Augment = "light"
    batch_augment: bool = False  # end2end: augment whole cached uint8 batches at once instead of per image
    flip_average: bool = True  # frozen path: average embeddings over flips
    # frozen passes (embeddings, maps): auto | torch | onnxruntime | openvino (the [fast] extra). auto: openvino,
    # else onnxruntime, whichever imports, on the CPU in float32; torch otherwise (a GPU, bfloat16). A run's
    # config.toml names the backend auto resolved to
    embed_backend: EmbedBackend = "auto"
    embed_precision: EmbedPrecision = "float32"  # bfloat16: autocast in the torch embedding pass (a separate cache)
    embed_batch: PositiveInt = 8  # images per call of the embedding / maps pass (x4 views with flips)
    map_crop: Count = 1  # partial: training crops of the cached maps this many cells smaller per axis (0 = none)
    # partial: extra cached views per image drawn under train.augment's rotations, scaling and colour jitter
    # (training picks one of the flips or of these each epoch; evaluation uses the flips); 0 = flips only
    map_views: Count = 0
    tta: bool = False  # evaluate with flip test-time augmentation
    device: Device = "auto"  # auto | cpu | cuda (refused where no GPU is found)
    amp: bool = False  # mixed precision training step: float16 on a GPU, bfloat16 autocast on the CPU (AVX512-BF16)
    channels_last: bool = False  # channels-last memory format (GPU)
    threads: Count = 0  # torch CPU threads; 0 = torch's default
    ema_decay: Probability0 = 0.0  # >0: validate, keep and save an exponential moving average of the weights
    meta_dropout: Probability0 = 0.1  # training: each patient feature of an image read as missing with this probability
    meta_dropout_all: Probability0 = 0.1  # training: all patient features of an image read as missing at once


@dataclass(frozen=True)
class ExplainConfig:
    method: CamMethodName = "gradcam"  # gradcam | gradcam++ | hirescam | scorecam
    target_layer: str = ""  # dotted module path inside the backbone; empty = its last feature stage
    # SHAP / modality background: training cases (at most the whole training split); the demo measured
    # a largest sampling error of 0.019 with 500 (a redraw of 50 moved values by up to 0.16)
    background_size: PositiveInt = 1000
    background_resamples: Count = 20  # bootstrap redraws of the background behind each value's ± (0 = none)
    shap_scale: ShapScale = "probability"  # probability | log_odds of the explained class
    # above 10 SHAP players (patient features, + the image) the values are sampled over this many player
    # orders in antithetic pairs (even); each value's standard error is reported with it
    shap_permutations: Annotated[int, Range(2)] = 64
    n_cases: PositiveInt = 12  # cases explained when none are named (correct per class, errors, least confident)
    faithfulness_cases: Count = 8  # cases that also get deletion / insertion / ROAD (the costly part)
    randomisation_cases: Count = 8  # cases that get the cascading randomisation and random-logit checks
    randomiser: RandomiserName = "gaussian"  # gaussian: re-draw with each tensor's moments | reset: reset_parameters
    steps: PositiveInt = 10  # perturbation steps of the deletion / insertion curves
    road_percentiles: Annotated[tuple[Annotated[int, Range(1, 99)], ...], Distinct(0)] = (20, 50, 80)  # [] = no ROAD
    prior_masks: Count = 300  # training masks behind the mean-mask and fitted-centre baselines
    bootstrap: PositiveInt = 2000  # bootstrap resamples of the paired CAM-minus-baseline CIs
    runner_up: bool = True  # also map the runner-up class of each case (the differential)
    seed: Seed = 0  # seed of the case sample, the background sample and the random baseline map


@dataclass(frozen=True)
class AblationConfig:
    models: Annotated[tuple[str, ...], Distinct()] = (  # registered names
        "image_only",
        "metadata_only",
        "concat",
        "gated",
        "film",
    )
    baseline: str = "image_only"  # what every fusion model is compared with (one of models)
    gbm: bool = True  # add scikit-learn gradient boosting on the patient features as the floor
    folds: Annotated[int, Range(3)] = 5  # lesion-grouped folds: a cell tests on one, validates on the next
    seeds: Annotated[tuple[Seed, ...], Distinct()] = (0, 1, 2)  # training seeds per fold
    bootstrap: PositiveInt = 2000  # bootstrap resamples for confidence intervals
    workers: PositiveInt = 2  # cells trained in parallel processes (one torch thread each); 1 = in this process
    # frozen: heads on cached embeddings | end2end: every cell a full fine-tuning run | partial: every cell
    # fine-tunes the last stages on the cached stride-16 maps
    mode: TrainMode = "frozen"
    backend: AblationBackend = "local"  # local: a process pool on this machine | ray: Ray tasks (a cluster)


@dataclass(frozen=True)
class RayConfig:
    address: str = ""  # an existing Ray cluster (e.g. "10.0.0.1:6379" or "auto"); empty = start a local one
    num_cpus: Count = 0  # CPUs of the local instance when one is started; 0 = Ray's default (all)
    cpus_per_cell: Positive = 1.0  # CPUs each cell asks for (also its torch threads, rounded up)
    gpus_per_cell: NonNegative = 0.0  # GPUs (or a fraction of one) each cell asks for
    max_retries: Count = 2  # times a cell whose worker died is run again


@dataclass(frozen=True)
class UncertaintyConfig:
    conformal_score: ConformalScore = "aps"  # aps | raps | lac: MAPIE's conformity score of the prediction sets
    class_conditional: bool = True  # Mondrian by true class: each class covered, rare ones (df, vasc) too
    levels: Annotated[tuple[Share, ...], Distinct()] = (0.90, 0.95)  # target coverages of the prediction sets
    defer: Annotated[tuple[Share, ...], Distinct()] = (0.10, 0.20)  # shares of least-confident cases deferred
    key_sensitivity: Share = 0.95  # melanoma sensitivity the triage threshold keeps (fitted on val)
    bootstrap: Count = 200  # lesion-bootstrap resamples of the subgroup gaps' intervals; 0 = no interval


@dataclass(frozen=True)
class TrackingConfig:
    # MLflow tracking (the `mlflow` extra): a folder (a local file store, e.g. "mlruns") or a tracking
    # server / database URI; empty = nothing tracked. `--mlflow URI` sets it on train, evaluate and ablate
    mlflow_uri: str = ""
    experiment: str = "multimodal_lesion"  # the MLflow experiment the runs are filed under (created if missing)


@dataclass(frozen=True)
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    uncertainty: UncertaintyConfig = field(default_factory=UncertaintyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass(frozen=True)
class Rule:
    """A constraint between keys of one config: ``holds(cfg)`` or a ConfigError naming ``keys``."""

    keys: tuple[str, ...]
    holds: Callable[[ExperimentConfig], bool]
    message: Callable[[ExperimentConfig], str]


#: Constraints between keys (a key's own range sits next to its field).
RULES = (
    Rule(
        ("data.test_size", "data.val_size"),
        lambda c: c.data.folds > 0 or c.data.test_size + c.data.val_size < 1,
        lambda c: (
            f"data.test_size + data.val_size must be < 1 to leave training data, got "
            f"{c.data.test_size:g} + {c.data.val_size:g}"
        ),
    ),
    Rule(
        ("data.fold", "data.folds"),
        lambda c: c.data.folds == 0 or c.data.fold < c.data.folds,
        lambda c: f"data.fold must be in 0..{c.data.folds - 1} (data.folds = {c.data.folds}), got {c.data.fold}",
    ),
    Rule(
        ("train.embed_precision", "train.embed_backend"),
        lambda c: c.train.embed_precision == "float32" or c.train.embed_backend in ("torch", "auto"),
        lambda c: (
            f"train.embed_precision={c.train.embed_precision!r} is only available with train.embed_backend='torch' "
            f"(or 'auto', which then picks torch), got {c.train.embed_backend!r}"
        ),
    ),
    Rule(
        ("train.map_views", "train.augment"),
        lambda c: c.train.map_views == 0 or c.train.augment in ("strong", "acquisition"),
        lambda c: (
            f"train.map_views={c.train.map_views} draws views under train.augment's rotations and colour jitter: "
            f"set train.augment='strong' or 'acquisition' (got {c.train.augment!r})"
        ),
    ),
    Rule(
        ("tracking.experiment",),
        lambda c: bool(c.tracking.experiment.strip()),
        lambda c: f"config key 'tracking.experiment': must name an MLflow experiment, got {c.tracking.experiment!r}",
    ),
    Rule(
        ("ablation.baseline", "ablation.models"),
        lambda c: c.ablation.baseline in c.ablation.models,
        lambda c: (
            f"ablation.baseline {c.ablation.baseline!r} must be one of ablation.models ({', '.join(c.ablation.models)})"
        ),
    ),
)


class KeyedConfigError(ConfigError):
    """A ConfigError about given keys: :func:`load_config` prefixes it with where their values came from."""

    def __init__(self, message: str, keys: Iterable[str]) -> None:
        super().__init__(message)
        self.keys = tuple(keys)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp`` and its declared constraints; lists become tuples."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *constraints = typing.get_args(tp)
        value = _coerce(value, base, key)
        for constraint in constraints:
            if not constraint.holds(value):
                shown = list(value) if isinstance(value, tuple) else value
                raise KeyedConfigError(f"config key '{key}': must be {constraint}, got {shown!r}", [key])
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or not isinstance(value, str):
            raise KeyedConfigError(
                f"config key '{key}': expected one of {', '.join(map(repr, choices))}, got {value!r}", [key]
            )
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise KeyedConfigError(f"config key '{key}': expected a list, got {value!r}", [key])
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise KeyedConfigError(f"config key '{key}': expected {len(args)} values, got {value!r}", [key])
        return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
    expected = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    if tp not in expected:  # pragma: no cover
        raise ConfigError(f"config key '{key}': unsupported type {tp}")
    fits = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        str: isinstance(value, str),
    }[tp]
    if not fits:
        raise KeyedConfigError(f"config key '{key}': expected {expected[tp]}, got {value!r}", [key])
    return float(value) if tp is float else value


def _section_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build a config from nested ``{section: {key: value}}``: unknown keys, wrong types and values out
    of their declared range (or breaking a :data:`RULES` entry) are a ConfigError naming the key."""
    sections = {}
    top_types = _section_types(ExperimentConfig)
    for name, values in raw.items():
        if name not in top_types:
            raise KeyedConfigError(f"unknown config section '{name}' (valid: {', '.join(top_types)})", [name])
        if not isinstance(values, dict):
            raise KeyedConfigError(f"config section '{name}' must be a table", [name])
        cls = top_types[name]
        hints = _section_types(cls)
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                raise KeyedConfigError(
                    f"unknown config key '{name}.{key}' (valid: {', '.join(hints)})", [f"{name}.{key}"]
                )
            kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
        sections[name] = cls(**kwargs)
    cfg = ExperimentConfig(**sections)
    for rule in RULES:
        if not rule.holds(cfg):
            raise KeyedConfigError(rule.message(cfg), rule.keys)
    return cfg


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


#: The package folder of the preset experiment files (``load_config("real_frozen")``, ``--config real_frozen``).
PRESET_PACKAGE = "multimodal_lesion.presets"
#: A preset kept beside the package for the demo (``mmlesion demo`` reads it).
DEMO_PRESET = "demo"


def list_presets() -> list[str]:
    """The names of the preset experiment configs shipped with the package, sorted.

    Any of them is accepted wherever a config file is (``load_config("concat")``, ``--config concat``).
    """
    from importlib.resources import files

    names = [p.name.removesuffix(".toml") for p in files(PRESET_PACKAGE).iterdir() if p.name.endswith(".toml")]
    return sorted([*names, DEMO_PRESET])


def preset_text(name: str) -> str:
    """The TOML text of the preset ``name``; an unknown name is a ConfigError listing the presets."""
    from importlib.resources import files

    if name not in list_presets():
        raise ConfigError(f"unknown config preset '{name}' (not a file either); presets: {', '.join(list_presets())}")
    if name == DEMO_PRESET:
        return files("multimodal_lesion").joinpath("demo.toml").read_text()
    return files(PRESET_PACKAGE).joinpath(f"{name}.toml").read_text()


def is_preset_name(spec: str | Path) -> bool:
    """Whether ``spec`` names a preset rather than a file: a plain word (no folder, no ``.toml``) that is no file."""
    if isinstance(spec, Path):
        return False
    return "/" not in spec and "\\" not in spec and not spec.endswith(".toml") and not Path(spec).is_file()


def load_config(path: str | Path | None = None, overrides: Sequence[str] | None = None) -> ExperimentConfig:
    """Read a TOML experiment file, a preset (by name) or the defaults, and apply ``--set`` overrides.

    Args:
        path: a TOML file, the name of a preset (see :func:`list_presets`), or None for the defaults.
        overrides: ``"section.key=value"`` pairs applied on top, in order.

    A mistake names its source: ``--set train.lr=-1: ...`` for a value from an override, the file (or
    preset) for a value from the file.
    """
    raw: dict[str, Any] = {}
    source: Path | None = None
    if path is not None and is_preset_name(path):
        source = Path(f"preset {path}")
        raw = _parse_toml(preset_text(str(path)), source)
    elif path is not None:
        source = Path(path)
        if not source.is_file():
            hint = f" (the preset is named without a path: '{source.stem}')" if source.stem in list_presets() else ""
            raise ConfigError(f"{source}: config file not found" + (" (it is a folder)" if source.is_dir() else hint))
        try:
            text = source.read_text()
        except (UnicodeDecodeError, OSError) as exc:
            raise ConfigError(f"{source}: not valid TOML ({exc})") from None
        raw = _parse_toml(text, source)
    pairs = list(overrides or [])
    raw = _merge(raw, parse_overrides(pairs))
    try:
        return from_dict(raw)
    except KeyedConfigError as exc:
        raise ConfigError(_with_sources(str(exc), exc.keys, source, pairs)) from None


def _parse_toml(text: str, source: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML ({exc})") from None


def _with_sources(message: str, keys: tuple[str, ...], path: Path | None, pairs: list[str]) -> str:
    """``message`` prefixed with where the values of ``keys`` came from: their ``--set`` pairs, or the file."""
    sources = []
    for key in keys:
        named = [pair.partition("=")[0].strip() for pair in pairs]  # a section's key names its section too
        given = [p.strip() for p, k in zip(pairs, named, strict=True) if key in (k, k.split(".")[0])]
        sources += [f"--set {given[-1]}"] if given else [str(path)] if path is not None else []
    return f"{', '.join(dict.fromkeys(sources))}: {message}" if sources else message


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


def differences(old: ExperimentConfig, new: ExperimentConfig, ignore: Iterable[str] = ()) -> list[str]:
    """``key old -> new`` for every key whose value differs, except keys (or whole sections) in ``ignore``."""
    skip = tuple(ignore)
    a, b = to_dict(old), to_dict(new)
    return [
        f"{section}.{key} {a[section][key]!r} -> {b[section][key]!r}"
        for section in a
        for key in a[section]
        if a[section][key] != b[section][key] and section not in skip and f"{section}.{key}" not in skip
    ]


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
    "MAX_IMAGE_SIDE",
    "MIN_IMAGE_SIDE",
    "MIN_SYNTHETIC_N",
    "RULES",
    "AblationConfig",
    "DataConfig",
    "Distinct",
    "ExperimentConfig",
    "ExplainConfig",
    "KeyedConfigError",
    "ModelConfig",
    "Range",
    "RayConfig",
    "TrackingConfig",
    "TrainConfig",
    "differences",
    "from_dict",
    "is_preset_name",
    "list_presets",
    "load_config",
    "parse_overrides",
    "preset_text",
    "replace",
    "to_dict",
    "to_toml",
]
