"""What the sections share: the resolved config and data, the prepared end-to-end run, the loaders."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import cast

import numpy as np
import torch
from PIL import Image

from ..config import ExperimentConfig, load_config, replace
from ..data.dataset import LesionDataset
from ..data.datasets import LesionTorchDataset, NormalizingCollate, build_augmentation
from ..data.sampling import EpochSampler
from ..runs import RunInputs, make_splits, prepare_inputs, resolve_data, resolve_device
from .sizes import TINY_OVERRIDES, TINY_SIZES, BenchSizes

SUBSAMPLE_SEED = 0  # which images / cases the benchmark picks


@dataclass
class BenchContext:
    """Configuration, data and the objects that several sections share (built on first use).

    Attributes:
        cfg: the resolved experiment config (data root filled in).
        dataset: the dataset.
        sizes: the subsample sizes.
        work: a scratch folder for run folders and reports (removed after the run).
        show: print progress lines.
    """

    cfg: ExperimentConfig
    dataset: LesionDataset
    sizes: BenchSizes
    work: Path
    show: bool

    @cached_property
    def device(self) -> torch.device:
        """The configured device (``auto`` resolved)."""
        return resolve_device(self.cfg.train.device)

    @cached_property
    def end2end(self) -> RunInputs:
        """A prepared end-to-end model (its backbone trains) at the training section's batch size."""
        cfg = replace(self.cfg, train={"mode": "end2end", "batch_size": self.sizes.train_batch})
        return prepare_inputs(cfg, self.dataset, make_splits(cfg, self.dataset))

    @cached_property
    def frozen_cfg(self) -> ExperimentConfig:
        """The config on the frozen path (heads on cached embeddings): the ablation's and the explanations'."""
        return replace(self.cfg, train={"mode": "frozen"})

    def log(self, message: str) -> None:
        """Print a progress line when ``show``."""
        if self.show:
            print(f"[bench] {message}", flush=True)

    def subsample(self, rows: np.ndarray | Sequence[int] | int, n: int) -> np.ndarray:
        """``n`` rows drawn without replacement (all of them when there are fewer), seeded, sorted."""
        pool = np.arange(rows) if isinstance(rows, int) else np.asarray(rows)
        rng = np.random.default_rng(SUBSAMPLE_SEED)
        return np.sort(rng.choice(pool, size=min(n, len(pool)), replace=False))


class JpegImages:
    """The naive image source: every access opens, decodes and resizes the JPEG with PIL (no cache)."""

    def __init__(self, paths: Sequence[str], size: tuple[int, int]) -> None:
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        with Image.open(self.paths[i]) as img:
            return np.array(img.convert("RGB").resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR))


def naive_images(ctx: BenchContext) -> JpegImages:
    """Every image of the dataset as the naive source (decoded from its JPEG on each access)."""
    return JpegImages(ctx.dataset.metadata["path"].tolist(), ctx.cfg.data.image_size)


def training_loader(
    ctx: BenchContext, images: np.ndarray | JpegImages, rows: np.ndarray
) -> torch.utils.data.DataLoader:
    """A training-style DataLoader (LesionTorchDataset, augmentation, shuffled epoch sampler) over any image source."""
    inputs, cfg = ctx.end2end, ctx.cfg
    source = cast(np.ndarray, images)  # LesionTorchDataset only indexes its images: any indexable source works
    torch_set = LesionTorchDataset(
        source, inputs.meta, inputs.targets, inputs.image_ids, rows.tolist(), build_augmentation(cfg.train.augment)
    )
    sampler = EpochSampler(len(rows), shuffle=True, seed=cfg.train.seed)
    return torch.utils.data.DataLoader(
        torch_set,
        batch_size=ctx.sizes.train_batch,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=NormalizingCollate(inputs.normalize),
    )


def build_context(
    data: str | None,
    tiny: bool,
    show: bool,
    work: Path,
    config: str | None,
    overrides: Sequence[str],
    sizes: BenchSizes | None,
) -> BenchContext:
    """Resolve the config (tiny sizes and overrides applied) and the dataset into a :class:`BenchContext`."""
    extra = list(TINY_OVERRIDES if tiny else ()) + list(overrides)
    if data:
        extra.append(f'data.root="{Path(data).resolve()}"')
    cfg = load_config(config, extra)
    dataset = resolve_data(cfg, show)
    cfg = replace(cfg, data={"root": str(dataset.root)})
    return BenchContext(cfg, dataset, sizes or (TINY_SIZES if tiny else BenchSizes()), work, show)
