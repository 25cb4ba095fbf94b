"""Experiment tracking: an optional MLflow record of each training run and ablation.

Off unless a tracking URI is given (``tracking.mlflow_uri`` or ``--mlflow URI``). A bare path (or a
``file:`` URI) is a local MLflow file store, created if missing; any other URI (``http://...``,
``sqlite:///...``) is handed to MLflow as it is. The training loop only sees a :class:`Tracker`, an
object with ``log_params`` and ``log_metrics``; :class:`MlflowTracker` is the one that writes to MLflow,
which is imported only when a run is tracked (``pip install -e ".[mlflow]"``).

What a tracked run holds: the resolved config as params (``section.key``), the loss and validation
scores of every epoch (step = epoch), every number of ``metrics.json`` keyed by its path
(``test.calibrated.balanced_accuracy``), and the run's files as artefacts. An ablation is a parent run
with one child run per cell (model x fold x seed).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from .config import ExperimentConfig, TrackingConfig, to_dict
from .errors import ConfigError
from .io import prepare_output

#: The key of the config that turns tracking on, and the CLI option that sets it.
CONFIG_KEY = "tracking.mlflow_uri"
OPTION = "--mlflow"
#: MLflow's batch limits (params and tags per call, metrics per call).
_PARAMS_PER_BATCH, _METRICS_PER_BATCH = 100, 1000
#: The characters MLflow allows in a metric or param name; any other becomes "_".
_NAME_UNSAFE = re.compile(r"[^\w\-. :/]")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")  # http://, sqlite:///, databricks://


class Tracker(Protocol):
    """What training reports to: the resolved config once, the scores of each epoch, the final metrics."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Record settings (each value once)."""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record numbers; ``step`` is the epoch for per-epoch scores, None for final ones."""


def config_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The config flattened to ``section.key`` -> its TOML-like text (lists as ``[a, b]``)."""
    return {f"{section}.{key}": _text(v) for section, values in to_dict(cfg).items() for key, v in values.items()}


def numbers(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number of a nested dict (``metrics.json``) keyed by its dotted path; lists, text and flags skipped."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(numbers(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def log_history(tracker: Tracker | None, rows: Iterable[Mapping[str, float]]) -> None:
    """Send per-epoch rows (``history.csv``'s) to ``tracker``: each number but the epoch, at step = epoch."""
    if tracker is None:
        return
    for row in rows:
        tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


def file_store_path(uri: str) -> Path | None:
    """The folder of a local file store URI (a bare path or ``file:``), None for any other scheme."""
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path))
    return None if _SCHEME.match(uri) else Path(uri).expanduser()


def check_uri(uri: str, option: str = CONFIG_KEY) -> str:
    """Check that a tracking URI can be used before any work; returns it (a local folder made absolute).

    A local file store must be a folder where files can be written (created if missing): a file in
    its place, a path below a file or a read-only place is an ``OutputError`` naming ``option``.
    """
    if not uri.strip():
        raise ConfigError(f"{option}: empty tracking URI (leave it out to track nothing)")
    folder = file_store_path(uri)
    if folder is None:
        return uri
    prepare_output(folder, kind="folder", option=option)  # an OutputError naming the option and the path
    return str(folder.resolve())


def check_tracking(uri: str, option: str = CONFIG_KEY) -> None:
    """Before any work: a set tracking URI must be usable and MLflow installed (errors name ``option``)."""
    import importlib.util

    if not uri:
        return
    check_uri(uri, option)
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f'{option}: MLflow tracking needs MLflow (pip install -e ".[mlflow]")')


class MlflowTracker:
    """One MLflow run, written through ``MlflowClient`` (no global active run, so runs can nest and overlap)."""

    def __init__(self, client: Any, run_id: str, experiment_id: str) -> None:
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id

    @classmethod
    def start(
        cls, uri: str, experiment: str, run_name: str, tags: Mapping[str, str] | None = None, option: str = CONFIG_KEY
    ) -> MlflowTracker:
        """Open a new run in ``experiment`` (created if missing) of the store at ``uri``."""
        uri = check_uri(uri, option)
        client = _client(uri, option)
        try:
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
            run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
        except Exception as exc:
            raise ConfigError(f"{option} {uri}: cannot open an MLflow run there ({_first_line(exc)})") from None
        return cls(client, run.info.run_id, experiment_id)

    def child(self, run_name: str, tags: Mapping[str, str] | None = None) -> MlflowTracker:
        """A run nested under this one (MLflow's ``mlflow.parentRunId`` tag): an ablation's cell, say."""
        nested = {"mlflow.parentRunId": self.run_id, **(tags or {})}
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=nested)
        return MlflowTracker(self.client, run.info.run_id, self.experiment_id)

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(_name(k), _text(v)[:6000]) for k, v in params.items()]
        for batch in _chunks(items, _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=batch)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_name(k), float(v), now, step or 0) for k, v in metrics.items()]
        for batch in _chunks(items, _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifacts(self, paths: Iterable[str | Path], under: str | None = None) -> None:
        """Copy files (and folders, whole) into the run's artefacts, optionally below the folder ``under``."""
        for path in map(Path, paths):
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), f"{under}/{path.name}" if under else path.name)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path), under)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, _text(value))

    def end(self, status: str = "FINISHED") -> None:
        """Close the run: FINISHED, FAILED or KILLED."""
        self.client.set_terminated(self.run_id, status=status)


@contextlib.contextmanager
def tracked(
    settings: TrackingConfig, run_name: str, kind: str, *, enabled: bool = True
) -> Iterator[MlflowTracker | None]:
    """An MLflow run for the block when ``settings.mlflow_uri`` is set (else None), closed as the block ends.

    The run is FINISHED when the block returns, KILLED on Ctrl-C and FAILED on any other exception
    (which goes on). ``kind`` (``train``, ``ablation``, ``evaluate``) is the run's ``mmlesion.kind`` tag;
    ``enabled=False`` (a worker process, a torchrun rank other than 0) tracks nothing.
    """
    if not settings.mlflow_uri or not enabled:
        yield None
        return
    tracker = MlflowTracker.start(settings.mlflow_uri, settings.experiment, run_name, tags={"mmlesion.kind": kind})
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED")


def _client(uri: str, option: str) -> Any:
    """An ``MlflowClient`` on ``uri``; MLflow missing or refusing the store is a ConfigError naming ``option``."""
    try:
        from mlflow import MlflowClient
    except ImportError:
        raise ConfigError(f'{option}: MLflow tracking needs MLflow (pip install -e ".[mlflow]")') from None
    if file_store_path(uri) is not None:
        # MLflow 3.7+ keeps its file store in maintenance mode behind this switch; a folder was asked for
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as exc:
        raise ConfigError(f"{option} {uri}: MLflow cannot use it ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def _name(key: str) -> str:
    return _NAME_UNSAFE.sub("_", key)[:250]


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_text(v) for v in value) + "]"
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return str(value)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


__all__ = [
    "CONFIG_KEY",
    "OPTION",
    "MlflowTracker",
    "Tracker",
    "check_tracking",
    "check_uri",
    "config_params",
    "file_store_path",
    "log_history",
    "numbers",
    "tracked",
]
