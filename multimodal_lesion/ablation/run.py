"""Train every model of an ablation over K lesion-grouped folds x S seeds; one JSON file per cell.

A cell (model, fold, seed) tests on fold k, stops early on fold k+1 and trains on the rest; the
metadata encoder is fitted on the training folds only. Finished cells are kept on disk (written
atomically), so re-running the command computes only what is missing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..config import ExperimentConfig, differences, replace, to_dict
from ..data.cache import cache_key
from ..data.dataset import LesionDataset
from ..data.splits import fold_assignment, split_rule
from ..data.user_splits import given_folds, given_split
from ..errors import CheckpointError, ConfigError
from ..io import atomic_write, read_json, remove_stale_temps, write_json
from ..models import check_model_mode, list_models
from ..runs import (
    RunFolder,
    RunInputs,
    class_targets,
    predict_logits,
    prepare_inputs,
    resolve_data,
    resolve_device,
    with_concrete_backend,
    write_provenance,
)
from ..tracking import check_tracking
from ..training.metrics import classification_metrics
from ..training.robustness import missing_metadata_scores
from ..training.runner import train_model
from .backends import check_backend, run_cells
from .summary import write_summaries
from .tracking import track_ablation

GBM = "gbm_metadata"


@dataclass(frozen=True)
class Cell:
    """One trained-and-tested model: which model, which test fold, which seed."""

    model: str
    fold: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model}__fold{self.fold}__seed{self.seed}"


#: Settings that say where and on how many workers the cells run, not what they compute.
PLACEMENT = ("ablation.workers", "ablation.backend", "ray")
#: Settings no cell reads: the summaries' uncertainty settings, the explanation settings, where it is tracked.
SUMMARY_ONLY = ("uncertainty", "explain", "tracking")
#: Settings added after ablations were first written, with the value that computes what a cell computed before
#: the setting existed and the settings that only matter beside another value: at that value they leave the key,
#: so a finished ablation keeps its cells across an upgrade of the package.
NEUTRAL = (("data.color_constancy", "none", ("data.color_constancy_p", "data.color_constancy_gamma")),)
#: Settings that choose how the same numbers are computed, not which: the float32 embedding backends agree to
#: 1e-3 and share one cache of embeddings and maps, so a cell is the same whichever backend ran. Cells finished
#: under the old default ("torch") or an explicit backend stay finished when ``auto`` picks another one.
IMPLEMENTATION = ("train.embed_backend",)


def config_key(cfg: ExperimentConfig) -> str:
    """What a finished cell depends on: the whole config except where, on how many workers and by which
    implementation it ran."""
    raw = to_dict(cfg)
    drop = [*PLACEMENT, *SUMMARY_ONLY, *IMPLEMENTATION]
    for item, value, beside in NEUTRAL:
        section, _, key = item.partition(".")
        if raw[section][key] == value:
            drop += [item, *beside]
    for item in drop:
        section, _, key = item.partition(".")
        raw[section].pop(key) if key else raw.pop(section)
    return cache_key(raw)


def _done(path: Path, key: str) -> bool:
    """A cell file that exists, parses and was computed under the same config."""
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("config_key") == key  # anything else is computed again


def cell_splits(folds: pd.Series, k: int, n_folds: int) -> pd.DataFrame:
    """Test on fold ``k``, validate on fold ``k+1``, train on the others."""
    split = np.where(folds == k, "test", np.where(folds == (k + 1) % n_folds, "val", "train"))
    return pd.DataFrame({"split": split}, index=folds.index)


def _cells(cfg: ExperimentConfig) -> Iterator[Cell]:
    names = list(cfg.ablation.models) + ([GBM] if cfg.ablation.gbm else [])
    for fold in range(cfg.ablation.folds):
        for seed in cfg.ablation.seeds:
            for model in names:
                yield Cell(model, fold, seed)


def _check_models(cfg: ExperimentConfig) -> None:
    known = set(list_models())
    bad = [m for m in cfg.ablation.models if m not in known]
    if bad:
        raise ConfigError(f"ablation.models: unknown model(s) {', '.join(bad)} (valid: {', '.join(sorted(known))})")
    if cfg.ablation.baseline not in cfg.ablation.models:
        raise ConfigError(f"ablation.baseline: {cfg.ablation.baseline!r} is not one of ablation.models")
    for name in cfg.ablation.models:
        check_model_mode(name, cfg.ablation.mode)


#: Per split (val, test): the row numbers and the predicted probabilities of a cell.
Scored = dict[str, tuple[np.ndarray, np.ndarray]]


def _softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits), 1).numpy()


def _train_neural(
    cell: Cell, cfg: ExperimentConfig, dataset: LesionDataset, splits: pd.DataFrame, shared: RunInputs | None, out: Path
) -> tuple[Scored, list[dict[str, float]], dict[str, Any]]:
    """Train one registered model for a cell; returns its val and test rows with their probabilities,
    the per-epoch history of its training and its missing-metadata scores on the test fold (each
    patient feature, then all, read as missing: the ``unknown`` way of ``training.robustness``,
    scored like the cell, on the softmax; {} for a model without metadata).

    A frozen cell trains its head in memory on the shared embeddings. An end-to-end cell is a full
    training run with its own run folder (``OUT/runs/<cell>``: checkpoints each epoch), so a killed
    cell resumes from its ``last.pt`` instead of starting again.
    """
    cell_cfg = replace(cfg, model={"name": cell.model}, train={"seed": cell.seed})
    inputs = prepare_inputs(cell_cfg, dataset, splits, shared=shared)
    folder = None
    if cfg.ablation.mode == "end2end":
        folder = RunFolder(out / "runs" / cell.name)
        folder.prepare()
        folder.write_inputs(
            cell_cfg, splits.assign(image_id=dataset.metadata["image_id"]), inputs.encoder, device=str(inputs.device)
        )
    result = train_model(inputs, folder, resume=folder is not None and folder.has_last(), show=False)
    tta = cfg.ablation.mode == "end2end" and cfg.train.tta
    probs = {}
    for split in ("val", "test"):
        logits, _, _ = predict_logits(inputs.model, inputs.batches(split, train=False), inputs.device, tta=tta)
        probs[split] = _softmax(logits)
    missing = missing_metadata_scores(inputs, "test", _softmax, ways=("unknown",))
    return {split: (inputs.indices(split), p) for split, p in probs.items()}, result.history, missing


def _train_gbm(cell: Cell, cfg: ExperimentConfig, dataset: LesionDataset, splits: pd.DataFrame) -> Scored:
    """Gradient boosting on the encoded patient features: the non-neural floor."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from ..data.encoder import MetadataEncoder

    split = splits["split"].to_numpy()
    train = np.flatnonzero(split == "train")
    encoder = MetadataEncoder.for_features(dataset.schema.features).fit(dataset.metadata.iloc[train])
    x = encoder.transform(dataset.metadata)
    classes = dataset.schema.classes
    y = class_targets(dataset.metadata, classes)
    gbm = HistGradientBoostingClassifier(
        max_iter=200, learning_rate=0.05, class_weight="balanced", random_state=cell.seed
    ).fit(x[train], y[train])
    out = {}
    for name in ("val", "test"):
        rows = np.flatnonzero(split == name)
        probs = np.zeros((len(rows), len(classes)))
        probs[:, gbm.classes_] = gbm.predict_proba(x[rows])
        out[name] = (rows, probs)
    return out


def run_cell(
    cell: Cell, cfg: ExperimentConfig, dataset: LesionDataset, folds: pd.Series, shared: RunInputs | None, out: Path
) -> dict[str, Any]:
    """Train and test one cell; returns its record (metrics, out-of-fold predictions, seconds)."""
    t0 = time.perf_counter()
    splits = cell_splits(folds, cell.fold, cfg.ablation.folds)
    history: list[dict[str, float]] = []
    missing: dict[str, Any] = {}
    if cell.model == GBM:
        scored = _train_gbm(cell, cfg, dataset, splits)
    else:
        scored, history, missing = _train_neural(cell, cfg, dataset, splits, shared, out)
    (rows, probs), (val_rows, val_probs) = scored["test"], scored["val"]
    lesions = dataset.metadata["lesion_id"].to_numpy()[rows]
    schema = dataset.schema
    metrics = classification_metrics(
        class_targets(dataset.metadata, schema.classes)[rows],
        probs,
        classes=schema.classes,
        key_class=schema.key_class,
        lesion_ids=lesions,
    )
    ids = dataset.metadata["image_id"].to_numpy()
    return {
        "model": cell.model,
        "fold": cell.fold,
        "seed": cell.seed,
        "seconds": time.perf_counter() - t0,
        "metrics": metrics,
        "image_ids": ids[rows].tolist(),
        "probs": np.round(probs, 6).tolist(),
        "val_image_ids": ids[val_rows].tolist(),  # the stopping fold: calibrates conformal sets of the ensembles
        "val_probs": np.round(val_probs, 6).tolist(),
        "history": history,  # per epoch (history.csv's columns); none for the gradient boosting floor
        "missing_metadata": missing,  # test fold with features read as missing; {} without metadata
    }


@dataclass
class CellContext:
    """What every cell needs: handed to pool workers by fork (the embeddings are not copied), to Ray
    workers through the object store (once)."""

    cfg: ExperimentConfig
    dataset: LesionDataset
    folds: pd.Series
    shared: RunInputs | None
    out: Path

    def run(self, cell: Cell) -> str:
        """Train, test and save one cell (atomically, stamped with the config key); returns its name."""
        record = run_cell(cell, self.cfg, self.dataset, self.folds, self.shared, self.out)
        write_json(self.out / "cells" / f"{cell.name}.json", {**record, "config_key": config_key(self.cfg)})
        return cell.name


def shared_backbone(cfg: ExperimentConfig, dataset: LesionDataset, folds: pd.Series, show: bool) -> RunInputs | None:
    """One frozen backbone and its cached embeddings, shared by every image model of the ablation.

    Partial mode shares nothing in memory: its cached maps are built here, once, before any cell reads them.
    """
    if cfg.ablation.mode == "partial" and any(m != "metadata_only" for m in cfg.ablation.models):
        partial = replace(cfg, model={"name": "image_only"})
        prepare_inputs(partial, dataset, cell_splits(folds, 0, cfg.ablation.folds)).feature_maps(show=show)
    if cfg.ablation.mode != "frozen" or not any(m != "metadata_only" for m in cfg.ablation.models):
        return None
    inputs = prepare_inputs(
        replace(cfg, model={"name": "image_only"}), dataset, cell_splits(folds, 0, cfg.ablation.folds)
    )
    inputs.embeddings(show=show)
    inputs.cached_images = None  # frozen cells read embeddings only: never ship the image array to a worker
    return inputs


def _check_same_ablation(out: Path, cfg: ExperimentConfig) -> None:
    """Refuse to run into a folder whose finished cells were computed with other settings (they would be replaced)."""
    if not (out / "config.toml").is_file() or not any((out / "cells").glob("*.json")):
        return
    changed = differences(RunFolder(out).read_config(), cfg, ignore=(*PLACEMENT, *SUMMARY_ONLY, *IMPLEMENTATION))
    if changed:
        raise CheckpointError(
            f"{out}: holds an ablation with other settings ({'; '.join(changed[:4])}); re-running it there would "
            "replace its cells; choose another --out"
        )


def run_ablation(cfg: ExperimentConfig, out: str | Path, *, show: bool = True) -> dict[str, Path]:
    """Run (or finish) the ablation configured in ``cfg`` and write results, summaries and plots to ``out``."""
    _check_models(cfg)
    resolve_device(cfg.train.device)
    check_backend(cfg)
    check_tracking(cfg.tracking.mlflow_uri)
    out = Path(out)
    trained = RunFolder(out).trained_files()
    if trained:
        raise CheckpointError(
            f"{out}: holds a training run ({', '.join(trained)}); an ablation there would replace its config.toml; "
            "choose another --out"
        )
    dataset = resolve_data(cfg, show)
    cfg = with_concrete_backend(replace(cfg, data={"root": str(dataset.root)}, train={"mode": cfg.ablation.mode}))
    _check_same_ablation(out, cfg)
    given = given_split(dataset, cfg.data.splits)
    folds = (
        fold_assignment(dataset.metadata, cfg.ablation.folds, cfg.data.split_seed, split_rule(dataset.schema))
        if given is None
        else given_folds(dataset, given, cfg.ablation.folds, cfg.data.allow_leaks)
    )
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    write_provenance(out, cfg, torch_threads=torch.get_num_threads())
    with atomic_write(out / "folds.csv") as fh:
        dataset.metadata[["image_id", "lesion_id", "dx"]].assign(fold=folds.to_numpy()).to_csv(fh, index=False)
    t0 = time.perf_counter()
    shared = shared_backbone(cfg, dataset, folds, show)
    embed_seconds = time.perf_counter() - t0
    cells = list(_cells(cfg))
    key = config_key(cfg)
    todo = [c for c in cells if not _done(out / "cells" / f"{c.name}.json", key)]
    if show and len(todo) < len(cells):
        print(f"resuming: {len(cells) - len(todo)} of {len(cells)} cells already done")
    t1 = time.perf_counter()
    run_cells(todo, CellContext(cfg, dataset, folds, shared, out), show)
    timing = {
        "embedding_seconds": round(embed_seconds, 2),
        "cells_seconds": round(time.perf_counter() - t1, 2),
        "cells_computed": len(todo),
        "cells_total": len(cells),
        "backend": cfg.ablation.backend,
        "mode": cfg.ablation.mode,
    }
    records = [read_json(out / "cells" / f"{c.name}.json") for c in cells]
    paths = write_summaries(records, cfg, dataset, out, timing)
    track_ablation(cfg, out, records, paths)  # with tracking.mlflow_uri: a parent run, a child per cell
    return paths
