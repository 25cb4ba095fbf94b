"""Where the cells of an ablation run: a process pool on this machine, or Ray tasks on a cluster.

Both backends call the same :meth:`CellContext.run`, which writes each finished cell atomically to
``OUT/cells/`` (shared storage on a cluster), so a finished cell is never computed again, whichever
machine ran it. Ray is imported only by the ``ray`` backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from ..config import ExperimentConfig, RayConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    from .run import Cell, CellContext


def _one_thread_per_worker(threads: int = 1) -> None:
    """Limit torch and every OpenMP / BLAS pool of a worker process to ``threads``.

    A pool the parent had already started is not fork-safe: scikit-learn's gradient boosting
    deadlocked on it in a forked worker.
    """
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)


class _PoolWorker:
    """Per-process holder of the cell context in a forked worker (set once by the pool's initializer)."""

    context: CellContext | None = None

    @classmethod
    def start(cls, context: CellContext) -> None:
        _die_with_parent()
        _one_thread_per_worker()
        cls.context = context

    @classmethod
    def run(cls, cell: Cell) -> str:
        if cls.context is None:
            raise RuntimeError("pool worker used before its initializer ran")
        return cls.context.run(cell)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when the parent dies, so a killed ablation leaves no orphans."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def run_local(todo: list[Cell], context: CellContext, show: bool) -> None:
    """Run the cells in this process, or in ``ablation.workers`` forked processes with one torch thread each.

    Small heads on cached embeddings use a core far better one-per-process than two threads on one
    model; a crash in a worker still leaves every finished cell on disk.
    """
    workers = context.cfg.ablation.workers
    bar = tqdm(total=len(todo), desc="ablation", disable=not show, unit="cell")
    if workers <= 1 or len(todo) <= 1:
        for cell in todo:
            context.run(cell)
            bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        pool = ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_PoolWorker.start,
            initargs=(context,),
        )
        with pool:
            for future in as_completed([pool.submit(_PoolWorker.run, cell) for cell in todo]):
                future.result()
                bar.update()
    bar.close()


def _ray_cell(context: CellContext, cell: Cell, threads: int) -> str:
    """One cell in a Ray worker: the same work as a pool worker, with the threads its resources allow."""
    _one_thread_per_worker(threads)
    return context.run(cell)


def run_ray(todo: list[Cell], context: CellContext, show: bool) -> None:
    """Run the cells as Ray tasks, each declaring its CPUs / GPUs; a task whose worker died is retried.

    ``ray.address`` joins an existing cluster; without it a local Ray instance is started here and
    shut down at the end. The context (config, metadata, folds and, on the frozen path, the shared
    backbone with its cached embeddings) goes to the object store once.
    """
    ray = _import_ray()
    rc: RayConfig = context.cfg.ray
    started = _connect(ray, rc)
    try:
        threads = max(1, math.ceil(rc.cpus_per_cell))
        task = ray.remote(num_cpus=rc.cpus_per_cell, num_gpus=rc.gpus_per_cell, max_retries=rc.max_retries)(_ray_cell)
        context_ref = ray.put(context)
        pending = [task.remote(context_ref, cell, threads) for cell in todo]
        _wait_all(ray, pending, len(todo), show)
    finally:
        if started:
            ray.shutdown()


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "ablation.backend: 'ray' needs Ray, which is not installed (pip install -e \".[ray]\")"
        ) from None
    return ray


def _connect(ray: Any, rc: RayConfig) -> bool:
    """Join ``ray.address`` or start a local instance; returns whether this call started Ray."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if rc.address:
        _check_reachable(rc.address)
        kwargs["address"] = rc.address
    elif rc.num_cpus:
        kwargs["num_cpus"] = rc.num_cpus
    try:
        ray.init(**kwargs)
    except ConnectionError as exc:
        raise ConfigError(f"ray.address: cannot join the Ray cluster at {rc.address!r} ({exc})") from None
    return True


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail in seconds, naming ``ray.address``, when nothing listens there (ray.init would wait minutes)."""
    import socket

    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray.address: expected HOST:PORT (e.g. 10.0.0.1:6379) or 'auto', got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(f"ray.address: no Ray cluster answers at {address} ({exc.strerror or exc})") from None


def _wait_all(ray: Any, pending: list[Any], total: int, show: bool) -> None:
    """Wait for every task, updating the bar as each finishes; a failed cell stops the ablation."""
    bar = tqdm(total=total, desc="ablation (ray)", disable=not show, unit="cell")
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
        bar.update(len(done))
    bar.close()


#: The backends by ``ablation.backend``.
BACKENDS: dict[str, Callable[[list[Cell], CellContext, bool], None]] = {"local": run_local, "ray": run_ray}


def check_backend(cfg: ExperimentConfig) -> None:
    """Refuse, before any work, a backend that cannot run here (Ray missing, a cluster that does not answer)."""
    if cfg.ablation.backend == "ray":
        _import_ray()
        if cfg.ray.address:
            _check_reachable(cfg.ray.address)


def run_cells(todo: Iterable[Cell], context: CellContext, show: bool) -> None:
    """Run ``todo`` on the configured backend."""
    BACKENDS[context.cfg.ablation.backend](list(todo), context, show)
