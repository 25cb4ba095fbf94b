"""Kill and resume, determinism and whole artefacts, with real processes, real kills and real files (issue 7).

- a training run killed with SIGKILL mid-epoch and resumed ends with the metrics of an uninterrupted run;
- same seed, data and config give byte-identical metrics in two processes (CPU);
- a crash leaves no half-written artefact under a final name (and no stray temp file after resuming).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image


def history_rows(run: Path) -> int:
    try:
        return len(pd.read_csv(run / "history.csv"))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


def check_complete(path: Path) -> None:
    """Every artefact under a final name must be whole: checkpoints load, JSON / CSV / TOML / PNG parse."""
    import tomllib

    from multimodal_lesion.runs import load_checkpoint

    readers = {
        ".pt": load_checkpoint,
        ".json": lambda p: json.loads(p.read_text()),
        ".csv": pd.read_csv,
        ".toml": lambda p: tomllib.loads(p.read_text()),
        ".png": lambda p: Image.open(p).load(),
    }
    readers.get(path.suffix, lambda p: None)(path)


def state_dicts_equal(a: Path, b: Path) -> bool:
    import torch

    sa, sb = (torch.load(p, map_location="cpu", weights_only=True)["model"] for p in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- one set of real runs: an uninterrupted one (conftest's end2end_run), a second one, a killed one ---


@dataclass
class Runs:
    first: Path
    second: Path
    resumed: Path
    epochs: int
    epochs_before_kill: int = 0
    after_kill: dict[str, str] = field(default_factory=dict)  # final-named file -> problem ("" = complete)
    temp_after_kill: list[str] = field(default_factory=list)
    planted: list[str] = field(default_factory=list)
    history_before_plant: bytes = b""
    history_after_plant: bytes = b""
    resume_stdout: str = ""


KILL_MID_WRITE = """
import os, signal, sys
from multimodal_lesion.io import atomic_write
with atomic_write(sys.argv[1]) as fh:
    fh.write("epoch,train_loss\\n1,")   # half a history file ...
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # ... and the process dies before the rename
"""


@pytest.fixture(scope="module")
def runs(cli, end2end_run, temp_files: Callable[[Path], list[str]], tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Two uninterrupted runs (separate processes) and one killed mid-epoch, damaged, then resumed."""
    base = tmp_path_factory.mktemp("runs")
    r = Runs(end2end_run.folder, base / "second", base / "resumed", end2end_run.epochs)
    args = end2end_run.args

    log = base / "killed.log"
    proc = cli.start(log, *args, "--out", r.resumed)
    cli.wait_for(lambda: history_rows(r.resumed) >= 1, proc, log, what="the first epoch's checkpoint")
    seconds = float(pd.read_csv(r.resumed / "history.csv")["seconds"].iloc[0])
    time.sleep(min(seconds / 2, 1.0))  # into the next epoch
    cli.sigkill(proc)
    r.epochs_before_kill = history_rows(r.resumed)
    assert r.epochs_before_kill < r.epochs and not (r.resumed / "metrics.json").exists(), "kill came too late"
    for path in sorted(r.resumed.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            try:
                check_complete(path)
                r.after_kill[path.name] = ""
            except Exception as exc:
                r.after_kill[path.name] = f"{type(exc).__name__}: {exc}"
    r.temp_after_kill = temp_files(r.resumed)

    # A second real crash, this time inside an atomic write of a run artefact.
    r.history_before_plant = (r.resumed / "history.csv").read_bytes()
    crash = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(r.resumed / "history.csv")], env=cli.env)
    assert crash.returncode == -signal.SIGKILL
    r.history_after_plant = (r.resumed / "history.csv").read_bytes()
    r.planted = temp_files(r.resumed)

    r.resume_stdout = cli.ok(cli(*args, "--out", r.resumed, "--resume")).stdout
    cli.ok(cli(*args, "--out", r.second))
    return r


@pytest.mark.slow
def test_killed_training_resumes_to_the_uninterrupted_result(runs: Runs) -> None:
    assert 1 <= runs.epochs_before_kill < runs.epochs
    first, resumed = runs.first, runs.resumed
    assert (resumed / "metrics.json").read_bytes() == (first / "metrics.json").read_bytes()
    assert (resumed / "predictions_test.csv").read_bytes() == (first / "predictions_test.csv").read_bytes()
    assert state_dicts_equal(first / "best.pt", resumed / "best.pt")
    timing = ["seconds", "images_per_s"]
    h1, h2 = (pd.read_csv(r / "history.csv").drop(columns=timing) for r in (first, resumed))
    pd.testing.assert_frame_equal(h1, h2)
    assert len(h2) == runs.epochs
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert {"balanced_accuracy", "nll", "ece", "macro_auroc"} <= set(metrics["test"]["calibrated"])


@pytest.mark.slow
def test_same_seed_same_data_same_config_gives_identical_metrics(runs: Runs) -> None:
    assert (runs.second / "metrics.json").read_bytes() == (runs.first / "metrics.json").read_bytes()
    assert (runs.second / "predictions_test.csv").read_bytes() == (runs.first / "predictions_test.csv").read_bytes()
    assert state_dicts_equal(runs.first / "best.pt", runs.second / "best.pt")


@pytest.mark.slow
def test_kill_leaves_only_complete_files_under_final_names(runs: Runs) -> None:
    assert {"last.pt", "best.pt", "history.csv", "config.toml", "splits.csv", "encoder.json"} <= set(runs.after_kill)
    assert {name: problem for name, problem in runs.after_kill.items() if problem} == {}


@pytest.mark.slow
def test_crash_inside_an_atomic_write_keeps_the_old_file(runs: Runs) -> None:
    assert runs.history_after_plant == runs.history_before_plant  # the half-written file never replaced it
    assert any(name.startswith(".history.csv.") for name in runs.planted)  # it stayed under a temp name


@pytest.mark.slow
def test_no_temp_file_left_in_run_folders_after_resume(runs: Runs, temp_files: Callable[[Path], list[str]]) -> None:
    for run in (runs.first, runs.second, runs.resumed):
        assert temp_files(run) == [], f"{run}: stale temp files {temp_files(run)}"
