"""From a config to a trained and evaluated run folder: train one model, score it on its splits.

The run folder's files are written through :class:`~multimodal_lesion.runs.RunFolder`; figures are
drawn by the report layer from the :class:`Evaluation` returned here.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ExperimentConfig
from ..data.patient import subgroup_attributes
from ..data.schema import DatasetSchema, preset
from ..models import check_model_mode, model_description
from ..runs import (
    RunFolder,
    RunInputs,
    inputs_from_config,
    load_run,
    predict_logits,
    resolve_device,
    with_concrete_backend,
)
from ..tracking import Tracker, config_params, numbers
from .audit import subgroup_audit
from .calibration import BalancedScaler, TemperatureScaler
from .distributed import DistInfo, finish, init_distributed, main_first, wrap_model
from .engine import FitResult, class_weights, fit
from .metrics import classification_metrics
from .robustness import missing_metadata_scores
from .uncertainty import uncertainty_summary

#: Lesion-bootstrap draws behind each split's balanced-accuracy interval in ``metrics.json``.
BOOTSTRAP = 2000


@dataclass(frozen=True)
class SplitScores:
    """The predictions of one split: targets, raw and temperature-scaled probabilities."""

    split: str
    image_ids: list[str]
    targets: np.ndarray
    raw: np.ndarray
    calibrated: np.ndarray


@dataclass
class Evaluation:
    """What evaluating a run produced: ``metrics.json``'s content, the scores per split and the folder."""

    folder: RunFolder
    metrics: dict[str, Any]
    scores: dict[str, SplitScores] = field(default_factory=dict)
    schema: DatasetSchema = field(default_factory=lambda: preset("ham10000"))  # the scored classes and names


def train_model(
    inputs: RunInputs,
    folder: RunFolder | None = None,
    *,
    resume: bool = False,
    show: bool = True,
    dist: DistInfo | None = None,
    tracker: Tracker | None = None,
) -> FitResult:
    """Train ``inputs.model`` on its training split with early stopping on val: the one way to train a model.

    A ``tracker`` gets the loss and validation scores of every epoch.
    """
    t = inputs.cfg.train
    weights = None
    if t.balance == "weighted_loss":
        weights = class_weights(inputs.targets[inputs.indices("train")], inputs.schema.n_classes)
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    train_b = inputs.batches("train", train=True, show=show, rank=rank, world_size=world)
    val_b = inputs.batches("val", train=False, show=show)
    model = wrap_model(inputs.model, dist) if dist is not None else inputs.model
    return fit(model, train_b, val_b, t, folder, weights=weights, resume=resume, show_progress=show, tracker=tracker)


def evaluate(
    inputs: RunInputs,
    folder: RunFolder,
    splits: tuple[str, ...] = ("val", "test"),
    tta: bool = False,
    show: bool = True,
) -> Evaluation:
    """Metrics on each split before and after temperature scaling (fitted on val); writes the predictions.

    A third set, ``balanced``, scores the decisions of the :class:`BalancedScaler` fitted on val
    (uniform class prior: the arg-max that balanced accuracy rewards); ``calibrated`` stays the
    probabilities of the data's own class mix.
    """
    logits = {
        s: predict_logits(inputs.model, inputs.batches(s, train=False, show=show), inputs.device, tta=tta)
        for s in dict.fromkeys(("val", *splits))
    }
    schema = inputs.schema
    scaler = TemperatureScaler().fit(logits["val"][0], logits["val"][1])
    balanced = BalancedScaler().fit(logits["val"][0], logits["val"][1])
    results: dict[str, Any] = {
        "temperature": float(scaler.temperature_),
        "tta": tta,
        "key_class": schema.key_class,
        "groups": schema.group_noun,  # what n_lesions counts: lesions, or patients for patient-grouped data
        "balanced_temperature": balanced.temperature_,
        "balanced_bias": dict(zip(schema.classes, balanced.bias_.tolist(), strict=True)),
    }
    lesions = inputs.dataset.metadata["lesion_id"].to_numpy()
    scores = {}
    for split in splits:
        z, y, ids = logits[split]
        rows = inputs.indices(split)
        raw = torch.softmax(torch.from_numpy(z), 1).numpy()
        cal = scaler.transform(z)
        score = functools.partial(
            classification_metrics,
            classes=schema.classes,
            key_class=schema.key_class,
            lesion_ids=lesions[rows],
            n_boot=BOOTSTRAP,
        )
        results[split] = {
            "uncalibrated": score(y, raw),
            "calibrated": score(y, cal),
            "balanced": score(y, balanced.transform(z)),
        }
        if split != "val":  # the sets and thresholds are fitted on val: scoring them there says nothing
            val = (logits["val"][1], scaler.transform(logits["val"][0]))
            results[split].update(trust_report(inputs, split, val, (y, cal), balanced))
        scores[split] = SplitScores(split, ids, y, raw, cal)
        folder.write_predictions(split, ids, [schema.classes[i] for i in y], cal, schema.classes)
    return Evaluation(folder, results, scores, schema)


def trust_report(
    inputs: RunInputs,
    split: str,
    val: tuple[np.ndarray, np.ndarray],
    scored: tuple[np.ndarray, np.ndarray],
    balanced: BalancedScaler,
) -> dict[str, Any]:
    """When not to trust the run on ``split``: conformal sets and deferral (calibrated on val), the
    subgroup audit, and the metrics with patient features absent (models that read metadata)."""
    u = inputs.cfg.uncertainty
    rows = inputs.indices(split)
    meta = inputs.dataset.metadata.iloc[rows]
    key = inputs.schema.key_index
    return {
        "uncertainty": uncertainty_summary(
            val,
            scored,
            inputs.schema.classes,
            inputs.schema.key_class,
            score=u.conformal_score,
            levels=u.levels,
            class_conditional=u.class_conditional,
            defer=u.defer,
            key_sensitivity=u.key_sensitivity,
        ),
        "subgroups": subgroup_audit(
            scored[0], scored[1], subgroup_attributes(meta), meta["lesion_id"].to_numpy(), key, n_boot=u.bootstrap
        ),
        "missing_metadata": missing_metadata_scores(inputs, split, balanced.transform),
    }


def train_run(
    cfg: ExperimentConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    show: bool = True,
    tracker: Tracker | None = None,
) -> Evaluation:
    """Train one model as configured and write a complete run folder to ``out`` (figures aside).

    A folder already holding a run is refused unless ``resume`` (same settings and data, continued
    from ``last.pt``) or ``overwrite`` (the old run removed first); the model name and the device are
    checked too, all before the data are read or anything is written.
    Under ``torchrun`` every process trains on its shard of each epoch (DDP); rank 0 writes. A ``tracker``
    gets the resolved config as params, every epoch's scores and, at the end, every number of ``metrics.json``.
    """
    folder = RunFolder(out)
    model_description(cfg.model.name)  # an unknown model name is the registry's ConfigError
    check_model_mode(cfg.model.name, cfg.train.mode)  # before the run folder is touched
    resolve_device(cfg.train.device)
    cfg = with_concrete_backend(cfg)  # what config.toml records and --resume compares: never "auto"
    info = init_distributed(cfg.train.device)
    if info.is_main:
        folder.begin_training(cfg, resume=resume, overwrite=overwrite)
    with main_first(info):
        cfg, inputs = inputs_from_config(cfg, show and info.is_main)
        if resume and info.is_main:
            folder.check_resume_splits(inputs.splits)
        inputs.embeddings(show) if cfg.train.mode == "frozen" and inputs.model.image_branch else inputs.images()
    if info.is_main:
        folder.write_inputs(
            cfg, inputs.splits, inputs.encoder, device=str(inputs.device), torch_threads=torch.get_num_threads()
        )
    tracker = tracker if info.is_main else None
    if tracker is not None:
        tracker.log_params(config_params(cfg))
    result = train_model(inputs, folder, resume=resume, show=show, dist=info, tracker=tracker)
    evaluation = Evaluation(folder, {}, schema=inputs.schema)
    if info.is_main:
        evaluation = evaluate(inputs, folder, tta=cfg.train.tta, show=show)
        evaluation.metrics.update(
            best_epoch=result.best_epoch,
            model=cfg.model.name,
            mode=cfg.train.mode,
            notes=inputs.notes,
            world_size=info.world_size,
            data_root=str(inputs.dataset.root),
            n_lesions={s: inputs.n_lesions(s) for s in ("train", "val", "test")},
        )
        folder.write_metrics(evaluation.metrics)
        if tracker is not None:
            tracker.log_metrics(numbers(evaluation.metrics))
    finish(info)
    return evaluation


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    data: str | Path | None = None,
    tta: bool = False,
    show: bool = True,
    device: str | None = None,
    data_settings: Mapping[str, Any] | None = None,
) -> Evaluation:
    """Evaluate a run on one split; writes ``<run>/eval/<split>/metrics.json`` and the predictions.

    ``data_settings`` override the run's ``data.*`` (``images``, ``duplicates``, ``drop_missing``).
    """
    run = load_run(run_dir, data, show, device, data_settings)
    evaluation = evaluate(run.inputs, run.folder.evaluation(split), splits=(split,), tta=tta, show=show)
    evaluation.folder.write_metrics(evaluation.metrics)
    return evaluation
