"""Measuring: wall time with peak memory, the reported figure, loader and forward/backward timers, the machine.

Each figure carries its own peak memory: the anonymous resident memory (torch, numpy and Python heaps
alike) sampled every 10 ms above its level at the start of the measurement, the file-backed resident
memory (pages of the memory-mapped image cache) likewise, the growth of the process's ``ru_maxrss``
high-water mark, and the peak of the largest finished child process (the ablation's workers, which the
sampler does not see).
"""

from __future__ import annotations

import contextlib
import operator
import os
import platform
import resource
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

import psutil
import torch
from torch import nn

SAMPLE_SECONDS = 0.01  # interval of the resident-memory sampler
OPS: Mapping[str, Callable[[float, float], bool]] = MappingProxyType(
    {">=": operator.ge, "<=": operator.le, "<": operator.lt, ">": operator.gt}
)
MEMORY_METHOD = (
    "peak_anon_mb: anonymous RSS (torch + numpy + Python heaps) sampled every 10 ms, peak minus "
    "the level at the start of the measurement (freed-but-kept allocator memory is reused first, "
    "so this can under-count); peak_file_mb: file-backed RSS (memory-mapped cache pages), same way; "
    "maxrss_growth_mb: growth of the process's ru_maxrss high-water mark; children_maxrss_mb: "
    "peak RSS of the largest finished child process so far (ablation workers, loader workers)"
)


def resident_bytes(process: psutil.Process | None = None) -> tuple[int, int] | None:
    """(anonymous, file-backed) resident bytes of ``process`` (this one when None).

    psutil's ``rss - shared`` and ``shared`` on Linux; None where the platform does not split them.
    """
    try:
        info = (process or psutil.Process()).memory_info()
    except psutil.Error:
        return None
    shared = getattr(info, "shared", None)
    return None if shared is None else (info.rss - shared, shared)


def maxrss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Resident high-water mark in MB of this process (or, with ``RUSAGE_CHILDREN``, its largest finished child)."""
    scale = 1 / 1024 if platform.system() != "Darwin" else 1 / 2**20  # Linux reports kB, macOS bytes
    return resource.getrusage(who).ru_maxrss * scale


class RssSampler(threading.Thread):
    """Samples this process's resident memory in the background and keeps the peaks."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process()
        self.stop_event = threading.Event()
        self.start_rss = resident_bytes(self.process)
        self.peak = self.start_rss

    def run(self) -> None:
        """Sample every :data:`SAMPLE_SECONDS` until :meth:`finish`."""
        while not self.stop_event.wait(SAMPLE_SECONDS):
            self._sample()

    def _sample(self) -> None:
        now = resident_bytes(self.process)
        if now is not None and self.peak is not None:
            self.peak = (max(self.peak[0], now[0]), max(self.peak[1], now[1]))

    def finish(self) -> dict[str, float | None]:
        """Stop sampling; the peaks above the start in MB (``peak_anon_mb``, ``peak_file_mb``), None if unknown."""
        self.stop_event.set()
        self.join()
        self._sample()
        if self.start_rss is None or self.peak is None:
            return {"peak_anon_mb": None, "peak_file_mb": None}
        mb = [(p - s) / 2**20 for p, s in zip(self.peak, self.start_rss, strict=True)]
        return {"peak_anon_mb": round(mb[0], 1), "peak_file_mb": round(mb[1], 1)}


@contextlib.contextmanager
def measured() -> Iterator[dict[str, Any]]:
    """Time the block and record its peak memory into the yielded dict (``seconds``, ``memory``)."""
    record: dict[str, Any] = {}
    sampler, maxrss = RssSampler(), maxrss_mb()
    sampler.start()
    t0 = time.perf_counter()
    try:
        yield record
    finally:
        record["seconds"] = time.perf_counter() - t0
        record["memory"] = {
            **sampler.finish(),
            "maxrss_growth_mb": round(maxrss_mb() - maxrss, 1),
            "children_maxrss_mb": round(maxrss_mb(resource.RUSAGE_CHILDREN), 1),
        }


def machine(device: torch.device) -> dict[str, Any]:
    """The machine a figure was measured on, with the load at that moment."""
    import timm

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1m": round(load[0], 2),
    }


def figure(
    name: str,
    value: float,
    unit: str,
    record: Mapping[str, Any] | None = None,
    *,
    naive: float | None = None,
    target: tuple[str, str, float] | None = None,
    note: str = "",
) -> dict:
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


class TimedIterator:
    """Wraps an iterable and adds up the seconds spent fetching its items (the data-loading time)."""

    def __init__(self, iterable: Iterable) -> None:
        self.iterator, self.seconds = iter(iterable), 0.0

    def __iter__(self) -> TimedIterator:
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
        self.forward_seconds, self._t0 = 0.0, 0.0
        self.spans: list[list[float]] = []  # [start, end] of each backward pass
        self._handles: list[Any] = []

    @property
    def backward_seconds(self) -> float:
        """Seconds of all timed backward passes."""
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

    def __enter__(self) -> StepTimer:
        self._handles = [self.model.register_forward_pre_hook(self._pre), self.model.register_forward_hook(self._post)]
        self._handles += [
            p.register_post_accumulate_grad_hook(self._grad_done) for p in self.model.parameters() if p.requires_grad
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
