"""Benchmark harness: every fast path timed against the naive way, in the same run, on the same machine.

``run_benchmark`` measures five sections (data, training, embeddings, ablation, explanations) on a
subsample, prints a table and writes JSON with the machine next to each figure. Each figure carries
its own peak memory: the anonymous resident memory (torch, numpy and Python heaps alike) sampled every
10 ms above its level at the start of the measurement, the file-backed resident memory (pages of the
memory-mapped image cache) likewise, the growth of the process's ``ru_maxrss`` high-water mark, and the
peak of the largest finished child process (the ablation's workers, which the sampler does not see).
"""
from __future__ import annotations

import contextlib
import operator
import os
import platform
import resource
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, fields, replace as dc_replace
from functools import cached_property
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType

import numpy as np
import torch
from PIL import Image
from torch import nn

from .config import ExperimentConfig, load_config, replace
from .data.ham10000 import Ham10000
from .io import read_json, write_json

SAMPLE_SECONDS = 0.01  # interval of the resident-memory sampler
SUBSAMPLE_SEED = 0  # which images / cases the benchmark picks
OPS: Mapping[str, Callable[[float, float], bool]] = MappingProxyType(
    {">=": operator.ge, "<=": operator.le, "<": operator.lt, ">": operator.gt})
MEMORY_METHOD = ("peak_anon_mb: anonymous RSS (torch + numpy + Python heaps) sampled every 10 ms, peak minus "
                 "the level at the start of the measurement (freed-but-kept allocator memory is reused first, "
                 "so this can under-count); peak_file_mb: file-backed RSS (memory-mapped cache pages), same way; "
                 "maxrss_growth_mb: growth of the process's ru_maxrss high-water mark; children_maxrss_mb: "
                 "peak RSS of the largest finished child process so far (ablation workers, loader workers)")


@dataclass(frozen=True)
class BenchSizes:
    """How much of each measurement to run: a subsample, so the default run fits a 2-core machine."""

    data_images: int = 512  # images read per epoch in the data section
    data_epochs: int = 2  # epochs per loader (the best is reported: the first warms the page cache)
    train_batch: int = 64  # images per end-to-end training step
    train_steps: int = 20  # timed end-to-end steps with the cached loader (after one warm-up step)
    naive_train_steps: int = 5  # timed end-to-end steps with the JPEG-decoding loader
    embed_images: int = 256  # images in the timed embedding passes
    ablation_folds: int = 1  # folds timed per model (extrapolated to the configured folds)
    ablation_seeds: int = 1  # seeds timed per model and fold (extrapolated to the configured seeds)
    explain_cases: int = 10  # cases timed for Grad-CAM, grouped SHAP and modality attribution
    kernel_cases: int = 3  # cases explained by KernelExplainer on the two-input model (slow: the naive way)
    report_cases: tuple[int, int] = (2, 10)  # two report sizes: their difference gives the cost per case
    report_epochs: int = 3  # epochs of the frozen head trained for the report run (values do not matter)
    report_target_cases: int = 100  # the report size the target speaks of


def parse_sizes(pairs: Sequence[str], base: BenchSizes | None = None) -> BenchSizes:
    """``["train_steps=5", "report_cases=2,6"]`` applied to ``base`` (the defaults); bad keys -> ConfigError."""
    from .errors import ConfigError

    base = base or BenchSizes()
    known = {f.name for f in fields(BenchSizes)}
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        if key not in known or not text:
            raise ConfigError(f"bench size '{pair}': expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            raise ConfigError(f"bench size '{pair}': not an integer (or integers separated by commas)") from None
        default = getattr(base, key)
        if len(values) != (len(default) if isinstance(default, tuple) else 1):
            raise ConfigError(f"bench size '{pair}': expected a value shaped like {default!r}")
        changes[key] = values if isinstance(default, tuple) else values[0]
    return dc_replace(base, **changes)


TINY_SIZES = BenchSizes(data_images=16, data_epochs=1, train_batch=4, train_steps=2, naive_train_steps=1,
                        embed_images=8, explain_cases=2, kernel_cases=1, report_cases=(1, 2), report_epochs=1)
TINY_OVERRIDES = ("data.synthetic_n=60", "data.image_size=[32, 32]", 'model.weights="none"', "train.epochs=2",
                  "train.batch_size=16", "ablation.folds=3", "ablation.seeds=[0]", "ablation.bootstrap=20",
                  "explain.background_size=8")


# --- measuring -------------------------------------------------------------------------------------

def _rss_bytes() -> tuple[int, int] | None:
    """(anonymous, file-backed) resident bytes of this process from /proc; None where there is no /proc."""
    try:
        with open("/proc/self/statm") as fh:
            resident, shared = (int(v) for v in fh.read().split()[1:3])
    except (OSError, ValueError):
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    return (resident - shared) * page, shared * page


def _maxrss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Resident high-water mark in MB of this process (or of its largest finished child process)."""
    scale = 1 / 1024 if platform.system() != "Darwin" else 1 / 2**20  # Linux reports kB, macOS bytes
    return resource.getrusage(who).ru_maxrss * scale


class _RssSampler(threading.Thread):
    """Samples the resident memory in the background and keeps the peaks."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop_event = threading.Event()
        self.start_rss = _rss_bytes()
        self.peak = self.start_rss

    def run(self) -> None:
        while not self.stop_event.wait(SAMPLE_SECONDS):
            self._sample()

    def _sample(self) -> None:
        now = _rss_bytes()
        if now is not None and self.peak is not None:
            self.peak = (max(self.peak[0], now[0]), max(self.peak[1], now[1]))

    def finish(self) -> dict[str, float | None]:
        self.stop_event.set()
        self.join()
        self._sample()
        if self.start_rss is None or self.peak is None:
            return {"peak_anon_mb": None, "peak_file_mb": None}
        mb = [(p - s) / 2**20 for p, s in zip(self.peak, self.start_rss)]
        return {"peak_anon_mb": round(mb[0], 1), "peak_file_mb": round(mb[1], 1)}


@contextlib.contextmanager
def measured() -> Iterator[dict[str, Any]]:
    """Time the block and record its peak memory into the yielded dict (``seconds``, ``memory``)."""
    record: dict[str, Any] = {}
    sampler, maxrss = _RssSampler(), _maxrss_mb()
    sampler.start()
    t0 = time.perf_counter()
    try:
        yield record
    finally:
        record["seconds"] = time.perf_counter() - t0
        record["memory"] = {**sampler.finish(), "maxrss_growth_mb": round(_maxrss_mb() - maxrss, 1),
                            "children_maxrss_mb": round(_maxrss_mb(resource.RUSAGE_CHILDREN), 1)}


def machine(device: torch.device) -> dict[str, Any]:
    """The machine a figure was measured on, with the load at that moment."""
    import timm

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "load_average_1m": round(load[0], 2)}


def figure(name: str, value: float, unit: str, record: Mapping[str, Any] | None = None, *,
           naive: float | None = None, target: tuple[str, str, float] | None = None, note: str = "") -> dict:
    """One reported figure; ``target`` = (``value``|``ratio``, operator, limit) is checked here.

    ``ratio`` is the speed-up over ``naive``: value / naive for rates, naive / value for seconds.
    """
    fig: dict[str, Any] = {"name": name, "value": float(value), "unit": unit, "note": note}
    if naive is not None:
        fast, slow = (float(naive), float(value)) if unit == "s" else (float(value), float(naive))
        fig.update(naive=float(naive), ratio=fast / max(slow, 1e-12))
    if target is not None:
        on, op, limit = target
        fig["target"] = {"on": on, "op": op, "limit": limit, "met": bool(OPS[op](fig[on], limit))}
    if record is not None:
        fig.update(seconds=round(record["seconds"], 4), memory=record["memory"])
    return fig


class TimedIterator:
    """Wraps an iterable and adds up the seconds spent fetching its items (the data-loading time)."""

    def __init__(self, iterable: Iterable) -> None:
        self.iterator, self.seconds = iter(iterable), 0.0

    def __iter__(self) -> "TimedIterator":
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            return next(self.iterator)
        finally:
            self.seconds += time.perf_counter() - t0


class StepTimer:
    """Hooks that time a model's forward and backward passes inside an unchanged training loop.

    Forward: from the model's forward pre-hook to its forward hook. Backward: from the gradient
    reaching the logits to the last parameter gradient accumulated (``post_accumulate_grad`` hooks),
    so the loss, the optimizer step and ``to_device`` stay outside.
    """

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self.forward_seconds, self.spans, self._t0 = 0.0, [], 0.0
        self._handles: list[Any] = []

    @property
    def backward_seconds(self) -> float:
        return sum(end - start for start, end in self.spans)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, module: nn.Module, args: Any) -> None:
        self._t0 = self._now()

    def _post(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        self.forward_seconds += self._now() - self._t0
        if out.requires_grad:
            out.register_hook(self._backward_starts)

    def _backward_starts(self, grad: torch.Tensor) -> None:
        now = self._now()
        self.spans.append([now, now])

    def _grad_done(self, param: torch.Tensor) -> None:
        if self.spans:  # a backward that did not start at this model's output is not ours to time
            self.spans[-1][1] = self._now()

    def __enter__(self) -> "StepTimer":
        self._handles = [self.model.register_forward_pre_hook(self._pre), self.model.register_forward_hook(self._post)]
        self._handles += [p.register_post_accumulate_grad_hook(self._grad_done)
                          for p in self.model.parameters() if p.requires_grad]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# --- the context shared by the sections ------------------------------------------------------------

@dataclass
class BenchContext:
    """Configuration, data and the objects that several sections share (built on first use)."""

    cfg: ExperimentConfig
    ham: Ham10000
    sizes: BenchSizes
    work: Path
    show: bool

    @cached_property
    def device(self) -> torch.device:
        from .training.engine import resolve_device

        return resolve_device(self.cfg.train.device)

    @cached_property
    def end2end(self) -> Any:
        """A prepared end-to-end model (its backbone trains) at the training section's batch size."""
        from .training.runner import make_splits, prepare

        cfg = replace(self.cfg, train={"mode": "end2end", "batch_size": self.sizes.train_batch})
        return prepare(cfg, self.ham, make_splits(cfg, self.ham))

    @cached_property
    def frozen_cfg(self) -> ExperimentConfig:
        return replace(self.cfg, train={"mode": "frozen"})

    def log(self, message: str) -> None:
        if self.show:
            print(f"[bench] {message}", flush=True)

    def subsample(self, rows: Sequence[int] | int, n: int) -> np.ndarray:
        """``n`` rows drawn without replacement (all of them when there are fewer), seeded."""
        rows = np.arange(rows) if isinstance(rows, int) else np.asarray(rows)
        rng = np.random.default_rng(SUBSAMPLE_SEED)
        return np.sort(rng.choice(rows, size=min(n, len(rows)), replace=False))


class JpegImages:
    """The naive image source: every access opens, decodes and resizes the JPEG with PIL (no cache)."""

    def __init__(self, paths: Sequence[str], size: tuple[int, int]) -> None:
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        with Image.open(self.paths[i]) as img:
            return np.array(img.convert("RGB").resize((self.size[1], self.size[0]), Image.BILINEAR))


def _loader(ctx: BenchContext, images: Any, rows: np.ndarray) -> torch.utils.data.DataLoader:
    """A training-style DataLoader (LesionDataset, augmentation, shuffled epoch sampler) over any image source."""
    from .data.datasets import LesionDataset, NormalizingCollate, build_augmentation
    from .data.sampling import EpochSampler

    prep, cfg = ctx.end2end, ctx.cfg
    dataset = LesionDataset(images, prep.meta, prep.targets, prep.image_ids, rows, build_augmentation(cfg.train.augment))
    sampler = EpochSampler(len(rows), shuffle=True, seed=cfg.train.seed)
    return torch.utils.data.DataLoader(dataset, batch_size=ctx.sizes.train_batch, sampler=sampler,
                                       num_workers=cfg.data.num_workers, collate_fn=NormalizingCollate(prep.normalize))


def _naive_images(ctx: BenchContext) -> JpegImages:
    return JpegImages(ctx.ham.metadata["path"].tolist(), ctx.cfg.data.image_size)


# --- 1. data ----------------------------------------------------------------------------------------

def _loader_rate(loader: torch.utils.data.DataLoader, epochs: int) -> tuple[float, dict, list[float]]:
    """Best images/s over ``epochs`` full passes of ``loader``, with the measurement record."""
    rates = []
    with measured() as record:
        for epoch in range(epochs):
            loader.sampler.set_epoch(epoch)
            t0, n = time.perf_counter(), 0
            for batch in loader:
                n += len(batch["target"])
            rates.append(n / (time.perf_counter() - t0))
    return max(rates), record, rates


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run the block with ``n`` torch intra-op threads (None: unchanged); the count is restored after."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _data_pair(ctx: BenchContext, images: np.ndarray, rows: np.ndarray, threads: int | None) -> tuple[list, dict]:
    """Cached-array and JPEG loaders over the same rows, at one torch thread count."""
    epochs = ctx.sizes.data_epochs
    with torch_threads(threads) as k:
        cached, cached_rec, cached_rates = _loader_rate(_loader(ctx, images, rows), epochs)
        naive, naive_rec, naive_rates = _loader_rate(_loader(ctx, _naive_images(ctx), rows), epochs)
    how = (f"{len(rows)} images {tuple(ctx.cfg.data.image_size)}, batch {ctx.sizes.train_batch}, augment="
           f"{ctx.cfg.train.augment!r}, num_workers={ctx.cfg.data.num_workers}, best of {epochs} epochs")
    return [figure(f"cached array images/s, {k} torch thread(s)", cached, "img/s", cached_rec, naive=naive,
                   target=("ratio", ">=", 5.0), note=how),
            figure(f"JPEG decode+resize images/s, {k} torch thread(s) (naive)", naive, "img/s", naive_rec)], \
        {f"threads_{k}": {"cached_epoch_rates": cached_rates, "naive_epoch_rates": naive_rates}}


def bench_data(ctx: BenchContext) -> dict:
    """Images/s of the cached uint8 array versus decoding + resizing each JPEG every epoch.

    Measured at the default torch thread count (as in-process training loads) and at one thread (as
    DataLoader workers load): per-image tensor ops are tiny, and on a busy CPU two threads can wait on
    each other far longer than the op takes.
    """
    with measured() as cache_record:
        images = ctx.end2end.images()
    rows = ctx.subsample(len(images), ctx.sizes.data_images)
    figures, details = [], {}
    for threads in dict.fromkeys((torch.get_num_threads(), 1)):
        f, d = _data_pair(ctx, images, rows, threads)
        figures, details = figures + f, {**details, **d}
    figures.append(figure("image cache open/build", cache_record["seconds"], "s", cache_record,
                          note="build on first use, else validate + memmap open"))
    return {"figures": figures,
            "details": {**details, "images": len(rows), "image_size": list(ctx.cfg.data.image_size)}}


# --- 2. training ------------------------------------------------------------------------------------

def _train_steps(ctx: BenchContext, batches: Iterable[dict], steps: int) -> dict[str, Any]:
    """Run the engine's ``_train_epoch`` for one warm-up step and then ``steps`` timed steps."""
    from .data.constants import CLASSES
    from .training.engine import _train_epoch, build_loss, build_optimizer, build_scheduler, class_weights

    prep, t = ctx.end2end, ctx.end2end.cfg.train
    weights = class_weights(prep.targets[prep.indices("train")], len(CLASSES)) if t.balance == "weighted_loss" else None
    optimizer = build_optimizer(prep.model, t)
    scheduler = build_scheduler(optimizer, t, steps + 1)
    loss_fn = build_loss(t, weights, prep.device)
    scaler = torch.amp.GradScaler(prep.device.type, enabled=t.amp and prep.device.type == "cuda")
    args = (loss_fn, optimizer, scheduler, scaler, t, prep.device, "bench", False)
    iterator = iter(batches)
    _train_epoch(prep.model, islice(iterator, 1), *args)  # warm-up: lazy initialisation, allocator
    loading = TimedIterator(iterator)
    with StepTimer(prep.model, prep.device) as timer, measured() as record:
        _, seen, compute = _train_epoch(prep.model, islice(loading, steps), *args)
    wall = record["seconds"]
    return {"record": record, "images": seen, "wall_s": wall, "images_per_s": seen / wall,
            "forward_s": timer.forward_seconds, "backward_s": timer.backward_seconds,
            "loading_s": loading.seconds, "engine_compute_s": compute,
            "other_s": wall - timer.forward_seconds - timer.backward_seconds - loading.seconds}


def bench_training(ctx: BenchContext) -> dict:
    """End-to-end training images/s with the real loader and engine; the share outside forward/backward."""
    prep = ctx.end2end
    cached = _train_steps(ctx, prep.batches("train", train=True, show=False), ctx.sizes.train_steps)
    naive = _train_steps(ctx, _loader(ctx, _naive_images(ctx), prep.indices("train")),
                         ctx.sizes.naive_train_steps)
    outside = 100 * (1 - (cached["forward_s"] + cached["backward_s"]) / cached["wall_s"])
    how = (f"{prep.cfg.model.name} on {prep.cfg.model.backbone} {tuple(prep.cfg.data.image_size)}, "
           f"batch {ctx.sizes.train_batch}, {ctx.sizes.train_steps} steps after 1 warm-up")
    return {"figures": [
        figure("end-to-end training images/s", cached["images_per_s"], "img/s", cached["record"],
               naive=naive["images_per_s"], note=how + "; naive = JPEG-decoding loader"),
        figure("wall time outside forward/backward", outside, "%", target=("value", "<", 10.0),
               note="loading {:.1f}%, optimizer+other {:.1f}%".format(
                   100 * cached["loading_s"] / cached["wall_s"], 100 * cached["other_s"] / cached["wall_s"])),
        figure("outside forward/backward, JPEG loader", 100 * (1 - (naive["forward_s"] + naive["backward_s"])
                                                                / naive["wall_s"]), "%", naive["record"]),
    ], "details": {"cached_loader": _drop_record(cached), "jpeg_loader": _drop_record(naive)}}


def _drop_record(result: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items() if k != "record"}


# --- 3. embeddings ----------------------------------------------------------------------------------

def bench_embeddings(ctx: BenchContext) -> dict:
    """Images/s of the frozen-backbone embedding pass, single view and flip-averaged."""
    from .models import ImageBranch
    from .training.embeddings import compute_embeddings

    m = ctx.cfg.model
    branch = ImageBranch(m.backbone, m.weights, m.multiscale)
    images = np.array(ctx.end2end.images()[ctx.subsample(len(ctx.ham.metadata), ctx.sizes.embed_images)])

    def run(x: np.ndarray, flips: bool) -> np.ndarray:
        return compute_embeddings(branch, x, ctx.end2end.normalize, flip_average=flips,
                                  batch_size=ctx.cfg.train.batch_size, device=ctx.device, show=False)

    run(images[:4], False)  # warm-up
    rates, figures = {}, []
    for flips in (False, True):
        with measured() as record:
            run(images, flips)
        rates[flips] = len(images) / record["seconds"]
        figures.append(figure(f"embedding pass images/s ({'4-flip average' if flips else 'single view'})",
                              rates[flips], "img/s", record, note=f"{len(images)} images, batch "
                              f"{ctx.cfg.train.batch_size}, {m.backbone} multiscale={m.multiscale}"))
    full = len(ctx.ham.metadata) / rates[ctx.cfg.train.flip_average]
    figures.append(figure("full embedding pass (extrapolated)", full, "s",
                          note=f"{len(ctx.ham.metadata)} images, flip_average={ctx.cfg.train.flip_average}"))
    return {"figures": figures, "details": {"images": len(images), "flip_cost": rates[False] / rates[True]}}


# --- 4. ablation ------------------------------------------------------------------------------------

def _embedding_files(ctx: BenchContext) -> set[tuple[str, float]]:
    from .data.cache import default_cache_dir

    folder = default_cache_dir(ctx.ham, ctx.cfg.data.cache_dir or None)
    return {(p.name, p.stat().st_mtime) for p in folder.glob("embeddings-*.npy")} if folder.is_dir() else set()


def bench_ablation(ctx: BenchContext) -> dict:
    """Seconds per (model, fold, seed) cell on cached embeddings, run as the ablation runs them (its
    worker processes), and the wall time of the sampled cells extrapolated to the configured grid."""
    from .ablation.run import GBM, Cell, _CellContext, _run_cells, _shared_backbone
    from .data.splits import fold_assignment

    cfg, a, sizes = ctx.frozen_cfg, ctx.frozen_cfg.ablation, ctx.sizes
    folds = fold_assignment(ctx.ham.metadata, a.folds, cfg.data.split_seed)
    before = _embedding_files(ctx)
    with measured() as embed_record:
        shared = _shared_backbone(cfg, ctx.ham, folds, ctx.show)
    computed = _embedding_files(ctx) != before
    names = list(a.models) + ([GBM] if a.gbm else [])
    cells = [Cell(m, k, s) for k in range(min(sizes.ablation_folds, a.folds))
             for s in a.seeds[:sizes.ablation_seeds] for m in names]
    out = ctx.work / "ablation"
    ctx.log(f"{len(cells)} ablation cells, {a.workers} worker process(es)")
    with measured() as grid_record:
        _run_cells(cells, _CellContext(cfg, ctx.ham, folds, shared, out), a.workers, ctx.show)
    records = [read_json(out / "cells" / f"{c.name}.json") for c in cells]
    figures = [figure(f"ablation cell {r['model']}", r["seconds"], "s", note=f"fold {r['fold']} seed {r['seed']}, "
                      f"test BA {r['metrics']['balanced_accuracy']:.3f}") for r in records]
    scale = a.folds * len(a.seeds) / (len(cells) / len(names))
    figures.append(figure(f"full ablation ({len(names)} models x {a.folds} folds x {len(a.seeds)} seeds, extrapolated)",
                          grid_record["seconds"] * scale, "s", grid_record, target=("value", "<=", 600.0),
                          note=f"wall of {len(cells)} cells on {a.workers} worker(s) x {scale:g}; "
                               "embedding pass excluded"))
    figures.append(figure("embedding pass for the ablation (this run)", embed_record["seconds"], "s", embed_record,
                          note="computed now" if computed else "cache hit (computed earlier)"))
    return {"figures": figures, "details": {
        "cell_seconds": {r["model"]: r["seconds"] for r in records}, "sampled_cells_wall_s": grid_record["seconds"],
        "embedding_computed": computed, "workers": a.workers, "batch_size": cfg.train.batch_size,
        "epochs": cfg.train.epochs, "patience": cfg.train.patience}}


# --- 5. explanations --------------------------------------------------------------------------------

@dataclass
class ExplainInputs:
    """The cases and background that every explanation timing uses."""

    model: nn.Module
    images: torch.Tensor  # (n, 3, H, W) normalised
    meta: torch.Tensor  # (n, D)
    embeddings: torch.Tensor  # (n, F), single view: what the live model computes from the image
    targets: list[int]
    background_meta: np.ndarray
    background_embeddings: np.ndarray
    groups: dict[str, list[int]]


@torch.no_grad()
def _explain_inputs(ctx: BenchContext, run: Any) -> ExplainInputs:
    """Test cases of a trained run, their predicted classes and a training-split background."""
    from .training.embeddings import embed_images

    prep = run.prep
    cases = prep.indices("test")[:ctx.sizes.explain_cases]
    background = ctx.subsample(prep.indices("train"), prep.cfg.explain.background_size)
    images = prep.normalize(torch.from_numpy(np.array(prep.images()[cases])).permute(0, 3, 1, 2)).to(prep.device)
    meta = torch.from_numpy(prep.meta[cases]).to(prep.device)
    emb = embed_images(prep.model.image_branch, images, flip_average=False)
    targets = prep.model.forward_head(emb, meta).argmax(1).tolist()
    return ExplainInputs(prep.model, images, meta, emb, targets, prep.meta[background],
                         prep.embeddings(show=False)[background], dict(prep.encoder.feature_groups_))


def _per_case(n: int, explain_one: Callable[[int], Any], warm_up: bool = True) -> tuple[list[Any], dict]:
    """Run ``explain_one`` for cases 0..n-1 (after one untimed warm-up call); the record's seconds are per case."""
    if warm_up and n:
        explain_one(0)
    with measured() as record:
        out = [explain_one(i) for i in range(n)]
    record["seconds"] /= max(n, 1)
    return out, record


class LiveModelOutput:
    """The two-input model as a function of metadata rows for one fixed image: KernelExplainer's model.

    Every call re-runs the whole model (backbone included) on the image, once per row: the naive way.
    """

    def __init__(self, model: nn.Module, image: torch.Tensor, target: int, batch_size: int) -> None:
        self.model, self.image, self.target, self.batch_size = model, image, target, batch_size

    @torch.no_grad()
    def __call__(self, meta_rows: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(meta_rows), self.batch_size):
            meta = torch.as_tensor(np.asarray(meta_rows[start:start + self.batch_size], np.float32),
                                   device=self.image.device)
            logits = self.model({"image": self.image.expand(len(meta), -1, -1, -1), "meta": meta})
            out.append(torch.softmax(logits.float(), 1)[:, self.target])
        return torch.cat(out).double().cpu().numpy()


def _kernel_shap(inputs: ExplainInputs, i: int, batch_size: int) -> np.ndarray:
    """Exact KernelExplainer values over the patient groups (3 groups: all 6 coalitions enumerated)."""
    import shap
    from shap.utils._legacy import DenseData

    names = list(inputs.groups)
    data = DenseData(inputs.background_meta.astype(np.float64), names, [np.array(inputs.groups[g]) for g in names])
    f = LiveModelOutput(inputs.model, inputs.images[i:i + 1], inputs.targets[i], batch_size)
    explainer = shap.KernelExplainer(f, data, link="identity")
    return np.asarray(explainer.shap_values(inputs.meta[i:i + 1].cpu().numpy().astype(np.float64), silent=True)
                      ).reshape(-1)


def _time_explainers(ctx: BenchContext, inputs: ExplainInputs) -> tuple[list[dict], dict]:
    """Grad-CAM, grouped exact SHAP, KernelExplainer and modality attribution, seconds per case."""
    from .explain.gradcam import GradCamExplainer
    from .explain.modality import modality_shapley
    from .explain.shap_groups import GroupShapExplainer

    n, x, m, e, t = len(inputs.targets), inputs.images, inputs.meta, inputs.embeddings, inputs.targets
    with GradCamExplainer(inputs.model, ctx.cfg.explain.method) as cam:
        _, cam_rec = _per_case(n, lambda i: cam.explain(x[i:i + 1], m[i:i + 1], [t[i]]))
    shap_explainer = GroupShapExplainer(inputs.model, inputs.background_meta, inputs.groups)
    grouped, shap_rec = _per_case(n, lambda i: np.asarray(shap_explainer.explain(
        e[i:i + 1].cpu().numpy(), m[i:i + 1].cpu().numpy(), [t[i]]).values).reshape(-1))
    k = min(ctx.sizes.kernel_cases, n)
    kernel, kernel_rec = _per_case(k, lambda i: _kernel_shap(inputs, i, ctx.cfg.train.batch_size), warm_up=False)
    _, modality_rec = _per_case(n, lambda i: modality_shapley(
        inputs.model, e[i:i + 1].cpu().numpy(), m[i:i + 1].cpu().numpy(), inputs.background_embeddings,
        inputs.background_meta, inputs.groups, [t[i]]))
    diff = float(np.max(np.abs(np.array(grouped[:k]) - np.array(kernel)))) if k else float("nan")
    bg = len(inputs.background_meta)
    return [
        figure(f"Grad-CAM ({ctx.cfg.explain.method}) per case", cam_rec["seconds"], "s", cam_rec),
        figure("grouped exact SHAP on cached embedding per case", shap_rec["seconds"], "s", shap_rec,
               naive=kernel_rec["seconds"], target=("ratio", ">=", 100.0),
               note=f"8 coalitions x {bg} background rows on the head; naive = KernelExplainer"),
        figure("KernelExplainer on two-input model per case (naive)", kernel_rec["seconds"], "s", kernel_rec,
               note=f"{k} cases; the backbone re-runs for every evaluated metadata row"),
        figure("max |grouped SHAP - KernelExplainer|", diff, "", target=("value", "<=", 1e-4),
               note=f"over {k} cases x {len(inputs.groups)} groups"),
        figure("modality attribution (16 coalitions) per case", modality_rec["seconds"], "s", modality_rec),
    ], {"cases": n, "kernel_cases": k, "background": bg, "grouped_values": grouped[:k], "kernel_values": kernel}


@dataclass(frozen=True)
class ReportTiming:
    """One ``explain_run``: cases, wall seconds and the pipeline's own stage timings."""

    cases: int
    seconds: float
    stages: dict[str, float]

    @property
    def untimed(self) -> float:
        """Seconds outside the pipeline's timed stages (loading the run, writing the HTML report...)."""
        return self.seconds - sum(self.stages.values())


def estimate_report_seconds(small: ReportTiming, large: ReportTiming, cases: int, faithfulness_cases: int) -> float:
    """Seconds of a ``cases``-case report from two measured ones.

    The faithfulness stage runs on at most ``faithfulness_cases`` cases, so it scales with
    min(cases, that cap) (an upper bound: its randomisation check is capped lower still); every other
    stage scales with the cases; the untimed rest is a fixed plus a per-case cost fitted on both runs.
    """
    per_case_rest = (large.untimed - small.untimed) / max(large.cases - small.cases, 1)
    fixed = max(small.untimed - small.cases * per_case_rest, 0.0)
    faith = large.stages.get("faithfulness", 0.0)
    linear = (sum(large.stages.values()) - faith) / large.cases
    faith_scaled = faith * min(cases, faithfulness_cases) / max(min(large.cases, faithfulness_cases), 1)
    return fixed + cases * (linear + max(per_case_rest, 0.0)) + faith_scaled


def _time_report(ctx: BenchContext, run_dir: Path) -> list[dict]:
    """The explanation report (``explain_run``) at two sizes, extrapolated to the target size."""
    from .explain.pipeline import explain_run

    timings, figures = [], []
    for n in ctx.sizes.report_cases:
        ctx.log(f"explanation report, {n} cases")
        with measured() as record:
            explain_run(run_dir, ctx.work / f"report-{n}", n=n, show=False)
        stages = read_json(ctx.work / f"report-{n}" / "explanations.json").get("timings_seconds", {})
        timings.append(ReportTiming(n, record["seconds"], stages))
        where = ", ".join(f"{k} {v:.1f} s" for k, v in stages.items())
        figures.append(figure(f"explanation report, {n} cases", record["seconds"], "s", record,
                              note=f"stages: {where}; untimed {timings[-1].untimed:.1f} s"))
    goal, cap = ctx.sizes.report_target_cases, ctx.cfg.explain.faithfulness_cases
    estimate = estimate_report_seconds(timings[0], timings[-1], goal, cap)
    return figures + [figure(f"explanation report, {goal} cases (extrapolated)", estimate, "s",
                             target=("value", "<=", 180.0),
                             note=f"faithfulness curves on the first {cap} cases only (explain.faithfulness_cases)")]


def bench_explanations(ctx: BenchContext) -> dict:
    """Seconds per case of each explainer on a trained frozen run, and of the whole report."""
    from .training.runner import load_run, train_run

    cfg = replace(ctx.frozen_cfg, train={"epochs": ctx.sizes.report_epochs})
    run_dir = ctx.work / "run"
    ctx.log(f"training a {cfg.model.name} head for {cfg.train.epochs} epochs for the explanation run")
    train_run(cfg, run_dir, show=False)
    inputs = _explain_inputs(ctx, load_run(run_dir))
    figures, details = _time_explainers(ctx, inputs)
    figures += _time_report(ctx, run_dir)
    return {"figures": figures, "details": {**details, "model": cfg.model.name,
                                            "note": "explained output: softmax probability of the predicted "
                                                    "class; live model without flip averaging"}}


SECTIONS: Mapping[str, Callable[[BenchContext], dict]] = MappingProxyType({
    "data": bench_data, "training": bench_training, "embeddings": bench_embeddings,
    "ablation": bench_ablation, "explanations": bench_explanations})


# --- running and reporting --------------------------------------------------------------------------

def _context(data: str | None, tiny: bool, show: bool, work: Path, config: str | None,
             overrides: Sequence[str], sizes: BenchSizes | None) -> BenchContext:
    """Resolve the config (tiny sizes and overrides applied) and the dataset."""
    from .training.runner import resolve_data

    extra = list(TINY_OVERRIDES if tiny else ()) + list(overrides)
    if data:
        extra.append(f'data.root="{Path(data).resolve()}"')
    cfg = load_config(config, extra)
    ham = resolve_data(cfg, show)
    cfg = replace(cfg, data={"root": str(ham.root)})
    return BenchContext(cfg, ham, sizes or (TINY_SIZES if tiny else BenchSizes()), work, show)


def run_benchmark(data: str | None, json_path: str | None, *, tiny: bool = False, show: bool = True,
                  config: str | None = None, overrides: Sequence[str] = (),
                  sections: Sequence[str] | None = None, sizes: BenchSizes | None = None) -> dict:
    """Run the benchmark sections on ``data`` (None: the synthetic dataset) and return the results.

    ``tiny`` uses a tiny synthetic dataset and tiny sizes (seconds, for tests); ``config`` and
    ``overrides`` are an experiment file and ``section.key=value`` overrides (e.g. the ablation's batch
    size); ``sections`` picks a subset of :data:`SECTIONS`; ``sizes`` replaces the subsample sizes
    (:func:`parse_sizes` builds them from ``KEY=VALUE`` strings). Writes ``json_path`` when given.
    """
    from .config import to_dict
    from .errors import ConfigError

    unknown = [name for name in sections or () if name not in SECTIONS]
    if unknown:
        raise ConfigError(f"bench: unknown section(s) {', '.join(unknown)} (valid: {', '.join(SECTIONS)})")
    with tempfile.TemporaryDirectory(prefix="mmlesion-bench-") as tmp:
        ctx = _context(data, tiny, show, Path(tmp), config, overrides, sizes)
        results: dict[str, Any] = {"machine": machine(ctx.device), "tiny": tiny, "data_root": str(ctx.ham.root),
                                   "images_total": len(ctx.ham.metadata), "sizes": asdict(ctx.sizes),
                                   "config_file": config, "overrides": list(overrides), "config": to_dict(ctx.cfg),
                                   "memory_method": MEMORY_METHOD, "sections": {}}
        for name in sections or SECTIONS:
            ctx.log(f"section {name}")
            with measured() as record:
                section = SECTIONS[name](ctx)
            results["sections"][name] = {**section, "machine": machine(ctx.device),
                                         "seconds": round(record["seconds"], 2), "memory": record["memory"]}
    results["targets"] = [{"section": s, **f} for s, sec in results["sections"].items()
                          for f in sec["figures"] if "target" in f]
    if json_path:
        write_json(json_path, results)
    if show:
        print(format_table(results))
    return results


def _fmt(value: float | None) -> str:
    if value is None or not np.isfinite(value):
        return "-"
    magnitude = abs(value)
    return f"{value:.2e}" if 0 < magnitude < 0.01 else f"{value:,.3f}" if magnitude < 10 else f"{value:,.1f}"


def _row(section: str, fig: Mapping[str, Any], load: float) -> list[str]:
    target = fig.get("target")
    met = "-" if target is None else ("yes" if target["met"] else "MISSED")
    goal = "-" if target is None else f"{target['on']} {target['op']} {target['limit']:g}"
    ratio = f"{fig['ratio']:.1f}x" if "ratio" in fig else "-"
    peak = fig.get("memory", {}).get("peak_anon_mb")
    return [section, fig["name"], f"{_fmt(fig['value'])} {fig['unit']}".strip(), _fmt(fig.get("naive")), ratio,
            goal, met, _fmt(peak), f"{load:.1f}"]


def format_table(results: Mapping[str, Any]) -> str:
    """The results as a fixed-width text table, the machine and the subsample sizes above it.

    ``ratio`` is the speed-up over the naive way; ``load`` the 1-minute load average after the section.
    """
    header = ["section", "figure", "value", "naive", "ratio", "target", "met", "peak anon MB", "load"]
    rows = [header] + [_row(s, f, sec["machine"]["load_average_1m"]) for s, sec in results["sections"].items()
                       for f in sec["figures"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    m = results["machine"]
    top = (f"machine: {m['cores']} cores, {m['torch_threads']} torch threads, {m['device']}, torch {m['torch']}, "
           f"timm {m['timm']}, load average {m['load_average_1m']} at start\n"
           f"data: {results['data_root']} ({results['images_total']} images); subsample: "
           + ", ".join(f"{k}={v}" for k, v in results["sizes"].items()) + ("  [tiny]" if results["tiny"] else ""))
    notes = [f"{s}/{f['name']}: {f['note']}" for s, sec in results["sections"].items() for f in sec["figures"]
             if f.get("note")]
    return "\n".join([top, lines[0], "-" * len(lines[0]), *lines[1:], "notes:", *("  " + n for n in notes)])


__all__ = ["run_benchmark", "format_table", "parse_sizes", "estimate_report_seconds", "BenchSizes", "TINY_SIZES",
           "SECTIONS", "measured", "torch_threads", "StepTimer", "JpegImages", "LiveModelOutput"]
