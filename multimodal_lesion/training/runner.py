"""From a config to a finished run folder, and back: train, evaluate, predict.

A run folder holds everything needed to reuse the model: the resolved ``config.toml``, ``splits.csv``,
the fitted metadata encoder (``encoder.json``), checkpoints, ``history.csv``, ``metrics.json``,
figures and ``versions.json``.
"""
from __future__ import annotations

import platform
import warnings
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..config import ExperimentConfig, load_config, replace, to_toml
from ..data.constants import CLASSES, UNKNOWN
from ..data.datasets import LesionDataset, Normalize, NormalizingCollate, build_augmentation
from ..data.encoder import MetadataEncoder
from ..data.ham10000 import Ham10000, read_ham10000
from ..data.sampling import EpochSampler, TensorBatches
from ..data.splits import split_lesions
from ..errors import CheckpointError, ConfigError
from ..io import atomic_write, read_json, remove_stale_temps, write_json
from ..models import create_model
from .calibration import BalancedScaler, TemperatureScaler
from .checkpoints import load_checkpoint, load_model_state
from .embeddings import cached_embeddings, embed_images
from .distributed import finish, init_distributed, main_first, wrap_model
from .engine import class_weights, fit, predict_logits, resolve_device, seed_everything
from .metrics import classification_metrics

RUN_FILES = ("config.toml", "splits.csv", "encoder.json", "best.pt")
LIBRARIES = ("multimodal_lesion", "torch", "torchvision", "timm", "numpy", "pandas", "scikit-learn", "shap",
             "captum", "grad-cam")


def synthetic_root(cfg: ExperimentConfig) -> Path:
    """Where the embedded synthetic dataset lives (generated on first use)."""
    from ..data.cache import cache_home

    return cache_home() / f"synthetic-n{cfg.data.synthetic_n}-seed{cfg.data.synthetic_seed}"


def resolve_data(cfg: ExperimentConfig, show: bool = True) -> Ham10000:
    """Read the configured HAM10000 root, or generate / reuse the synthetic default."""
    from ..data.synthetic import make_synthetic

    root = Path(cfg.data.root) if cfg.data.root else synthetic_root(cfg)
    if not cfg.data.root:  # returns at once when the dataset there is current
        if show and not (root / "HAM10000_metadata.csv").is_file():
            print(f"generating the synthetic dataset in {root}")
        make_synthetic(root, n=cfg.data.synthetic_n, seed=cfg.data.synthetic_seed)
    return read_ham10000(root, drop_missing=cfg.data.drop_missing)


def make_splits(cfg: ExperimentConfig, ham: Ham10000) -> pd.DataFrame:
    """Lesion-grouped, stratified split of ``ham``; with folds, ``data.fold`` is the validation fold."""
    d = cfg.data
    splits = split_lesions(ham.metadata, test_size=d.test_size, val_size=d.val_size, folds=d.folds,
                           seed=d.split_seed)
    if d.folds:
        if not 0 <= d.fold < d.folds:
            raise ConfigError(f"data.fold: {d.fold} is not in 0..{d.folds - 1}")
        splits["split"] = np.where(splits["fold"] < 0, "test", np.where(splits["fold"] == d.fold, "val", "train"))
    return splits


def encoder_to_json(encoder: MetadataEncoder) -> dict[str, Any]:
    """The fitted encoder's parameters and learned attributes (no pickle)."""
    learned = {k: v for k, v in vars(encoder).items() if k.endswith("_") and not k.startswith("_")}
    return {"params": encoder.get_params(), "learned": learned}


def encoder_from_json(state: dict[str, Any]) -> MetadataEncoder:
    """Rebuild a fitted :class:`MetadataEncoder` from :func:`encoder_to_json`'s output."""
    encoder = MetadataEncoder(**state["params"])
    for k, v in state["learned"].items():
        setattr(encoder, k, v)
    return encoder


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries a result depends on."""
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class Prepared:
    """Everything built from a config and a dataset that training, evaluation and explanation share."""

    cfg: ExperimentConfig
    ham: Ham10000
    splits: pd.DataFrame
    encoder: MetadataEncoder
    meta: np.ndarray
    targets: np.ndarray
    model: torch.nn.Module
    device: torch.device
    notes: list[str] = field(default_factory=list)  # e.g. categories unseen in training, encoded as unknown
    _images: np.ndarray | None = field(default=None, repr=False)
    _embeddings: np.ndarray | None = field(default=None, repr=False)

    def indices(self, split: str) -> np.ndarray:
        """Row numbers of one split (``train``, ``val`` or ``test``)."""
        idx = np.flatnonzero(self.splits["split"].to_numpy() == split)
        if len(idx) == 0:
            raise ConfigError(f"split '{split}' has no images")
        return idx

    @property
    def image_ids(self) -> list[str]:
        return self.ham.metadata["image_id"].tolist()

    @property
    def normalize(self) -> Normalize:
        dc = self.model.image_branch.data_config
        return Normalize(dc["mean"], dc["std"])

    def images(self) -> np.ndarray:
        """The cached uint8 image array (N, H, W, 3), built on first use."""
        from ..data.cache import image_array

        if self._images is None:
            self._images = image_array(self.ham, self.cfg.data.image_size, self.cfg.data.cache_dir or None)
        return self._images

    def embeddings(self, show: bool = True) -> np.ndarray:
        """Frozen-backbone embeddings of every image, cached on disk."""
        from ..data.cache import default_cache_dir

        if self._embeddings is None:
            m = self.cfg.model
            identity = {"backbone": m.backbone, "weights": m.weights, "multiscale": m.multiscale,
                        "size": list(self.cfg.data.image_size)}
            self._embeddings = cached_embeddings(
                self.model.image_branch, self.images, len(self.ham.metadata), self.normalize,
                folder=default_cache_dir(self.ham, self.cfg.data.cache_dir or None),
                fingerprint=self.ham.fingerprint, identity=identity, flip_average=self.cfg.train.flip_average,
                batch_size=self.cfg.train.batch_size, device=self.device, show=show)
        return self._embeddings

    def batches(self, split: str, *, train: bool, show: bool = True, rank: int = 0, world_size: int = 1):
        """Dict batches of one split: cached embeddings (frozen) or augmented images (end2end)."""
        t = self.cfg.train
        idx = self.indices(split)
        weights = None
        if train and t.balance == "sampler":
            counts = np.bincount(self.targets[idx], minlength=len(CLASSES))
            weights = 1.0 / counts[self.targets[idx]]
        sampler = EpochSampler(len(idx), shuffle=train, seed=t.seed, weights=weights, rank=rank,
                               world_size=world_size)
        if t.mode == "frozen" or self.model.image_branch is None:
            tensors = {"meta": torch.from_numpy(self.meta[idx]), "target": torch.from_numpy(self.targets[idx])}
            if self.model.image_branch is not None:
                tensors["embedding"] = torch.from_numpy(self.embeddings(show)[idx])
            ids = self.image_ids
            return TensorBatches(tensors, [ids[i] for i in idx], t.batch_size, sampler)
        dataset = LesionDataset(self.images(), self.meta, self.targets, self.image_ids, idx,
                                build_augmentation(t.augment) if train else None)
        return _EpochLoader(torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, sampler=sampler,
                                                        collate_fn=NormalizingCollate(self.normalize),
                                                        num_workers=self.cfg.data.num_workers,
                                                        pin_memory=self.device.type == "cuda"), sampler)


class _EpochLoader:
    """A DataLoader whose sampler is re-seeded each epoch by the engine."""

    def __init__(self, loader: torch.utils.data.DataLoader, sampler: EpochSampler) -> None:
        self.loader, self.sampler = loader, sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)


def prepare(cfg: ExperimentConfig, ham: Ham10000, splits: pd.DataFrame, encoder: MetadataEncoder | None = None,
            image_branch: torch.nn.Module | None = None) -> Prepared:
    """Fit the encoder on the training split (unless given), encode everything and build the model.

    ``image_branch`` lets callers that train many heads (ablations) share one frozen backbone.
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    train_rows = ham.metadata[splits["split"].to_numpy() == "train"]
    encoder = encoder or MetadataEncoder().fit(train_rows)
    with warnings.catch_warnings(record=True) as caught:  # categories unseen in training -> unknown
        warnings.simplefilter("always", UserWarning)
        meta = encoder.transform(ham.metadata).astype(np.float32)
    targets = ham.metadata["dx"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy(np.int64)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    model = create_model(cfg.model.name, meta_dim=meta.shape[1], num_classes=len(CLASSES), cfg=cfg.model,
                         image_branch=image_branch)
    if cfg.train.mode == "frozen" and model.image_branch is not None:
        model.image_branch.requires_grad_(False)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    notes = [str(w.message) for w in caught]
    return Prepared(cfg, ham, splits, encoder, meta, targets, model, device, notes)


def evaluate_prepared(prep: Prepared, out: Path, splits: tuple[str, ...] = ("val", "test"), tta: bool = False,
                      show: bool = True) -> dict[str, Any]:
    """Metrics on each split before and after temperature scaling (fitted on val), with figures.

    A third set, ``balanced``, scores the decisions of the :class:`BalancedScaler` fitted on val
    (uniform class prior: the arg-max that balanced accuracy rewards); ``calibrated`` stays the
    probabilities of the data's own class mix.
    """
    from ..report.figures import plot_confusion, plot_reliability, plot_roc

    logits = {s: predict_logits(prep.model, prep.batches(s, train=False, show=show), prep.device, tta=tta)
              for s in dict.fromkeys(("val",) + tuple(splits))}
    scaler = TemperatureScaler().fit(logits["val"][0], logits["val"][1])
    balanced = BalancedScaler().fit(logits["val"][0], logits["val"][1])
    results: dict[str, Any] = {"temperature": float(scaler.temperature_), "tta": tta,
                               "balanced_temperature": balanced.temperature_,
                               "balanced_bias": dict(zip(CLASSES, balanced.bias_.tolist()))}
    lesions = prep.ham.metadata["lesion_id"].to_numpy()
    for split in splits:
        z, y, ids = logits[split]
        rows = prep.indices(split)
        raw = torch.softmax(torch.from_numpy(z), 1).numpy()
        cal = scaler.transform(z)
        results[split] = {"uncalibrated": classification_metrics(y, raw, lesion_ids=lesions[rows]),
                          "calibrated": classification_metrics(y, cal, lesion_ids=lesions[rows]),
                          "balanced": classification_metrics(y, balanced.transform(z), lesion_ids=lesions[rows])}
        fig = out / "figures"
        fig.mkdir(parents=True, exist_ok=True)
        plot_confusion(np.array(results[split]["calibrated"]["confusion_matrix"]), CLASSES, fig / f"confusion_{split}.png")
        plot_roc(y, cal, CLASSES, fig / f"roc_{split}.png")
        plot_reliability(y, raw, fig / f"reliability_{split}.png")
        _write_predictions(out / f"predictions_{split}.csv", ids, y, cal)
    return results


def _write_predictions(path: Path, ids: list[str], y: np.ndarray, probs: np.ndarray) -> None:
    df = pd.DataFrame(probs, columns=[f"p_{c}" for c in CLASSES])
    df.insert(0, "target", [CLASSES[i] for i in y])
    df.insert(0, "image_id", ids)
    with atomic_write(path) as fh:
        df.to_csv(fh, index=False)


def train_run(cfg: ExperimentConfig, out: str | Path, *, resume: bool = False, show: bool = True
              ) -> dict[str, Any]:
    """Train one model as configured and write a complete run folder to ``out``.

    Under ``torchrun`` every process trains on its shard of each epoch (DDP); rank 0 writes.
    """
    out = Path(out)
    if resume and not (out / "last.pt").is_file():
        raise CheckpointError(f"{out}: nothing to resume (no last.pt)")
    info = init_distributed(cfg.train.device)
    if info.is_main and out.is_dir():
        remove_stale_temps(out)
    with main_first(info):
        ham = resolve_data(cfg, show and info.is_main)
        cfg = replace(cfg, data={"root": str(ham.root)})
        splits = make_splits(cfg, ham)
        prep = prepare(cfg, ham, splits)
        prep.embeddings(show) if cfg.train.mode == "frozen" and prep.model.image_branch else prep.images()
    if info.is_main:
        _write_run_files(out, cfg, prep)
    train_idx = prep.indices("train")
    weights = class_weights(prep.targets[train_idx], len(CLASSES)) if cfg.train.balance == "weighted_loss" else None
    train_b = prep.batches("train", train=True, show=show, rank=info.rank, world_size=info.world_size)
    val_b = prep.batches("val", train=False, show=show)
    result = fit(wrap_model(prep.model, info), train_b, val_b, cfg.train, out, weights=weights, resume=resume,
                 show_progress=show)
    metrics: dict[str, Any] = {}
    if info.is_main:
        metrics = evaluate_prepared(prep, out, tta=cfg.train.tta, show=show)
        metrics.update(best_epoch=result.best_epoch, model=cfg.model.name, mode=cfg.train.mode, notes=prep.notes,
                       world_size=info.world_size, data_root=str(ham.root),
                       n_lesions={s: int(ham.metadata["lesion_id"][prep.indices(s)].nunique())
                                  for s in ("train", "val", "test")})
        write_json(out / "metrics.json", metrics)
    finish(info)
    return metrics


def _write_run_files(out: Path, cfg: ExperimentConfig, prep: Prepared) -> None:
    """The resolved config, the split, the fitted encoder and the library versions of a run."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "config.toml") as fh:
        fh.write(to_toml(cfg))
    with atomic_write(out / "splits.csv") as fh:
        prep.splits.to_csv(fh, index=False)
    write_json(out / "encoder.json", encoder_to_json(prep.encoder))
    write_json(out / "versions.json", {**library_versions(), "device": str(prep.device),
                                      "torch_threads": torch.get_num_threads()})


@dataclass
class LoadedRun:
    """A finished run folder, loaded: config, data, encoder, trained model and temperature."""

    run_dir: Path
    prep: Prepared
    temperature: float


def _check_run_dir(run_dir: Path) -> None:
    missing = [f for f in RUN_FILES if not (run_dir / f).is_file()]
    if not run_dir.is_dir() or missing:
        raise CheckpointError(f"{run_dir}: not a run folder (missing {', '.join(missing) or 'folder'})")


def _load_weights(model: torch.nn.Module, run_dir: Path) -> float:
    """Load ``best.pt`` into ``model`` (eval mode); returns the fitted temperature (1.0 if none)."""
    ckpt = load_checkpoint(run_dir / "best.pt")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{run_dir / 'best.pt'}: not a multimodal_lesion checkpoint")
    load_model_state(model, ckpt["model"], run_dir / "best.pt")
    model.eval()
    metrics_path = run_dir / "metrics.json"
    return float(read_json(metrics_path).get("temperature", 1.0)) if metrics_path.is_file() else 1.0


def load_model(run_dir: str | Path) -> tuple[ExperimentConfig, MetadataEncoder, torch.nn.Module, float]:
    """The trained model of a run without its dataset: (config, encoder, model, temperature)."""
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    cfg = load_config(run_dir / "config.toml")
    encoder = encoder_from_json(read_json(run_dir / "encoder.json"))
    model = create_model(cfg.model.name, meta_dim=len(encoder.get_feature_names_out()), num_classes=len(CLASSES),
                         cfg=replace(cfg, model={"weights": "none"}).model)
    model.to(resolve_device(cfg.train.device))
    return cfg, encoder, model, _load_weights(model, run_dir)


def load_run(run_dir: str | Path, data: str | Path | None = None, show: bool = False) -> LoadedRun:
    """Load a run folder written by :func:`train_run` with its data (optionally another data root)."""
    run_dir = Path(run_dir)
    _check_run_dir(run_dir)
    cfg = load_config(run_dir / "config.toml")
    if data is not None:
        cfg = replace(cfg, data={"root": str(data)})
    ham = resolve_data(cfg, show)
    splits = pd.read_csv(run_dir / "splits.csv", dtype={"image_id": str})
    splits = ham.metadata[["image_id"]].merge(splits[["image_id", "split"]], on="image_id", how="left")
    splits["split"] = splits["split"].fillna("unassigned")
    encoder = encoder_from_json(read_json(run_dir / "encoder.json"))
    prep = prepare(replace(cfg, model={"weights": "none"}), ham, splits, encoder)
    prep.cfg = cfg
    return LoadedRun(run_dir, prep, _load_weights(prep.model, run_dir))


def evaluate_run(run_dir: str | Path, split: str = "test", data: str | Path | None = None, tta: bool = False,
                 show: bool = True) -> tuple[dict[str, Any], Path]:
    """Evaluate a run on one split; writes ``<run>/eval/<split>/metrics.json`` and figures."""
    run = load_run(run_dir, data, show)
    out = Path(run_dir) / "eval" / split
    metrics = evaluate_prepared(run.prep, out, splits=(split,), tta=tta, show=show)
    write_json(out / "metrics.json", metrics)
    return metrics, out / "metrics.json"


def _balanced_scaling(run_dir: Path) -> tuple[float, np.ndarray]:
    """(temperature, class biases) of the balanced decision that ``train_run`` fitted on val."""
    path = run_dir / "metrics.json"
    metrics = read_json(path) if path.is_file() else {}
    if "balanced_bias" not in metrics:
        raise CheckpointError(f"{path}: no balanced decision in this run (trained before it existed); "
                              "retrain, or predict without --balanced")
    bias = metrics["balanced_bias"]
    return float(metrics["balanced_temperature"]), np.array([bias[c] for c in CLASSES], dtype=np.float32)


@torch.no_grad()
def predict_image(run_dir: str | Path, image: str | Path, age: float | None = None, sex: str | None = None,
                  localization: str | None = None, balanced: bool = False) -> dict[str, float]:
    """Calibrated class probabilities for one image and optional patient fields (missing = unknown).

    ``balanced`` gives the probabilities of the balanced decision instead (uniform class prior,
    fitted on val; their arg-max is the decision the run's balanced accuracy was scored on).
    """
    from ..data.cache import decode_resized

    cfg, encoder, model, temperature = load_model(run_dir)
    bias = np.zeros(len(CLASSES), dtype=np.float32)
    if balanced:
        temperature, bias = _balanced_scaling(Path(run_dir))
    device = next(model.parameters()).device
    row = pd.DataFrame([{"age": np.nan if age is None else float(age), "sex": sex or UNKNOWN,
                         "localization": localization or UNKNOWN}])
    meta = torch.from_numpy(encoder.transform(row).astype(np.float32)).to(device)
    embedding = None
    if model.image_branch is not None:
        pixels = torch.from_numpy(decode_resized(str(image), cfg.data.image_size)).permute(2, 0, 1)
        dc = model.image_branch.data_config
        x = Normalize(dc["mean"], dc["std"])(pixels).unsqueeze(0).to(device)
        embedding = embed_images(model.image_branch, x, cfg.train.flip_average and cfg.train.mode == "frozen")
    logits = model.forward_head(embedding, meta) / temperature + torch.from_numpy(bias).to(device)
    probs = torch.softmax(logits.float(), 1)[0].cpu().numpy()
    return {c: round(float(p), 6) for c, p in zip(CLASSES, probs)}
