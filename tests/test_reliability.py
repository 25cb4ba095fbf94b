"""Interruption, determinism and safe artefacts (issue 7), with real processes, real kills and real files.

- a training run killed with SIGKILL mid-epoch and resumed ends with the metrics of an uninterrupted run;
- an ablation killed after some cells keeps them and computes only the rest;
- same seed, data and config give byte-identical metrics in two processes (CPU);
- a crash leaves no half-written artefact under a final name (and no stray temp file after resuming);
  stale or damaged caches are detected and rebuilt;
- a checkpoint carrying a pickled payload is refused before the payload runs;
- paths from the data never escape the data root.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import write_tiny_ham
from multimodal_lesion.data.constants import MASK_DIR, MASK_SUFFIX, METADATA_FILE

CLI = [sys.executable, "-m", "multimodal_lesion.cli"]

#: End-to-end fine-tuning of a ~0.4M-parameter timm test network on 48x64 images: each epoch is
#: a few CPU seconds, so a kill lands inside training, and 4 epochs stay quick.
EPOCHS = 4
TINY_END2END = [arg for pair in (
    'model.name="concat"', 'model.backbone="test_resnet"', 'model.weights="none"', "data.image_size=[48, 64]",
    'train.mode="end2end"', f"train.epochs={EPOCHS}", "train.batch_size=8", "train.patience=100",
    'train.device="cpu"', "train.threads=1") for arg in ("--set", pair)]

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


# --- helpers ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "MMLESION_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def ham(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_ham(tmp_path_factory.mktemp("data") / "ham")


def run_cli(env: dict[str, str], *args: object, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def start_cli(env: dict[str, str], log: Path, *args: object) -> subprocess.Popen:
    """Start ``mmlesion ARGS`` in the background, output to ``log`` (a pipe could fill and block it)."""
    fh = open(log, "w")
    return subprocess.Popen([*CLI, *map(str, args)], stdout=fh, stderr=subprocess.STDOUT, env=env)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def one_line_error(proc: subprocess.CompletedProcess, command: str, *needles: str) -> str:
    """Exit 2, no traceback, the command's error as one line naming ``needles``."""
    detail = f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, detail
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"mmlesion {command}: error: ")]
    assert len(errors) == 1, detail
    assert all(n in errors[0] for n in needles), f"{needles} not all in {errors[0]!r}"
    return errors[0]


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 300, what: str = "") -> None:
    """Poll ``condition()`` every 20 ms while ``proc`` runs; fail clearly if it ends or times out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"process ended (exit {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def sigkill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=300) == -signal.SIGKILL


def history_rows(run: Path) -> int:
    try:
        return len(pd.read_csv(run / "history.csv"))
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return 0


def temp_files(folder: Path) -> list[str]:
    """Files under a temporary name (``.NAME.*.tmp``, as io.atomic_write / save_checkpoint write them)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name.endswith(".tmp"))


def check_complete(path: Path) -> None:
    """Every artefact under a final name must be whole: checkpoints load, JSON / CSV / TOML / PNG parse."""
    import tomllib

    from multimodal_lesion.training.checkpoints import load_checkpoint

    readers = {".pt": load_checkpoint, ".json": lambda p: json.loads(p.read_text()), ".csv": pd.read_csv,
               ".toml": lambda p: tomllib.loads(p.read_text()), ".png": lambda p: Image.open(p).load()}
    readers.get(path.suffix, lambda p: None)(path)


def state_dicts_equal(a: Path, b: Path) -> bool:
    import torch

    sa, sb = (torch.load(p, map_location="cpu", weights_only=True)["model"] for p in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- (1) kill + resume, (3) determinism, (4) atomic artefacts: one set of real runs ----------------

@dataclass
class Runs:
    first: Path
    second: Path
    resumed: Path
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
def runs(env: dict[str, str], ham: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Two uninterrupted runs (separate processes) and one killed mid-epoch, damaged, then resumed."""
    base = tmp_path_factory.mktemp("runs")
    r = Runs(base / "first", base / "second", base / "resumed")
    args = ["train", "--data", ham, *TINY_END2END]
    ok(run_cli(env, *args, "--out", r.first))

    log = base / "killed.log"
    proc = start_cli(env, log, *args, "--out", r.resumed)
    wait_for(lambda: history_rows(r.resumed) >= 1, proc, log, what="the first epoch's checkpoint")
    seconds = float(pd.read_csv(r.resumed / "history.csv")["seconds"].iloc[0])
    time.sleep(min(seconds / 2, 1.0))  # into the next epoch
    sigkill(proc)
    r.epochs_before_kill = history_rows(r.resumed)
    assert r.epochs_before_kill < EPOCHS and not (r.resumed / "metrics.json").exists(), "kill came too late"
    for path in sorted(r.resumed.rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            try:
                check_complete(path)
                r.after_kill[path.name] = ""
            except Exception as exc:  # noqa: BLE001 - recorded and asserted in a test
                r.after_kill[path.name] = f"{type(exc).__name__}: {exc}"
    r.temp_after_kill = temp_files(r.resumed)

    # A second real crash, this time inside an atomic write of a run artefact.
    r.history_before_plant = (r.resumed / "history.csv").read_bytes()
    crash = subprocess.run([sys.executable, "-c", KILL_MID_WRITE, str(r.resumed / "history.csv")], env=env)
    assert crash.returncode == -signal.SIGKILL
    r.history_after_plant = (r.resumed / "history.csv").read_bytes()
    r.planted = temp_files(r.resumed)

    r.resume_stdout = ok(run_cli(env, *args, "--out", r.resumed, "--resume")).stdout
    ok(run_cli(env, *args, "--out", r.second))
    return r


@pytest.mark.slow
def test_killed_training_resumes_to_the_uninterrupted_result(runs: Runs) -> None:
    assert 1 <= runs.epochs_before_kill < EPOCHS
    first, resumed = runs.first, runs.resumed
    assert (resumed / "metrics.json").read_bytes() == (first / "metrics.json").read_bytes()
    assert (resumed / "predictions_test.csv").read_bytes() == (first / "predictions_test.csv").read_bytes()
    assert state_dicts_equal(first / "best.pt", resumed / "best.pt")
    timing = ["seconds", "images_per_s"]
    h1, h2 = (pd.read_csv(r / "history.csv").drop(columns=timing) for r in (first, resumed))
    pd.testing.assert_frame_equal(h1, h2)
    assert len(h2) == EPOCHS
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
def test_no_temp_file_left_in_run_folders_after_resume(runs: Runs) -> None:
    for run in (runs.first, runs.second, runs.resumed):
        assert temp_files(run) == [], f"{run}: stale temp files {temp_files(run)}"


# --- (2) interrupted ablation ----------------------------------------------------------------------

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
def ablation(env: dict[str, str], ham: Path, tmp_path: Path):
    """Start ``mmlesion ablate`` (2 worker processes) in its own session; kills what is left at the end."""
    cfg = tmp_path / "ablation.toml"
    cfg.write_text(ABLATION_TOML)
    out, log = tmp_path / "ablation", tmp_path / "ablation.log"
    args = ["ablate", "--config", cfg, "--data", ham, "--out", out]
    started: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        fh = open(log, "w")
        proc = subprocess.Popen([*CLI, *map(str, args)], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        started.append(proc)
        return proc

    yield start, args, out, log
    for proc in started:  # orphaned workers stay in the session: end them, whatever the test found
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def finished_cells(out: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((out / "cells").glob("*.json"))}


@pytest.mark.slow
def test_killed_ablation_keeps_finished_cells_and_computes_the_rest(env: dict[str, str], ablation) -> None:
    """The whole job dies (SIGKILL to its process group, as a scheduler or a lost terminal does)."""
    start, args, out, log = ablation
    proc = start()
    wait_for(lambda: len(finished_cells(out)) >= 2, proc, log, what="two finished cells")
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=300) == -signal.SIGKILL
    kept = finished_cells(out)
    total = 3 * 2  # folds x models (one seed, no GBM)
    assert 2 <= len(kept) < total, "kill came too late: every cell had finished"
    for _, content in kept.values():
        json.loads(content)  # finished cells are whole

    again = ok(run_cli(env, *args))
    assert f"resuming: {len(kept)} of {total} cells already done" in again.stdout
    after = finished_cells(out)
    assert len(after) == total
    assert {name: after[name] for name in kept} == kept  # untouched: same mtime, same bytes
    assert (out / "summary.md").is_file()
    assert temp_files(out) == []


@pytest.mark.slow
def test_ablation_workers_do_not_outlive_a_killed_parent(ablation) -> None:
    """Only the main process is killed (OOM killer, ``kill -9 PID``): its workers must not run on as orphans."""
    start, _, out, log = ablation
    proc = start()
    wait_for(lambda: len(finished_cells(out)) >= 1 and children(proc.pid), proc, log, what="a finished cell")
    workers = children(proc.pid)
    sigkill(proc)
    deadline = time.monotonic() + 30  # time for a worker to finish the cell it is on, then go
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [w for w in workers if alive(w)], "ablation workers still running after their parent was killed"


# --- (4) stale / damaged caches ---------------------------------------------------------------------

SIZE = (24, 32)


def _damage_npy(folder: Path, how: str) -> None:
    (npy,) = folder.glob("images-*.npy")
    meta = npy.with_suffix(".json")
    damage = {
        "truncated array": lambda: npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2]),
        "garbage array": lambda: npy.write_bytes(os.urandom(npy.stat().st_size)),
        "array missing": npy.unlink,
        "description missing": meta.unlink,
        "description not JSON": lambda: meta.write_text("{"),
        "description of other images": lambda: meta.write_text(
            json.dumps({**json.loads(meta.read_text()), "image_ids": ["ISIC_0000000"]})),
    }
    damage[how]()


@pytest.mark.parametrize("how", ["truncated array", "garbage array", "array missing", "description missing",
                                 "description not JSON", "description of other images"])
def test_damaged_image_cache_is_detected_and_rebuilt(tiny_ham: Path, tmp_path: Path, how: str) -> None:
    from multimodal_lesion.data.cache import image_array
    from multimodal_lesion.data.ham10000 import read_ham10000

    data = read_ham10000(tiny_ham)
    clean = np.array(image_array(data, SIZE, tmp_path / "cache"))
    _damage_npy(tmp_path / "cache", how)
    again = image_array(data, SIZE, tmp_path / "cache")
    np.testing.assert_array_equal(np.array(again), clean)
    assert temp_files(tmp_path / "cache") == []


def test_image_cache_goes_stale_when_the_data_changes(tiny_ham: Path, tmp_path: Path) -> None:
    from multimodal_lesion.data.cache import decode_resized, image_array
    from multimodal_lesion.data.ham10000 import read_ham10000

    before = read_ham10000(tiny_ham)
    fingerprint = before.fingerprint
    old = np.array(image_array(before, SIZE, tmp_path))
    path = Path(before.metadata.path[3])
    rng = np.random.default_rng(99)
    Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(path, quality=60)  # another size
    after = read_ham10000(tiny_ham)
    assert after.fingerprint != fingerprint
    new = np.array(image_array(after, SIZE, tmp_path))
    np.testing.assert_array_equal(new[3], decode_resized(str(path), SIZE))
    assert not np.array_equal(new[3], old[3])
    np.testing.assert_array_equal(np.delete(new, 3, 0), np.delete(old, 3, 0))


def test_damaged_embedding_cache_is_detected_and_rebuilt(tiny_ham: Path, tmp_path: Path) -> None:
    import torch

    from multimodal_lesion.data.cache import image_array
    from multimodal_lesion.data.datasets import Normalize
    from multimodal_lesion.data.ham10000 import read_ham10000
    from multimodal_lesion.models.image_branch import ImageBranch
    from multimodal_lesion.training.embeddings import cached_embeddings

    data = read_ham10000(tiny_ham)
    images = image_array(data, SIZE, tmp_path / "images")
    torch.manual_seed(0)
    branch = ImageBranch("test_resnet", "none")
    kwargs = dict(folder=tmp_path / "emb", fingerprint=data.fingerprint, identity={"backbone": "test_resnet"},
                  flip_average=False, show=False)
    normalize = Normalize(branch.data_config["mean"], branch.data_config["std"])
    clean = cached_embeddings(branch, lambda: images, len(images), normalize, **kwargs)
    (npy,) = (tmp_path / "emb").glob("embeddings-*.npy")
    npy.write_bytes(npy.read_bytes()[: npy.stat().st_size // 2])  # a damaged cache file
    np.testing.assert_array_equal(cached_embeddings(branch, lambda: images, len(images), normalize, **kwargs), clean)


# --- (5) a checkpoint that carries code --------------------------------------------------------------

class _Payload:
    """Unpickling this runs a shell command (creates ``marker``): what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _poison(checkpoint: Path, marker: Path) -> None:
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    torch.save({**state, "extra": _Payload(marker)}, checkpoint)


@pytest.fixture(scope="module")
def poisoned(runs: Runs, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A copy of a finished run whose best.pt carries a payload; returns (run folder, marker file)."""
    run = shutil.copytree(runs.first, tmp_path_factory.mktemp("poisoned") / "run")
    marker = run.parent / "PWNED"
    _poison(run / "best.pt", marker)
    return run, marker


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_malicious_checkpoint_is_refused_before_it_runs(env: dict[str, str], poisoned: tuple[Path, Path], ham: Path,
                                                        command: str) -> None:
    run, marker = poisoned
    extra = ["--image", next(ham.rglob("*.jpg"))] if command == "predict" else []
    line = one_line_error(run_cli(env, command, "--run", run, *extra), command, str(run / "best.pt"), "refused")
    assert "posix.system" in line and "weights_only" not in line, line  # names what it refused, no unsafe advice
    assert not marker.exists(), "the pickled payload ran"


@pytest.mark.slow
def test_the_malicious_checkpoint_really_is_hostile(env: dict[str, str], poisoned: tuple[Path, Path]) -> None:
    """An unsafe load (what the package never does) runs the payload: the refusal above is meaningful."""
    run, marker = poisoned
    unsafe = f"import torch; torch.load({str(run / 'best.pt')!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", unsafe], env=env, check=True, capture_output=True)
    assert marker.exists()
    marker.unlink()


# --- (6) paths from data never leave the data root ---------------------------------------------------

def _outside_jpeg(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "secret.jpg"
    Image.fromarray(np.zeros((150, 200, 3), np.uint8)).save(path)
    return path


def test_image_link_to_outside_the_root_is_refused(tiny_ham: Path, tmp_path: Path) -> None:
    from multimodal_lesion.data.ham10000 import read_ham10000
    from multimodal_lesion.errors import DataError

    image = next(tiny_ham.rglob("*.jpg"))
    image.unlink()
    image.symlink_to(_outside_jpeg(tmp_path / "outside"))
    with pytest.raises(DataError, match="outside the data root"):
        read_ham10000(tiny_ham)


def test_mask_link_to_outside_the_root_is_refused(tiny_ham: Path, tmp_path: Path) -> None:
    from multimodal_lesion.data.ham10000 import read_ham10000
    from multimodal_lesion.errors import DataError

    mask = next((tiny_ham / MASK_DIR).glob(f"*{MASK_SUFFIX}"))
    mask.unlink()
    mask.symlink_to(_outside_jpeg(tmp_path / "outside"))
    with pytest.raises(DataError, match="outside the data root"):
        read_ham10000(tiny_ham)


def test_linked_folder_outside_the_root_is_not_followed(tiny_ham: Path, tmp_path: Path) -> None:
    from multimodal_lesion.data.ham10000 import read_ham10000
    from multimodal_lesion.errors import DataError

    part = tiny_ham / "HAM10000_images_part_2"
    moved = shutil.move(str(part), str(tmp_path / "elsewhere"))
    part.symlink_to(moved, target_is_directory=True)
    with pytest.raises(DataError, match="not found"):  # its images are not taken from outside the root
        read_ham10000(tiny_ham)
    data = read_ham10000(tiny_ham, drop_missing=True)
    assert any("linked folder" in n for n in data.notes)
    assert all(Path(p).resolve().is_relative_to(tiny_ham.resolve()) for p in data.metadata.path)


def test_links_inside_the_root_are_fine_and_every_path_stays_inside(tiny_ham: Path) -> None:
    from multimodal_lesion.data.ham10000 import read_ham10000

    image = next(tiny_ham.rglob("*.jpg"))
    copy = tiny_ham / "originals" / image.name.replace(".jpg", ".jpeg.bak")
    copy.parent.mkdir()
    shutil.move(image, copy)
    image.symlink_to(copy)
    data = read_ham10000(tiny_ham)
    root = tiny_ham.resolve()
    paths = [Path(p) for col in ("path", "mask_path") for p in data.metadata[col] if p]
    assert paths and all(p.resolve().is_relative_to(root) for p in paths)


@pytest.mark.parametrize("bad_id", ["../../outside/secret", "..", "HAM10000_images_part_1/../../x", "/tmp/x"])
def test_image_id_cannot_point_outside_the_root(tiny_ham: Path, tmp_path: Path, bad_id: str) -> None:
    from multimodal_lesion.data.ham10000 import read_ham10000
    from multimodal_lesion.errors import DataError

    _outside_jpeg(tmp_path / "outside")
    df = pd.read_csv(tiny_ham / METADATA_FILE, dtype=str, keep_default_na=False)
    df.loc[0, "image_id"] = bad_id
    df.to_csv(tiny_ham / METADATA_FILE, index=False)
    with pytest.raises(DataError, match=r"row 1 \(line 2\), column 'image_id'.*not a plain id"):
        read_ham10000(tiny_ham)


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


def test_forked_ablation_workers_survive_a_parent_that_used_openmp(env: dict[str, str], tmp_path: Path) -> None:
    """A notebook that fitted a scikit-learn model before ablating used to hang forever: the forked
    workers inherited the parent's OpenMP pool and the gradient-boosting floor deadlocked on it."""
    root = write_tiny_ham(tmp_path / "ham", n_lesions=30)
    proc = subprocess.run([sys.executable, "-c", FORKED_GBM_AFTER_PARENT_OPENMP, str(root), str(tmp_path / "abl")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-2000:]
    assert len(list((tmp_path / "abl" / "cells").glob("gbm*.json"))) == 3

