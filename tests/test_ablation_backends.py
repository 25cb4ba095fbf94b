"""Ablation backends and end-to-end cells: a real local Ray instance (2 CPUs) against the process pool,
and a fine-tuning ablation killed mid-cell that resumes from the cell's own checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from multimodal_lesion.ablation import run_ablation
from multimodal_lesion.config import load_config

pytestmark = pytest.mark.slow
pytest.importorskip("ray", reason="the ray backend needs Ray (test extra)")

#: A small synthetic ablation: 3 folds x 1 seed, tiny images, an untrained (fast) backbone.
TINY = [
    "data.synthetic_n=120",
    "data.image_size=[32, 32]",
    'model.backbone="resnet18"',
    'model.weights="none"',
    "model.head_hidden=16",
    "train.epochs=3",
    "train.batch_size=16",
    "train.warmup_epochs=1",
    "ablation.folds=3",
    "ablation.seeds=[0]",
    "ablation.bootstrap=20",
    "ablation.workers=2",
    "ray.num_cpus=2",
]
FROZEN = [*TINY, 'ablation.models=["image_only", "concat"]', "ablation.gbm=true"]
#: End-to-end cells on timm's ~0.4M-parameter test network: resnet18's checkpoints (weights plus optimiser
#: state, over 100 MB, written every epoch of every cell, three ablations long) made this test minutes long;
#: 48x64 images keep an epoch long enough for the kill to land inside a cell's training.
END2END = [
    *TINY,
    'model.backbone="test_resnet"',
    "data.image_size=[48, 64]",
    "train.batch_size=8",
    'ablation.models=["image_only", "concat"]',
    "ablation.gbm=false",
    'ablation.mode="end2end"',
]


def _results(out: Path) -> pd.DataFrame:
    """results.csv without its wall-time column, in a stable order."""
    df = pd.read_csv(out / "results.csv").drop(columns=["seconds"])
    return df.sort_values(["model", "fold", "seed"]).reset_index(drop=True)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MMLESION_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_ray_backend_gives_the_process_pool_results(tmp_path: Path, cache: Path) -> None:
    run_ablation(load_config(None, FROZEN), tmp_path / "local", show=False)
    run_ablation(load_config(None, [*FROZEN, 'ablation.backend="ray"']), tmp_path / "ray", show=False)
    local, ray_ = _results(tmp_path / "local"), _results(tmp_path / "ray")
    assert len(local) == 3 * 3  # image_only, concat, gbm x 3 folds
    pd.testing.assert_frame_equal(local, ray_)
    assert pd.read_json(tmp_path / "ray" / "timing.json", typ="series")["backend"] == "ray"
    import ray

    assert not ray.is_initialized()  # the local instance this run started is shut down


def _cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "multimodal_lesion.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.2)


def _sets(settings: list[str]) -> list[str]:
    return [arg for s in settings for arg in ("--set", s)]


def test_end2end_ablation_resumes_after_a_kill_to_the_uninterrupted_result(tmp_path: Path, cache: Path) -> None:
    env = {**os.environ, "MMLESION_CACHE": str(cache)}
    out = tmp_path / "killed"
    args = ["ablate", "--out", str(out), *_sets([*END2END, "ablation.workers=1"])]
    proc = _cli(args, env)
    first = out / "runs" / "image_only__fold0__seed0"
    _wait_for(lambda: (first / "history.csv").is_file(), proc)  # killed inside a cell's training
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "cells" / "image_only__fold0__seed0.json").exists()
    epochs_before = len(pd.read_csv(first / "history.csv"))
    assert epochs_before < 3
    again = subprocess.run(
        [sys.executable, "-m", "multimodal_lesion.cli", *args], env=env, capture_output=True, text=True, timeout=900
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(pd.read_csv(first / "history.csv")) == 3  # resumed from last.pt, not restarted
    for name in ("config.toml", "splits.csv", "encoder.json", "best.pt"):
        assert (first / name).is_file()  # each end-to-end cell is a complete run folder
    whole = tmp_path / "uninterrupted"
    run_ablation(load_config(None, END2END), whole, show=False)  # 2 pool workers, same cells
    pd.testing.assert_frame_equal(_results(out), _results(whole))


def test_a_killed_ray_worker_is_retried(tmp_path: Path, cache: Path) -> None:
    env = {**os.environ, "MMLESION_CACHE": str(cache)}
    out = tmp_path / "ray"
    settings = [*FROZEN, 'ablation.backend="ray"', "ablation.gbm=false", "train.epochs=25", "train.patience=25"]
    proc = _cli(["ablate", "--out", str(out), *_sets(settings)], env)
    victims: list[psutil.Process] = []

    def a_cell_is_running() -> bool:
        for p in psutil.process_iter(["name", "cmdline"]):
            title = " ".join(p.info["cmdline"] or []) + " " + (p.info["name"] or "")
            if "ray::_ray_cell" in title:
                victims.append(p)
                return True
        return False

    _wait_for(a_cell_is_running, proc, timeout=600)
    victims[0].kill()
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-2000:]
    assert len(list((out / "cells").glob("*.json"))) == 6  # image_only, concat x 3 folds: the killed one rerun
    assert len(_results(out)) == 6


def test_ray_is_imported_only_when_asked() -> None:
    code = (
        "import sys, multimodal_lesion.cli, multimodal_lesion.ablation, multimodal_lesion.workflows; "
        "multimodal_lesion.cli.build_parser(); print('ray' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    help_ = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "multimodal_lesion.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert help_.returncode == 0
    imported = {line.split("|")[-1].strip().split(".")[0] for line in help_.stderr.splitlines() if "|" in line}
    assert not imported & {"ray", "torch", "timm", "shap", "mlflow"}


def test_ray_address_that_cannot_be_reached_is_one_line(tmp_path: Path, cache: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "multimodal_lesion.cli", "ablate", "--out", str(tmp_path / "x"),
         "--ray-address", "127.0.0.1:1", *_sets(FROZEN)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "MMLESION_CACHE": str(cache)},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and "ray.address" in lines[-1]
