"""Assembling the inputs of a run from a config: data, splits, encoder, model, device, cached arrays.

:class:`RunInputs` is what training, evaluation, explanation, ablation and the benchmark share: the
encoded metadata and targets of every image, the model on its device, the cached uint8 images and
frozen-backbone embeddings (built on first use), and dict batches of any split.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ..config import ExperimentConfig, replace
from ..data.cache import cache_home, default_cache_dir, image_array
from ..data.color import ColorConstancy, color_constancy_of
from ..data.constants import CLASSES
from ..data.dataset import LesionDataset
from ..data.datasets import BATCH_AUGMENTATIONS, LesionTorchDataset, Normalize, NormalizingCollate, build_augmentation
from ..data.encoder import MetadataEncoder
from ..data.reader import read_dataset
from ..data.sampling import EpochSampler, ImageBatches, MapBatches, MetaDropout, TensorBatches
from ..data.schema import DatasetSchema, preset
from ..data.schema_file import resolve_schema
from ..data.splits import split_lesions, split_rule
from ..data.synthetic import make_synthetic
from ..data.user_splits import check_given_split, duplicate_pairs, given_split, split_frame, split_leaks
from ..errors import ConfigError, Note, note
from ..models import FLIPS, LesionModel, MetaLayout, check_model_mode, create_model, embed_images
from ..models.inference import resolve_backend
from .embeddings import cached_embeddings, embedding_identity
from .feature_maps import AugmentedViews, cached_feature_maps


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` where torch finds no GPU is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError('train.device: \'cuda\' but torch finds no CUDA GPU on this machine; use "auto" or "cpu"')
    return torch.device(name)


def with_concrete_backend(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with ``train.embed_backend = "auto"`` replaced by the backend it picks on this machine.

    Resolved once, where a run or an ablation starts, so its ``config.toml``, the caches' descriptions,
    ``--resume`` and the explanations all see the backend that ran
    (:func:`~multimodal_lesion.models.inference.resolve_backend`).
    """
    t = cfg.train
    if t.embed_backend != "auto":
        return cfg
    backend = resolve_backend(t.embed_backend, t.embed_precision, resolve_device(t.device))
    return replace(cfg, train={"embed_backend": backend})


def seed_everything(seed: int) -> None:
    """Seed torch and numpy's legacy global generator (the loaders use their own epoch-seeded ones)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def synthetic_root(cfg: ExperimentConfig) -> Path:
    """Where the embedded synthetic dataset lives (generated on first use)."""
    return cache_home() / f"synthetic-n{cfg.data.synthetic_n}-seed{cfg.data.synthetic_seed}"


def resolve_schema_of(cfg: ExperimentConfig) -> DatasetSchema:
    """The dataset schema ``cfg`` names (``data.schema``, with ``data.duplicates`` when given)."""
    return resolve_schema(cfg.data.schema, duplicates=cfg.data.duplicates)


def resolve_data(cfg: ExperimentConfig, show: bool = True, schema: DatasetSchema | None = None) -> LesionDataset:
    """Read the configured data root with its schema, or generate / reuse the synthetic default.

    ``schema`` (a run's stored one) replaces the one ``cfg`` names.
    """
    schema = schema if schema is not None else resolve_schema_of(cfg)
    root = Path(cfg.data.root) if cfg.data.root else synthetic_root(cfg)
    if not cfg.data.root:  # returns at once when the dataset there is current
        if schema.name != "ham10000":
            raise ConfigError(f"data.schema: {schema.name!r} needs data.root (the synthetic dataset is HAM10000)")
        if show and not (root / "HAM10000_metadata.csv").is_file():
            print(f"generating the synthetic dataset in {root}")
        make_synthetic(root, n=cfg.data.synthetic_n, seed=cfg.data.synthetic_seed)
    return read_dataset(root, schema, images=cfg.data.images, drop_missing=cfg.data.drop_missing)


def make_splits(cfg: ExperimentConfig, dataset: LesionDataset) -> pd.DataFrame:
    """Lesion-grouped, stratified split of ``dataset``; with folds, ``data.fold`` is the validation fold.

    A split the user gives (``data.splits`` or the schema's ``split_column``) is used instead, once
    checked for leaks (:mod:`~multimodal_lesion.data.user_splits`).
    """
    d = cfg.data
    given = given_split(dataset, d.splits)
    if given is not None:
        splits = split_frame(dataset, given, d.fold)
        check_given_split(split_leaks(dataset, splits, duplicate_pairs(dataset)), given.source, d.allow_leaks)
        return splits
    splits = split_lesions(
        dataset.metadata,
        test_size=d.test_size,
        val_size=d.val_size,
        folds=d.folds,
        seed=d.split_seed,
        group_label=split_rule(dataset.schema),
    )
    if d.folds:  # data.fold < data.folds: checked when the config was loaded
        splits["split"] = np.where(splits["fold"] < 0, "test", np.where(splits["fold"] == d.fold, "val", "train"))
    return splits


def meta_layout(encoder: MetadataEncoder) -> MetaLayout:
    """The encoder's columns per patient feature and its "missing" encoding (for models that read them one by one)."""
    groups = tuple(tuple(int(c) for c in cols) for cols in encoder.feature_groups_.values())
    return MetaLayout(groups, tuple(float(v) for v in encoder.missing_row()))


def class_targets(metadata: pd.DataFrame, classes: Sequence[str] = CLASSES) -> np.ndarray:
    """Class indices (int64) of the ``dx`` column, in the order of ``classes`` (the schema's)."""
    return metadata["dx"].map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)


@dataclass
class RunInputs:
    """Everything built from a config and a dataset that training, evaluation and explanation share."""

    cfg: ExperimentConfig
    dataset: LesionDataset
    splits: pd.DataFrame
    encoder: MetadataEncoder
    meta: np.ndarray
    targets: np.ndarray
    model: LesionModel
    device: torch.device
    notes: list[str] = field(default_factory=list)  # e.g. categories unseen in training, encoded as unknown
    cached_images: np.ndarray | None = field(default=None, repr=False)  # as the model sees them (colour constancy)
    cached_embeddings: np.ndarray | None = field(default=None, repr=False)
    cached_maps: np.ndarray | None = field(default=None, repr=False)  # partial mode: (N, 4, C, h, w) float16
    schema: DatasetSchema = field(default_factory=lambda: preset("ham10000"))  # classes, features, key class

    def indices(self, split: str) -> np.ndarray:
        """Row numbers of one split (``train``, ``val`` or ``test``)."""
        idx = np.flatnonzero(self.splits["split"].to_numpy() == split)
        if len(idx) == 0:
            raise ConfigError(f"split '{split}' has no images")
        return idx

    @property
    def image_ids(self) -> list[str]:
        return self.dataset.metadata["image_id"].tolist()

    @property
    def normalize(self) -> Normalize:
        if self.model.image_branch is None:
            raise ConfigError(f"model '{self.cfg.model.name}' has no image branch")
        dc = self.model.image_branch.data_config
        return Normalize(dc["mean"], dc["std"])

    def n_lesions(self, split: str) -> int:
        return int(self.dataset.metadata["lesion_id"].iloc[self.indices(split)].nunique())

    def images(self) -> np.ndarray:
        """The cached uint8 image array (N, H, W, 3), built on first use.

        A dataset without images (``data.images = 'none'``) reads as blank pixels that take no memory;
        no model sees them (:func:`prepare_inputs` refuses a model with an image branch there).
        """
        if self.cached_images is None and not self.dataset.has_images:
            blank = np.zeros((1, *self.cfg.data.image_size, 3), np.uint8)
            self.cached_images = np.broadcast_to(blank, (len(self.dataset.metadata), *blank.shape[1:]))
        if self.cached_images is None:
            self.cached_images = image_array(
                self.dataset, self.cfg.data.image_size, self.cfg.data.cache_dir or None, color=self.color
            )
        return self.cached_images

    @property
    def color(self) -> ColorConstancy:
        """The colour constancy every image of the run goes through (``data.color_constancy``)."""
        return color_constancy_of(self.cfg.data)

    def original_images(self) -> np.ndarray:
        """The cached images as they were, before colour constancy (:meth:`images` when there is none)."""
        if not self.color.active or not self.dataset.has_images:
            return self.images()
        return image_array(self.dataset, self.cfg.data.image_size, self.cfg.data.cache_dir or None)

    def normalized_images(self, rows: np.ndarray) -> torch.Tensor:
        """The model's input (B, 3, H, W) for ``rows``: cached pixels, normalised, on the device."""
        pixels = torch.from_numpy(np.array(self.images()[rows])).permute(0, 3, 1, 2)
        return self.normalize(pixels).to(self.device)

    def embeddings(self, show: bool = True) -> np.ndarray:
        """Frozen-backbone embeddings of every image, cached on disk."""
        branch = self.model.image_branch
        if self.cached_embeddings is None and branch is not None:
            m, t = self.cfg.model, self.cfg.train
            size = self.cfg.data.image_size
            identity = embedding_identity(
                m.backbone, m.weights, m.multiscale, size, t.embed_precision, self.color.key()
            )
            self.cached_embeddings = cached_embeddings(
                branch,
                self.images,
                len(self.dataset.metadata),
                self.normalize,
                folder=default_cache_dir(self.dataset, self.cfg.data.cache_dir or None),
                fingerprint=self.dataset.fingerprint,
                identity=identity,
                flip_average=t.flip_average,
                batch_size=t.embed_batch,
                device=self.device,
                show=show,
                backend=t.embed_backend,
                precision=t.embed_precision,
            )
        if self.cached_embeddings is None:
            raise ConfigError(f"model '{self.cfg.model.name}' has no image branch")
        return self.cached_embeddings

    def feature_maps(self, show: bool = True) -> np.ndarray:
        """Partial mode: the frozen stem's stride-16 maps of every image and its flips, cached on disk."""
        branch = self.model.image_branch
        if branch is None:
            raise ConfigError(f"model '{self.cfg.model.name}' has no image branch")
        if self.cached_maps is None:
            m, t = self.cfg.model, self.cfg.train
            self.cached_maps = cached_feature_maps(
                branch,
                self.images,
                self.cfg.data.image_size,
                len(self.dataset.metadata),
                self.normalize,
                folder=default_cache_dir(self.dataset, self.cfg.data.cache_dir or None),
                fingerprint=self.dataset.fingerprint,
                identity=embedding_identity(
                    m.backbone, m.weights, False, self.cfg.data.image_size, "float32", self.color.key()
                ),
                batch_size=t.embed_batch,
                device=self.device,
                backend=t.embed_backend,
                show=show,
                augmented=AugmentedViews(t.map_views, t.augment, t.seed) if t.map_views else None,
            )
        return self.cached_maps

    def embeddings_of(self, rows: np.ndarray) -> torch.Tensor | None:
        """Pooled image embeddings of ``rows`` (late models): cached (frozen) or computed live (partial, end-to-end).

        A map-fusion model has no metadata-free embedding: use :meth:`image_states_of`.
        """
        branch = self.model.image_branch
        if branch is None:
            return None
        if self.cfg.train.mode == "frozen":
            return torch.from_numpy(self.embeddings(show=False)[rows]).to(self.device)
        with torch.no_grad():
            return torch.cat(
                [embed_images(branch, self.normalized_images(rows[i : i + 32]), False) for i in range(0, len(rows), 32)]
            )

    def image_states_of(self, rows: np.ndarray, chunk: int = 256) -> torch.Tensor | None:
        """What ``model.from_image_state`` reads for ``rows`` (None without an image branch), in eval mode.

        Frozen: the cached embeddings. Partial: from the cached unflipped maps (a map-fusion model's
        state itself; a late model's embedding pooled through its trained tail), so nothing runs the
        frozen stem again. End-to-end: ``model.image_state`` of the images, live.
        """
        model, branch = self.model, self.model.image_branch
        if branch is None:
            return None
        if self.cfg.train.mode == "frozen":
            return torch.from_numpy(self.embeddings(show=False)[rows]).to(self.device)
        was_training = model.training
        model.eval()
        parts = []
        with torch.no_grad():
            for i in range(0, len(rows), chunk):
                part = rows[i : i + chunk]
                if self.cfg.train.mode == "partial":
                    maps = torch.from_numpy(np.asarray(self.feature_maps(show=False)[part, 0])).float()
                    maps = maps.to(self.device)
                    parts.append(maps if model.fuses_on_maps else branch.embed_from_maps(maps))
                else:
                    parts.append(model.image_state(self.normalized_images(part)))
        model.train(was_training)
        return torch.cat(parts)

    def batches(
        self, split: str, *, train: bool, show: bool = True, rank: int = 0, world_size: int = 1
    ) -> TensorBatches | MapBatches | ImageBatches | EpochLoader | MetaDropout:
        """Dict batches of one split: cached embeddings (frozen), cached maps (partial) or augmented images (end2end).

        Training batches of a model that reads metadata go through :class:`MetaDropout` when
        ``train.meta_dropout`` or ``train.meta_dropout_all`` is set.
        """
        batches = self._batches(split, train=train, show=show, rank=rank, world_size=world_size)
        t = self.cfg.train
        if not train or not (t.meta_dropout or t.meta_dropout_all) or not self.model.uses_meta:
            return batches
        groups = self.encoder.feature_groups_
        return MetaDropout(batches, self.encoder.missing_row(), groups, t.meta_dropout, t.meta_dropout_all, t.seed)

    def _batches(
        self, split: str, *, train: bool, show: bool = True, rank: int = 0, world_size: int = 1
    ) -> TensorBatches | MapBatches | ImageBatches | EpochLoader:
        """The batches of :meth:`batches` before metadata dropout."""
        t = self.cfg.train
        idx = self.indices(split)
        weights = None
        if train and t.balance == "sampler":
            counts = np.bincount(self.targets[idx], minlength=self.schema.n_classes)
            weights = 1.0 / counts[self.targets[idx]]
        sampler = EpochSampler(len(idx), shuffle=train, seed=t.seed, weights=weights, rank=rank, world_size=world_size)
        if t.mode == "frozen" or self.model.image_branch is None:
            tensors = {"meta": torch.from_numpy(self.meta[idx]), "target": torch.from_numpy(self.targets[idx])}
            if self.model.image_branch is not None:
                tensors["embedding"] = torch.from_numpy(self.embeddings(show)[idx])
            ids = self.image_ids
            return TensorBatches(tensors, [ids[i] for i in idx], t.batch_size, sampler)
        if t.mode == "partial":
            return self._map_batches(idx, sampler, train=train, show=show)
        if t.batch_augment:
            tensors = {"meta": torch.from_numpy(self.meta[idx]), "target": torch.from_numpy(self.targets[idx])}
            augment = BATCH_AUGMENTATIONS[t.augment]() if train else None
            ids = [self.image_ids[i] for i in idx]
            return ImageBatches(
                self.images(), idx, tensors, ids, t.batch_size, sampler, self.normalize, augment, t.seed
            )
        torch_set = LesionTorchDataset(
            self.images(),
            self.meta,
            self.targets,
            self.image_ids,
            idx,
            build_augmentation(t.augment) if train else None,
        )
        return EpochLoader(
            torch.utils.data.DataLoader(
                torch_set,
                batch_size=t.batch_size,
                sampler=sampler,
                collate_fn=NormalizingCollate(self.normalize),
                num_workers=self.cfg.data.num_workers,
                pin_memory=self.device.type == "cuda",
            ),
            sampler,
        )

    def _map_batches(self, idx: np.ndarray, sampler: EpochSampler, *, train: bool, show: bool) -> MapBatches:
        """Partial mode: batches of cached maps (a random flip and crop in training; TTA averages the flips)."""
        t = self.cfg.train
        tensors = {"meta": torch.from_numpy(self.meta[idx]), "target": torch.from_numpy(self.targets[idx])}
        ids = self.image_ids
        return MapBatches(
            self.feature_maps(show),
            idx,
            tensors,
            [ids[i] for i in idx],
            t.batch_size,
            sampler,
            train=train,
            crop=t.map_crop,
            all_views=t.tta and not train,
            eval_views=len(FLIPS),
            seed=t.seed,
        )


class EpochLoader:
    """A DataLoader whose sampler is re-seeded each epoch by the engine."""

    def __init__(self, loader: torch.utils.data.DataLoader, sampler: EpochSampler) -> None:
        self.loader, self.sampler = loader, sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.loader)


def prepare_inputs(
    cfg: ExperimentConfig,
    dataset: LesionDataset,
    splits: pd.DataFrame,
    encoder: MetadataEncoder | None = None,
    *,
    shared: RunInputs | None = None,
) -> RunInputs:
    """Fit the encoder on the training split (unless given), encode everything and build the model.

    ``shared`` lends its frozen backbone and cached embeddings (an ablation trains many heads on one).
    The inputs' config names the concrete ``train.embed_backend`` (:func:`with_concrete_backend`).
    """
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    train_rows = dataset.metadata[splits["split"].to_numpy() == "train"]
    encoder = encoder or MetadataEncoder.for_features(dataset.schema.features).fit(train_rows)
    with warnings.catch_warnings(record=True) as caught:  # categories unseen in training -> unknown
        warnings.simplefilter("always", Note)
        meta = encoder.transform(dataset.metadata).astype(np.float32)
    notes = [str(w.message) for w in caught if issubclass(w.category, Note)]
    for message in notes:  # kept in metrics.json and told to the user
        note(message)
    check_model_mode(cfg.model.name, cfg.train.mode)
    cfg = with_concrete_backend(cfg)
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed)
    branch = shared.model.image_branch if shared is not None and cfg.train.mode == "frozen" else None
    model = create_model(
        cfg.model.name,
        meta_dim=meta.shape[1],
        num_classes=dataset.schema.n_classes,
        cfg=cfg.model,
        image_branch=branch,
        meta_layout=meta_layout(encoder),
    )
    if model.image_branch is not None and not dataset.has_images:
        raise ConfigError(
            f"model.name: '{cfg.model.name}' reads images but the data has none (data.images = 'none'); "
            "use a model without an image branch (metadata_only)"
        )
    if cfg.train.mode in ("frozen", "partial") and model.image_branch is not None:
        model.image_branch.requires_grad_(False)
    if cfg.train.mode == "partial" and model.image_branch is not None:
        model.image_branch.check_partial()
        for module in model.image_branch.trainable_tail():  # the stages after the cached maps are fine-tuned
            module.requires_grad_(True)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    targets = class_targets(dataset.metadata, dataset.schema.classes)
    inputs = RunInputs(cfg, dataset, splits, encoder, meta, targets, model, device, notes, schema=dataset.schema)
    if branch is not None and shared is not None:
        inputs.cached_embeddings = shared.cached_embeddings
    return inputs


def inputs_from_config(cfg: ExperimentConfig, show: bool = True) -> tuple[ExperimentConfig, RunInputs]:
    """Data, split and model of a new run as configured; the returned config names the resolved data root
    and the concrete ``train.embed_backend``."""
    dataset = resolve_data(cfg, show)
    cfg = replace(cfg, data={"root": str(dataset.root)})
    inputs = prepare_inputs(cfg, dataset, make_splits(cfg, dataset))
    return inputs.cfg, inputs
