"""The front door: configs, data, training, loading a run and the ablation, as a few functions.

``import multimodal_lesion as mml`` reaches every name here (lazily). ``mml.train(...)`` returns a
:class:`Run`; ``mml.load_run(path)`` gives the same object back; a run predicts, evaluates (its own
split or another dataset) and explains, and its results are small typed objects with ``to_frame()``.
The ``mmlesion`` commands are a shell over these calls. Heavy libraries are imported inside the
functions, so importing this module costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ExperimentConfig, list_presets, replace
from ..config import load_config as _read_config
from ..errors import ConfigError
from ..io import output_folder
from .results import AblationResult, Attributions, Embeddings, Evaluation, ExplanationReport, Prediction, RunMetrics
from .run import Run

if TYPE_CHECKING:
    import pandas as pd

    from ..data.dataset import LesionDataset

#: What a function that takes a config accepts: a config, a preset name, a TOML file, or None (defaults).
ConfigLike = ExperimentConfig | str | Path | None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The experiment config of a preset, a TOML file, or the defaults, with overrides applied.

    Args:
        path: a preset name (``"real_frozen"``; see :func:`list_presets`), a TOML file, or None for
            the typed defaults.
        overrides: ``"section.key=value"`` pairs (TOML values), applied in order:
            ``["train.epochs=5", 'model.name="gated"']``.

    Returns:
        The frozen, validated config. ``multimodal_lesion.config.replace(cfg, train={...})`` changes it.

    Raises:
        ConfigError: an unknown preset (the message lists them), a missing or invalid file, an unknown
            key or a value out of range, naming where it came from.
    """
    return _read_config(path, list(overrides))


def list_models() -> list[str]:
    """The registered model names (``image_only``, ``metadata_only``, the fusion heads), sorted."""
    from ..models import list_models as registered

    return list(registered())


def read_dataset(
    root: str | Path,
    schema: str = "ham10000",
    *,
    images: str = "",
    duplicates: str = "",
    drop_missing: bool = False,
) -> LesionDataset:
    """Read and validate a dataset into its canonical table (one row per image).

    Args:
        root: the folder of the schema's metadata files.
        schema: a dataset preset (``ham10000``, ``isic2019``, ``isic2020``, ``pad_ufes_20``) or a
            schema TOML file.
        images: the folder the images are below when not ``root``; ``"none"``: no images.
        duplicates: a CSV of image pairs of one lesion (kept in one group), replacing the schema's.
        drop_missing: drop listed images that are not found (reported in ``.notes``) instead of failing.

    Returns:
        The :class:`~multimodal_lesion.data.dataset.LesionDataset`: ``.metadata`` (``image_id``,
        ``lesion_id``, ``dx``, the patient features, ``path``), ``.schema``, ``.notes``.

    Raises:
        DataError: naming the file, row and column of the first problem.
    """
    from ..data.reader import read_dataset as read
    from ..data.schema_file import resolve_schema

    return read(root, resolve_schema(schema, duplicates=duplicates), images=images, drop_missing=drop_missing)


def synthetic_dataset(n: int = 1000, seed: int = 0) -> LesionDataset:
    """The synthetic HAM10000-shaped dataset that runs use when given no data (written once, then reused).

    Seven classes with a planted rule (see :data:`PLANTED`): two look-alike pairs that only age tells
    apart. It lives in the package cache (``$MMLESION_CACHE``), where ``train`` without data finds it.
    """
    from ..data.synthetic import make_synthetic
    from ..runs import synthetic_root

    cfg = replace(ExperimentConfig(), data={"synthetic_n": n, "synthetic_seed": seed})
    return read_dataset(make_synthetic(synthetic_root(cfg), n=n, seed=seed))


def train(
    config: ConfigLike = None,
    data: str | Path | LesionDataset | None = None,
    *,
    out: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    show: bool = True,
    mlflow: str = "",
) -> Run:
    """Train one model and write its run folder (checkpoint, calibration, metrics, figures).

    Args:
        config: a config (:func:`load_config`), a preset name, a TOML file, or None for the defaults.
        data: a data root (read with the config's ``data.schema``), a dataset from
            :func:`read_dataset`, or None: the config's ``data.root`` (empty: the synthetic dataset).
        out: the run folder to write.
        resume: continue an interrupted run in ``out`` (same settings and data).
        overwrite: replace the run in ``out``.
        show: print progress.
        mlflow: an MLflow tracking URI (a bare path: a local file store), overriding the config's
            ``tracking.mlflow_uri``: the run is then also an MLflow run (params, epochs, metrics, files).

    Returns:
        The trained :class:`Run`.
    """
    cfg = _tracked(_with_data(_config(config), data), mlflow)
    _check_schema(cfg)
    # under torchrun every process trains; rank 0 alone writes the run, so it alone holds the lock
    with output_folder(out, lock=os.environ.get("RANK", "0") == "0"):
        from ..workflows import train_run

        train_run(cfg, out, resume=resume, overwrite=overwrite, show=show)
    return Run(out)


def _tracked(cfg: ExperimentConfig, mlflow: str) -> ExperimentConfig:
    """``cfg`` with ``mlflow`` as its tracking URI when given; the URI checked before any work."""
    from ..tracking import CONFIG_KEY, check_tracking

    if mlflow:
        cfg = replace(cfg, tracking={"mlflow_uri": mlflow})
    check_tracking(cfg.tracking.mlflow_uri, "mlflow" if mlflow else CONFIG_KEY)
    return cfg


def load_run(path: str | Path, device: str | None = None) -> Run:
    """A finished run folder as a :class:`Run`.

    Args:
        path: the run folder (what :func:`train` or ``mmlesion train --out`` wrote).
        device: ``cpu``, ``cuda`` or ``auto``; None: the run's own (a GPU run runs on the CPU where
            there is none, with a note).

    Raises:
        CheckpointError: the folder is not a finished run (naming what is missing).
    """
    if device not in (None, "auto", "cpu", "cuda"):
        raise ConfigError(f"device '{device}': expected auto, cpu or cuda")
    run = Run(path, device=device)
    run.folder.check()
    return run


def ablate(
    config: ConfigLike = "ablation",
    *,
    out: str | Path,
    data: str | Path | LesionDataset | None = None,
    ray_address: str | None = None,
    show: bool = True,
    mlflow: str = "",
) -> AblationResult:
    """Every configured model over lesion-grouped folds x seeds, compared with the baseline.

    Args:
        config: a config, preset name (default ``"ablation"``: 5 models + gradient boosting, 5 folds x
            3 seeds) or TOML file; its ``[ablation]`` section says what runs.
        out: the output folder; finished cells there are kept, so a second call resumes.
        data: a data root or a dataset from :func:`read_dataset` (None: the config's).
        ray_address: run the cells as Ray tasks on this cluster (``HOST:PORT``).
        show: print progress.
        mlflow: an MLflow tracking URI overriding ``tracking.mlflow_uri``: one parent run with a child
            run per cell.

    Returns:
        The written summaries, tables and plots (:class:`AblationResult`).
    """
    cfg = _tracked(_with_data(_config(config), data), mlflow)
    _check_schema(cfg)
    if ray_address:
        cfg = replace(cfg, ablation={"backend": "ray"}, ray={"address": ray_address})
    with output_folder(out):
        from ..ablation import run_ablation

        paths = run_ablation(cfg, out, show=show)
    return AblationResult(Path(out), paths)


def image_embeddings(
    config: ConfigLike = None, data: str | Path | LesionDataset | None = None, *, backend: str | None = None
) -> Embeddings:
    """The frozen image branch's embeddings of every image, as the frozen path trains on them.

    Args:
        config: a config, preset name or TOML file: its model (backbone, weights, multi-scale), image
            size, flip averaging, batch size and precision decide the embeddings.
        data: a data root or a dataset from :func:`read_dataset` (None: the config's).
        backend: None: the cached embeddings (computed once with ``train.embed_backend`` and stored
            in the package cache); ``torch``, ``onnxruntime``, ``openvino`` or ``auto`` (the one the
            default picks here): a fresh pass with that backend, timed, nothing cached (to compare
            backends with the cache).
    """
    import time

    from ..models.inference import resolve_backend
    from ..runs import compute_embeddings, inputs_from_config

    cfg, inputs = inputs_from_config(_with_data(_config(config), data))
    t = cfg.train
    views, size = 4 if t.flip_average else 1, tuple(cfg.data.image_size)
    if backend is None:
        return Embeddings(inputs.embeddings(), "cache", 0.0, views, size)  # type: ignore[arg-type]
    branch = inputs.model.image_branch
    if branch is None:
        raise ConfigError(f"model '{cfg.model.name}' has no image branch: nothing to embed")
    images = inputs.images()
    backend = resolve_backend(backend, t.embed_precision, inputs.device)
    start = time.perf_counter()
    values = compute_embeddings(
        branch,
        images,
        inputs.normalize,
        flip_average=t.flip_average,
        batch_size=t.embed_batch,
        device=inputs.device,
        backend=backend,
        precision=t.embed_precision,
    )
    return Embeddings(values, backend, time.perf_counter() - start, views, size)  # type: ignore[arg-type]


def eda(data: LesionDataset | str | Path, out: str | Path, **read_options: Any) -> dict[str, Any]:
    """Class balance, every patient feature by class and the missing values of a dataset, as figures.

    Args:
        data: a dataset from :func:`read_dataset`, or a data root read with ``read_options`` (the
            keyword arguments of :func:`read_dataset`) once ``out`` is checked.
        out: the folder of ``summary.json``, ``missing_values.csv`` and the figures.

    Returns:
        The summary (``n_images``, ``n_lesions``, ``class_counts``, ...).
    """
    with output_folder(out):
        from ..report.eda import run_eda

        dataset = data if not isinstance(data, str | Path) else read_dataset(data, **read_options)
        return run_eda(dataset.metadata, out, dataset.schema)


def split(
    dataset: LesionDataset, *, test_size: float = 0.15, val_size: float = 0.15, folds: int = 0, seed: int = 0
) -> pd.DataFrame:
    """A lesion-grouped, class-stratified train/val/test split (or ``folds`` folds) of a dataset.

    Returns:
        One row per image: ``image_id``, ``lesion_id``, ``dx``, ``split`` (and ``fold``); no group is
        in two splits (lesions, or patients where the schema groups by patient).
    """
    from ..data.splits import split_lesions, split_rule

    return split_lesions(
        dataset.metadata,
        test_size=test_size,
        val_size=val_size,
        folds=folds,
        seed=seed,
        group_label=split_rule(dataset.schema),
    )


def ablation_folds(dataset: LesionDataset, folds: int = 5, seed: int = 0) -> pd.Series:
    """The fold (0 to ``folds - 1``) of every image, as :func:`ablate` assigns them: lesion-grouped (patient-grouped
    where the schema groups by patient) and class-stratified; ``seed`` is the config's ``data.split_seed``."""
    from ..data.splits import fold_assignment, split_rule

    return fold_assignment(dataset.metadata, folds, seed, split_rule(dataset.schema))


def lesion_subset(root: str | Path, keep_one_of: int) -> Path:
    """One of ``keep_one_of`` lesion-grouped, class-stratified folds of a HAM10000 root, as a HAM10000 folder.

    For trying things on real data quickly: the subset is written once into the cache and reused;
    ``keep_one_of <= 1`` returns ``root`` itself.
    """
    from ..data.splits import lesion_grouped_subset

    return Path(lesion_grouped_subset(Path(root), keep_one_of))


def cache_home() -> Path:
    """The package cache (``$MMLESION_CACHE``, else ``~/.cache/multimodal_lesion``)."""
    from ..data.cache import cache_home as home

    return Path(home())


def _config(config: ConfigLike) -> ExperimentConfig:
    return config if isinstance(config, ExperimentConfig) else load_config(config)


def _with_data(cfg: ExperimentConfig, data: str | Path | LesionDataset | None) -> ExperimentConfig:
    """``cfg`` reading ``data``: a root, or a read dataset (its root, image folder and preset schema)."""
    if data is None:
        return cfg
    if isinstance(data, str | Path):
        return replace(cfg, data={"root": str(data)})
    from ..data.schema import SCHEMAS

    settings: dict[str, Any] = {"root": str(data.root)}
    if data.schema.name in SCHEMAS:  # a schema read from a file stays the config's (a file path)
        settings["schema"] = data.schema.name
    if data.image_root is not None:
        settings["images"] = str(data.image_root)
    if not data.has_images:
        settings["images"] = "none"
    return replace(cfg, data=settings)


def _check_schema(cfg: ExperimentConfig) -> None:
    """A bad schema file fails before any output is touched."""
    from ..data.schema_file import resolve_schema

    resolve_schema(cfg.data.schema, duplicates=cfg.data.duplicates)


__all__ = [
    "AblationResult",
    "Attributions",
    "ConfigLike",
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
]
