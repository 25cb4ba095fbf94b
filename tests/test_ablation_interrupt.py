"""An interrupted ablation, with real processes and real kills (issue 7).

- an ablation killed after some cells keeps them and computes only the rest;
- its workers do not outlive a killed parent;
- forked workers survive a parent that already used OpenMP (scikit-learn).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ABLATION_TOML = """
[model]
backbone = "test_resnet"
weights = "none"
[data]
image_size = [48, 64]
[train]
mode = "end2end"
epochs = 3
batch_size = 8
device = "cpu"
threads = 1
[ablation]
models = ["metadata_only", "concat"]
baseline = "metadata_only"
gbm = false
folds = 3
seeds = [0]
bootstrap = 50
workers = 2
"""


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture
def ablation(cli, cli_ham: Path, tmp_path: Path) -> Iterator[tuple[Callable[[], subprocess.Popen], list, Path, Path]]:
    """Start ``mmlesion ablate`` (2 worker processes) in its own session; kills what is left at the end."""
    cfg = tmp_path / "ablation.toml"
    cfg.write_text(ABLATION_TOML)
    out, log = tmp_path / "ablation", tmp_path / "ablation.log"
    args = ["ablate", "--config", cfg, "--data", cli_ham, "--out", out]
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        proc = cli.start(log, *args, new_session=True)
        started.append(proc)
        return proc

    yield start, args, out, log
    for proc in started:  # orphaned workers stay in the session: end them, whatever the test found
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def finished_cells(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((out / "cells").glob("*.json"))}


@pytest.mark.slow
def test_killed_ablation_keeps_finished_cells_and_computes_the_rest(
    cli, ablation, temp_files: Callable[[Path], list[str]]
) -> None:
    """The whole job dies (SIGKILL to its process group, as a scheduler or a lost terminal does)."""
    start, args, out, log = ablation
    proc = start()
    cli.wait_for(lambda: len(finished_cells(out)) >= 2, proc, log, what="two finished cells")
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=300) == -signal.SIGKILL
    kept = finished_cells(out)
    total = 3 * 2  # folds x models (one seed, no GBM)
    assert 2 <= len(kept) < total, "kill came too late: every cell had finished"
    for _, content in kept.values():
        json.loads(content)  # finished cells are whole

    again = cli.ok(cli(*args))
    assert f"resuming: {len(kept)} of {total} cells already done" in again.stdout
    after = finished_cells(out)
    assert len(after) == total
    assert {name: after[name] for name in kept} == kept  # untouched: same mtime, same bytes
    assert (out / "summary.md").is_file()
    assert temp_files(out) == []


@pytest.mark.slow
def test_ablation_workers_do_not_outlive_a_killed_parent(cli, ablation) -> None:
    """Only the main process is killed (OOM killer, ``kill -9 PID``): its workers must not run on as orphans."""
    start, _, out, log = ablation
    proc = start()
    cli.wait_for(lambda: len(finished_cells(out)) >= 1 and children(proc.pid), proc, log, what="a finished cell")
    workers = children(proc.pid)
    cli.sigkill(proc)
    deadline = time.monotonic() + 30  # time for a worker to finish the cell it is on, then go
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [w for w in workers if alive(w)], "ablation workers still running after their parent was killed"


FORKED_GBM_AFTER_PARENT_OPENMP = """
import sys
import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from multimodal_lesion.ablation import run_ablation
from multimodal_lesion.config import load_config

x = np.random.default_rng(0).normal(size=(400, 5))
HistGradientBoostingClassifier(max_iter=20).fit(x, x[:, 0] > 0)  # the parent starts scikit-learn's OpenMP pool
cfg = load_config(None, [f'data.root="{sys.argv[1]}"', 'ablation.models=["metadata_only"]',
                         'ablation.baseline="metadata_only"', "ablation.gbm=true", "ablation.folds=3",
                         "ablation.seeds=[0]", "ablation.bootstrap=50", "ablation.workers=2",
                         "train.epochs=2", 'train.device="cpu"'])
run_ablation(cfg, sys.argv[2], show=False)
print("done")
"""


def test_forked_ablation_workers_survive_a_parent_that_used_openmp(
    cli, tiny_ham_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """A notebook that fitted a scikit-learn model before ablating used to hang forever: the forked
    workers inherited the parent's OpenMP pool and the gradient-boosting floor deadlocked on it."""
    root = tiny_ham_factory(tmp_path / "dataset", n_lesions=30)
    proc = subprocess.run(
        [sys.executable, "-c", FORKED_GBM_AFTER_PARENT_OPENMP, str(root), str(tmp_path / "abl")],
        env=cli.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-2000:]
    assert len(list((tmp_path / "abl" / "cells").glob("gbm*.json"))) == 3


def test_a_setting_at_the_value_it_had_before_it_existed_keeps_finished_cells() -> None:
    """A finished cell stays finished across an upgrade that adds a setting, only at the value it had before."""
    from multimodal_lesion.ablation.run import config_key
    from multimodal_lesion.config import load_config, replace

    base = load_config(None)
    key = config_key(base)
    assert base.data.color_constancy == "none"
    assert config_key(replace(base, data={"color_constancy_p": 3.0, "color_constancy_gamma": 2.2})) == key
    assert config_key(replace(base, data={"color_constancy": "shades_of_gray"})) != key
    assert config_key(replace(base, train={"epochs": base.train.epochs + 1})) != key
    # the embedding backend picks how, not what: cells of the old default (torch) or of an explicit backend
    # stay finished whatever ``auto`` resolves to; a bfloat16 pass is other embeddings
    for backend in ("auto", "torch", "onnxruntime", "openvino"):
        assert config_key(replace(base, train={"embed_backend": backend})) == key
    assert config_key(replace(base, train={"embed_precision": "bfloat16"})) != key
