"""Section ``embeddings``: the frozen embedding pass against the CPU's roofline, each speed-up side by side.

The roofline: the backbone's FLOPs per image at the input size (``torch.utils.flop_counter``), split
into depthwise convolutions and the rest (dense), the machine's measured float32 matrix-multiply and
depthwise-convolution throughput in the same run, and so the fastest the pass could go
(dense / matmul rate + depthwise / depthwise rate per image). Then the pass as it was (``no_grad``,
NCHW, the 4 flips one after another, 64 images a call) and each change on top of it, with the
embeddings' distance from the float32 reference: a change is accepted when it is faster and within
:data:`EMBED_TOLERANCE` (bfloat16) or :data:`EXPORT_TOLERANCE` (exported backends, which must also be
:data:`EXPORT_MIN_SPEEDUP` x faster than eager to be worth an extra dependency).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..models import FLIPS, ImageBranch
from ..models.inference import BranchPass, backend_available, compile_pass
from .context import BenchContext
from .measure import figure, measured

EMBED_TOLERANCE = 1e-2  # bfloat16 accepted if every embedding moves by less than this (relative L2)
EXPORT_TOLERANCE = 1e-3  # an exported backend must give the same embeddings to this (max absolute difference)
EXPORT_MIN_SPEEDUP = 1.5  # ... and be this much faster than eager float32 PyTorch
BF16_IMAGES = 8  # bfloat16 without hardware support is slow: timed on fewer images
DEPTHWISE_SHAPE = (32, 144, 60, 80)  # batch, channels, height, width: Lite0's second stage at 240x320


def _best_seconds(fn: Callable[[], object], repeats: int = 3) -> float:
    """The fastest of ``repeats`` timed calls, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_gflops(dtype: torch.dtype, side: int = 2048) -> float:
    """Measured GFLOP/s of a ``side`` x ``side`` matrix multiply in ``dtype``."""
    a, b = (torch.randn(side, side).to(dtype) for _ in range(2))
    return 2 * side**3 / _best_seconds(lambda: a @ b) / 1e9


def depthwise_gflops() -> float:
    """Measured GFLOP/s of a 3x3 depthwise convolution (channels-last, float32) of :data:`DEPTHWISE_SHAPE`."""
    n, c, h, w = DEPTHWISE_SHAPE
    conv = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False).eval().to(memory_format=torch.channels_last)
    x = torch.randn(n, c, h, w).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        seconds = _best_seconds(lambda: conv(x))
    return 2 * 9 * n * c * h * w / seconds / 1e9


def peak_gflops() -> float:
    """The CPU's float32 peak from /proc/cpuinfo: cores x clock x 2 FMA units x lanes (16 AVX-512, 8 AVX2) x 2.

    NaN where /proc/cpuinfo is missing (not Linux).
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return float("nan")
    mhz = [float(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu MHz")]
    lanes = 16 if "avx512f" in text.split() else 8
    cores = min(os.cpu_count() or 1, torch.get_num_threads())
    return cores * (max(mhz) if mhz else float("nan")) / 1e3 * 2 * lanes * 2


def cpu_flags() -> str:
    """The CPU's vector extensions that decide bfloat16 speed (AVX-512 BF16, AMX), from /proc/cpuinfo."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def count_flops(branch: ImageBranch, size: tuple[int, int]) -> tuple[float, float]:
    """(all, depthwise) FLOPs of one image's embedding: torch's flop counter, depthwise by conv hooks."""
    from torch.utils.flop_counter import FlopCounterMode

    depthwise = [0.0]

    def hook(m: nn.Module, _inputs: Any, out: Tensor) -> None:
        conv = m if isinstance(m, nn.Conv2d) else None
        if conv is not None and conv.groups > 1 and conv.groups == conv.in_channels:
            depthwise[0] += 2.0 * out.numel() * conv.kernel_size[0] * conv.kernel_size[1]

    handles = [m.register_forward_hook(hook) for m in branch.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            branch.eval().embed(torch.zeros(1, 3, *size))
    finally:
        for h in handles:
            h.remove()
    return float(counter.get_total_flops()), depthwise[0]


Pass = Callable[[Tensor], Tensor]  # normalised images (N, 3, H, W) -> flip-averaged embeddings (N, F)


def _old_pass(branch: ImageBranch) -> Pass:
    """The pass before this section's changes: no_grad, NCHW, the flips one after another, 64 images a call."""

    def run(x: Tensor) -> Tensor:
        with torch.no_grad():
            chunks = [torch.stack([branch.embed(c.flip(d) if d else c) for d in FLIPS]).mean(0) for c in x.split(64)]
        return torch.cat(chunks)

    return run


def _variant(branch: ImageBranch, example: Tensor, batch: int, backend: str, precision: str, inference: bool) -> Pass:
    """The pass with the changes switched on: compiled by ``backend``, ``batch`` images x 4 flips a call."""
    module = BranchPass(branch, "embed")
    if backend == "torch" and not inference:  # channels-last alone, under no_grad
        module.eval().to(memory_format=torch.channels_last)

        def channels_last(v: Tensor) -> Tensor:
            with torch.no_grad():
                return module(v.contiguous(memory_format=torch.channels_last))

        return lambda x: _flip_batches(channels_last, x, batch)
    compiled = compile_pass(module, example, backend, precision)
    return lambda x: _flip_batches(compiled, x, batch)


def _flip_batches(run: Pass, x: Tensor, batch: int) -> Tensor:
    """``run`` over ``x`` in calls of ``batch`` images with their 4 flips in the same call, flip-averaged."""
    out = []
    for c in x.split(batch):
        views = torch.cat([c.flip(d) if d else c for d in FLIPS])
        out.append(run(views).float().unflatten(0, (len(FLIPS), len(c))).mean(0))
    return torch.cat(out)


def _deviation(y: Tensor, ref: Tensor) -> dict[str, float]:
    """Largest absolute and relative (L2 per embedding) difference from the reference embeddings."""
    rel = ((y - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)).max()
    return {"max_abs": float((y - ref).abs().max()), "max_rel": float(rel)}


def _timed(label: str, run: Pass, x: Tensor, ref: Tensor | None, base: float | None) -> dict[str, Any]:
    """Warm ``run`` up on two images, then time it on ``x``: rate, speed-up over ``base``, deviation from ``ref``."""
    run(x[:2])
    with measured() as record:
        y = run(x)
    rate = len(x) / record["seconds"]
    row: dict[str, Any] = {"label": label, "rate": rate, "record": record, "speedup": rate / base if base else 1.0}
    if ref is not None:
        row.update(_deviation(y, ref[: len(y)]))
    return row | {"out": y}


#: The torch changes, each on top of the previous: (label, images a call, inference_mode).
TORCH_STEPS = (
    ("+ channels-last (no_grad)", 64, False),
    ("+ inference_mode", 64, True),
    ("+ 4 images x 4 flips in one call", 4, True),
    ("+ 8 images x 4 flips in one call", 8, True),
    ("+ 16 images x 4 flips in one call", 16, True),
)


def pass_variants(ctx: BenchContext, branch: ImageBranch, x: Tensor) -> list[dict[str, Any]]:
    """Each change to the embedding pass measured on the same images: rate, speed-up, deviation."""
    old = _timed("before: no_grad, NCHW, 4 flips one by one, 64 images a call", _old_pass(branch), x, None, None)
    ref, base = old.pop("out"), old["rate"]
    rows = [old]
    example = x[:2]
    for label, batch, inference in TORCH_STEPS:  # each variant converts its own copy's memory format
        run = _variant(copy.deepcopy(branch), example, batch, "torch", "float32", inference)
        rows.append(_timed(label, run, x, ref, base))
    bf16 = _variant(copy.deepcopy(branch), example, 8, "torch", "bfloat16", True)
    rows.append(_timed("+ bfloat16 autocast", bf16, x[:BF16_IMAGES], ref, base))
    for backend in ("onnxruntime", "openvino"):
        if not backend_available(backend):
            ctx.log(f"embeddings: {backend} not installed, not measured")
            continue
        run = _variant(copy.deepcopy(branch), example, 8, backend, "float32", True)
        rows.append(_timed(f"{backend} (exported graph), 8 images x 4 flips a call", run, x, ref, base))
    return [{k: v for k, v in r.items() if k != "out"} for r in rows]


def _accepted(row: dict[str, Any], eager: float) -> bool:
    """Whether a measured change is kept: faster, and its embeddings within the tolerance that applies."""
    label = row["label"]
    if "bfloat16" in label:
        return row["speedup"] > 1 and row["max_rel"] < EMBED_TOLERANCE
    if "exported" in label:
        return row["rate"] >= EXPORT_MIN_SPEEDUP * eager and row["max_abs"] <= EXPORT_TOLERANCE
    return row.get("max_abs", 0.0) <= EXPORT_TOLERANCE


def _roofline(ctx: BenchContext, branch: ImageBranch) -> tuple[list[dict], dict[str, float]]:
    """Figures of the FLOP count and the measured throughputs, and the limit they set (images/s)."""
    size = ctx.cfg.data.image_size
    flops, dw = count_flops(branch, size)
    side = ctx.sizes.matmul_side
    rates = {
        "fp32": matmul_gflops(torch.float32, side),
        "bf16": matmul_gflops(torch.bfloat16, side),
        "dw": depthwise_gflops(),
        "peak": peak_gflops(),
    }
    limit = 1e9 / ((flops - dw) / rates["fp32"] + dw / rates["dw"])
    figures = [
        figure(
            "backbone GFLOP per image",
            flops / 1e9,
            "GFLOP",
            note=f"{ctx.cfg.model.backbone} {tuple(size)}, depthwise {dw / 1e9:.3f} GFLOP ({100 * dw / flops:.0f}%)",
        ),
        figure(f"matmul {side}x{side} float32", rates["fp32"], "GFLOP/s"),
        figure(f"matmul {side}x{side} bfloat16", rates["bf16"], "GFLOP/s", note=f"CPU flags: {cpu_flags()}"),
        figure(f"depthwise 3x3 conv {DEPTHWISE_SHAPE} float32", rates["dw"], "GFLOP/s"),
        figure(
            "float32 peak of the cores used",
            rates["peak"],
            "GFLOP/s",
            note="threads x clock x 2 FMA units x vector lanes x 2 (from /proc/cpuinfo)",
        ),
        figure(
            "roofline: images/s the two rates allow",
            limit,
            "img/s",
            note="dense FLOPs at torch's matmul rate + depthwise FLOPs at torch's depthwise rate: torch's own limit",
        ),
    ]
    return figures, {"flops": flops, "depthwise_flops": dw, "limit": limit, **rates}


def bench_embeddings(ctx: BenchContext) -> dict[str, Any]:
    """Roofline of the embedding pass and each speed-up measured side by side; the full pass extrapolated."""
    m = ctx.cfg.model
    branch = ImageBranch(m.backbone, m.weights, m.multiscale).eval()
    images = np.array(ctx.end2end.images()[ctx.subsample(len(ctx.dataset.metadata), ctx.sizes.embed_images)])
    x = ctx.end2end.normalize(torch.from_numpy(images).permute(0, 3, 1, 2))
    figures, roof = _roofline(ctx, branch)
    rows = pass_variants(ctx, branch, x)
    eager = max(r["rate"] for r in rows if "flips in one call" in r["label"])
    for row in rows:
        row["accepted"] = _accepted(row, eager)
        dev = f", max |diff| {row['max_abs']:.1e}, max rel {row['max_rel']:.1e}" if "max_abs" in row else ""
        figures.append(
            figure(
                f"embedding pass images/s (4 flips): {row['label']}",
                row["rate"],
                "img/s",
                row["record"],
                note=f"{row['speedup']:.2f}x the old pass{dev}; {'accepted' if row['accepted'] else 'rejected'}; "
                f"{_share(row['rate'], roof)}",
            )
        )
    best = max((r for r in rows if r["accepted"]), key=lambda r: r["rate"])
    figures.append(_taps_figure(ctx, x))
    full = len(ctx.dataset.metadata) / best["rate"]
    figures.append(
        figure(
            "full embedding pass, 4 flips (extrapolated from the best accepted)",
            full,
            "s",
            naive=len(ctx.dataset.metadata) / rows[0]["rate"],
            target=("value", "<=", 600.0),
            note=f"{len(ctx.dataset.metadata)} images with {best['label']!r}; {_share(best['rate'], roof)}",
        )
    )
    details = {
        "roofline": roof,
        "images": len(images),
        "variants": [{k: v for k, v in r.items() if k != "record"} for r in rows],
    }
    return {"figures": figures, "details": details}


def _share(rate: float, roof: dict[str, float]) -> str:
    """A pass's rate (images/s, 4 views each) as effective GFLOP/s and its share of the limits."""
    gflops = rate * len(FLIPS) * roof["flops"] / 1e9
    return (
        f"{gflops:.1f} GFLOP/s effective = {100 * gflops / roof['peak']:.0f}% of the float32 peak, "
        f"{100 * gflops / roof['fp32']:.0f}% of torch's matmul rate, "
        f"{100 * rate * len(FLIPS) / roof['limit']:.0f}% of torch's roofline"
    )


def _taps_figure(ctx: BenchContext, x: Tensor) -> dict:
    """What the multi-scale taps cost: the same pass with and without them (they ride on the one forward)."""
    m = ctx.cfg.model
    rates = {}
    for multiscale in (False, True):
        run = _variant(ImageBranch(m.backbone, m.weights, multiscale), x[:2], 8, "torch", "float32", True)
        rates[multiscale] = _timed("taps", run, x, None, None)["rate"]
    return figure(
        "multi-scale taps in the same pass (images/s, torch, 4 flips)",
        rates[True],
        "img/s",
        naive=rates[False],
        note=f"without the taps {rates[False]:.1f} img/s: the pooled earlier stages come from the same forward",
    )
