"""Bad input around runs, through the real ``mmlesion`` CLI on real files: output paths, config values and
where they came from, damaged run files, resuming, replacing and sharing run folders.

Each case ends in exit code 2 and one line ``mmlesion COMMAND: error: ...`` naming the option, key or
file (no traceback), and nothing the user had is changed: the bytes of every file are compared.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import time
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
import tomllib

from multimodal_lesion.config import ExperimentConfig, Range, load_config
from multimodal_lesion.data.constants import METADATA_FILE
from multimodal_lesion.errors import ConfigError


@pytest.fixture(scope="session")
def cli(cli_here):
    """This module's commands run in process (conftest's ``InProcessCli``): most stop on a mistake at once, and a
    new interpreter importing torch for each would cost the suite minutes; ``cli.start`` still starts real
    processes, and ``tests/test_cli_errors.py`` keeps real ones for the console script itself."""
    return cli_here


#: Tiny, fast training settings (a ~0.4M-parameter timm test network, 48x64 images, CPU).
TINY_PAIRS = (
    'model.backbone="test_resnet"',
    'model.weights="none"',
    "data.image_size=[48, 64]",
    "train.epochs=2",
    "train.batch_size=16",
    'train.device="cpu"',
    "train.threads=1",
)
TINY = [arg for pair in TINY_PAIRS for arg in ("--set", pair)]
#: A tiny ablation: one model over three folds, one seed, trained in this process.
TINY_ABLATION = [
    *TINY,
    *("--set", 'ablation.models=["metadata_only"]', "--set", 'ablation.baseline="metadata_only"'),
    *("--set", "ablation.gbm=false", "--set", "ablation.folds=3", "--set", "ablation.seeds=[0]"),
    *("--set", "ablation.bootstrap=10", "--set", "ablation.workers=1"),
]


def snapshot(folder: Path) -> dict[str, str]:
    """Path -> sha256 of every file below ``folder``: equal snapshots mean nothing was changed."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def trained_run(cli, cli_ham: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny finished concat run; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("runs") / "concat"
    cli.ok(cli("train", "--data", cli_ham, "--out", out, *TINY))
    return out


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


@pytest.fixture
def image(cli_ham: Path) -> Path:
    return next(cli_ham.rglob("*.jpg"))


# --- 1. output paths: checked before any work, for every command that writes ------------------------


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    """Bad output places: a file (with content to keep), a path below it, a link loop, a read-only place."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "afile").write_text("keep me\n")
    os.symlink(work / "loop-b", work / "loop-a")
    os.symlink(work / "loop-a", work / "loop-b")
    return {
        "a file": work / "afile",
        "below a file": work / "afile" / "sub",
        "a link loop": work / "loop-a",
        "a folder": work,
        # sysfs refuses to create anything, even to root (where permission bits do not stop writes)
        "a read-only place": Path("/sys/mmlesion-test-out"),
    }


def _command_args(command: str, out: Path, run: Path, dataset: Path) -> list[object]:
    return {
        "synth": ["synth", "--out", out, "--n", 60],
        "eda": ["eda", "--data", dataset, "--out", out],
        "split": ["split", "--data", dataset, "--out", out],
        "train": ["train", "--data", dataset, "--out", out, *TINY],
        "explain": ["explain", "--run", run, "--out", out, "--n", 1],
        "ablate": ["ablate", "--data", dataset, "--out", out, *TINY_ABLATION],
        "demo": ["demo", "--data", dataset, "--out", out],
        "bench": ["bench", "--tiny", "--json", out],
    }[command]


FOLDER_COMMANDS = ["synth", "eda", "train", "explain", "ablate", "demo"]
FILE_COMMANDS = {"split": "--out", "bench": "--json"}


@pytest.mark.slow
@pytest.mark.parametrize("place", ["a file", "below a file", "a link loop", "a read-only place"])
@pytest.mark.parametrize("command", FOLDER_COMMANDS)
def test_bad_output_folder_is_refused_before_any_work(
    cli, command: str, place: str, places: dict[str, Path], trained_run: Path, cli_ham: Path
) -> None:
    out = places[place]
    if place == "a read-only place" and not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    before = snapshot(places["a folder"])
    proc = cli(*_command_args(command, out, trained_run, cli_ham), timeout=120)
    cli.error(proc, command, f"--out {out}")
    assert snapshot(places["a folder"]) == before
    assert not Path("/sys/mmlesion-test-out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("place", ["a folder", "below a file", "a link loop", "a read-only place"])
@pytest.mark.parametrize("command", list(FILE_COMMANDS))
def test_bad_output_file_is_refused_before_any_work(
    cli, command: str, place: str, places: dict[str, Path], trained_run: Path, cli_ham: Path
) -> None:
    out = places[place] / "x.json" if place == "a read-only place" else places[place]
    before = snapshot(places["a folder"])
    proc = cli(*_command_args(command, out, trained_run, cli_ham), timeout=120)
    cli.error(proc, command, f"{FILE_COMMANDS[command]} {out}")
    assert snapshot(places["a folder"]) == before


@pytest.mark.slow
def test_evaluate_refuses_a_run_it_cannot_write_into(cli, run_copy: Path) -> None:
    (run_copy / "eval").write_text("not a folder\n")
    before = snapshot(run_copy)
    proc = cli("evaluate", "--run", run_copy)
    cli.error(proc, "evaluate", "--run", str(run_copy / "eval"), "is a file")
    assert snapshot(run_copy) == before


@pytest.mark.slow
@pytest.mark.parametrize("command, option", [("split", "--out"), ("bench", "--json")])
def test_an_output_that_is_an_input_is_refused(cli, tiny_ham: Path, tmp_path: Path, command: str, option: str) -> None:
    config = tmp_path / "exp.toml"
    config.write_text("[train]\nlr = 0.01\n")
    target = tiny_ham / METADATA_FILE if command == "split" else config
    before = target.read_bytes()
    extra = ["--tiny", "--config", config] if command == "bench" else []
    proc = cli(command, "--data", tiny_ham, option, target, *extra)
    cli.error(proc, command, f"{option} {target}", "input")
    assert target.read_bytes() == before


@pytest.mark.slow
def test_a_failed_command_removes_the_folders_it_created(cli, tmp_path: Path) -> None:
    out = tmp_path / "new" / "eda"
    proc = cli("eda", "--data", tmp_path / "no-such-data", "--out", out)
    cli.error(proc, "eda", str(tmp_path / "no-such-data"))
    assert not (tmp_path / "new").exists()


def _prepare_at(args: tuple[str, float]) -> str:
    """Wait for the shared start time, then prepare ``path`` as an output folder; '' or the error."""
    from multimodal_lesion.io import OutputError, prepare_output

    path, start = args
    time.sleep(max(0.0, start - time.time()))
    try:
        prepare_output(path, kind="folder", option="--out")
    except OutputError as exc:
        return str(exc)
    return ""


@pytest.mark.slow
def test_processes_preparing_the_same_new_folder_at_once_all_succeed(tmp_path: Path) -> None:
    """torchrun's ranks all check ``--out``: one making the folder must not make another fail or remove it."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(4) as pool:
        for attempt in range(20):
            out = tmp_path / f"try{attempt}" / "a" / "b"
            start = time.time() + 0.3
            errors = pool.map(_prepare_at, [(str(out), start)] * 4)
            assert errors == [""] * 4
            assert out.is_dir()


# --- 2. config values: every range and set of choices checked when the config is loaded -------------


def _constrained(tp: object) -> bool:
    """Whether a field type declares a Range on every number in it (choices are Literals)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *extras = typing.get_args(tp)
        return any(isinstance(e, Range) for e in extras) or _constrained(base)
    if origin is tuple:
        return all(_constrained(a) for a in typing.get_args(tp) if a is not Ellipsis)
    return tp not in (int, float)


def test_every_number_in_the_config_declares_its_range() -> None:
    for section in dataclasses.fields(ExperimentConfig):
        hints = typing.get_type_hints(section.default_factory, include_extras=True)  # type: ignore[arg-type]
        for name, tp in hints.items():
            assert _constrained(tp), f"{section.name}.{name} is a number without a declared Range"


BAD_VALUES = [
    ("train.epochs=0", ">= 1"),
    ("train.lr=-1", "> 0"),
    ("train.lr=nan", "finite"),
    ("train.lr=inf", "finite"),
    ("train.backbone_lr=0", "> 0"),
    ("train.batch_size=0", ">= 1"),
    ("train.weight_decay=-0.1", ">= 0"),
    ("train.label_smoothing=1", "[0, 1)"),
    ("train.grad_clip=-1", ">= 0"),
    ("train.patience=0", ">= 1"),
    ("train.warmup_epochs=-1", ">= 0"),
    ("train.ema_decay=1", "[0, 1)"),
    ("train.threads=-2", ">= 0"),
    ("train.seed=-1", ">= 0"),
    ("model.dropout=1.5", "[0, 1)"),
    ("model.meta_hidden=0", ">= 1"),
    ("model.head_hidden=-4", ">= 1"),
    ("data.image_size=[16, 64]", "[32, 4096]"),
    ("data.image_size=[168, 100000]", "[32, 4096]"),
    ("data.test_size=0", "(0, 1)"),
    ("data.val_size=1", "(0, 1)"),
    ("data.folds=1", "0 or >= 2"),
    ("data.synthetic_n=3", ">= 50"),
    ("data.num_workers=-1", ">= 0"),
    ("explain.steps=0", ">= 1"),
    ("explain.n_cases=0", ">= 1"),
    ("explain.background_size=0", ">= 1"),
    ("explain.faithfulness_cases=-1", ">= 0"),
    ("ablation.folds=2", ">= 3"),  # a cell tests on one fold, validates on the next: 2 leave no training fold
    ("ablation.seeds=[]", "at least 1"),
    ("ablation.seeds=[0, 0]", "without repeats"),
    ("ablation.models=[]", "at least 1"),
    ("ablation.bootstrap=0", ">= 1"),
    ("ablation.workers=0", ">= 1"),
]


@pytest.mark.slow
@pytest.mark.parametrize("pair, allowed", BAD_VALUES, ids=[p for p, _ in BAD_VALUES])
def test_a_value_out_of_range_names_its_set_pair_and_range(
    cli, cli_ham: Path, tmp_path: Path, pair: str, allowed: str
) -> None:
    proc = cli("train", "--data", cli_ham, "--out", tmp_path / "run", *TINY, "--set", pair)
    cli.error(proc, "train", f"--set {pair}", pair.split("=")[0], allowed)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "pairs, keys",
    [
        (["data.test_size=0.6", "data.val_size=0.5"], ["data.test_size", "data.val_size"]),
        (["data.folds=3", "data.fold=3"], ["data.fold"]),
        (['ablation.models=["concat"]', 'ablation.baseline="film"'], ["ablation.baseline"]),
    ],
)
def test_rules_between_keys_name_both(pairs: list[str], keys: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, pairs)
    assert all(k in str(err.value) for k in keys) and "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["ablate", "demo", "bench"])
def test_every_command_checks_the_config_first(cli, cli_ham: Path, tmp_path: Path, command: str) -> None:
    args = {"bench": ["--tiny"], "demo": ["--out", tmp_path / "out"], "ablate": ["--out", tmp_path / "out"]}[command]
    proc = cli(command, *args, "--set", "train.epochs=0")
    cli.error(proc, command, "--set train.epochs=0", ">= 1")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cuda_without_a_gpu_names_train_device(cli, cli_ham: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = cli("train", "--data", cli_ham, "--out", tmp_path / "run", *TINY, "--set", 'train.device="cuda"')
    cli.error(proc, "train", "train.device", "no CUDA GPU")
    assert not (tmp_path / "run").exists()


# --- 3. errors attributed to their source: the --set pair, the file, the option ---------------------


@pytest.mark.slow
def test_a_bad_set_value_names_the_set_pair_not_the_file(cli, cli_ham: Path, tmp_path: Path) -> None:
    config = tmp_path / "exp.toml"
    config.write_text("[train]\nlr = 0.01\n")
    proc = cli("train", "--config", config, "--data", cli_ham, "--out", tmp_path / "run", "--set", "train.lr=-1")
    line = cli.error(proc, "train", "--set train.lr=-1", "train.lr")
    assert str(config) not in line


@pytest.mark.slow
def test_a_bad_file_value_names_the_file_not_set(cli, cli_ham: Path, tmp_path: Path) -> None:
    config = tmp_path / "exp.toml"
    config.write_text("[train]\nlr = -1.0\n")
    proc = cli("train", "--config", config, "--data", cli_ham, "--out", tmp_path / "run", "--set", "train.epochs=2")
    line = cli.error(proc, "train", str(config), "train.lr", "> 0")
    assert "--set" not in line


OPTION_MISTAKES = [
    (["explain", "--run", "RUN", "--out", "OUT", "--n", "0"], "--n"),
    (["explain", "--run", "RUN", "--out", "OUT", "--n", "-1"], "--n"),
    (["explain", "--run", "RUN", "--out", "OUT", "--n", "three"], "--n"),
    (["split", "--data", "DATA", "--out", "OUT", "--folds", "1"], "--folds"),
    (["split", "--data", "DATA", "--out", "OUT", "--test-size", "1.5"], "--test-size"),
    (["split", "--data", "DATA", "--out", "OUT", "--test-size", "0.6", "--val-size", "0.6"], "--val-size"),
    (["split", "--data", "DATA", "--out", "OUT", "--seed", "-1"], "--seed"),
    (["synth", "--out", "OUT", "--n", "0"], "--n"),
    (["predict", "--run", "RUN", "--image", "IMAGE", "--age", "-5"], "--age"),
    (["predict", "--run", "RUN", "--image", "IMAGE", "--age", "nan"], "--age"),
    (["train", "--data", "DATA", "--out", "OUT", "--resume", "--overwrite"], "--overwrite"),
    (["train", "--data", "DATA", "--out", ""], "--out"),  # --out "$OUT" with OUT unset: not the current folder
    (["train", "--data", "", "--out", "OUT"], "--data"),  # not silently the synthetic dataset
    (["evaluate", "--run", "RUN", "--split", "tset"], "--split"),
    (["bench", "--tiny", "--size", "train_steps=0"], "train_steps"),
]


@pytest.mark.slow
@pytest.mark.parametrize("argv, option", OPTION_MISTAKES, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_a_bad_option_names_the_option(
    cli, trained_run: Path, cli_ham: Path, image: Path, tmp_path: Path, argv: list[str], option: str
) -> None:
    subst = {"RUN": trained_run, "DATA": cli_ham, "OUT": tmp_path / "out", "IMAGE": image}
    proc = cli(*(subst.get(a, a) for a in argv))
    cli.error(proc, argv[0], option)
    assert not (tmp_path / "out").exists()


# --- 4. run files: read through one guarded loader that checks their shape ---------------------------


def _truncate(path: Path) -> bytes:
    return path.read_bytes()[: len(path.read_bytes()) // 3]


DAMAGE: dict[str, tuple[str, Callable[[Path], bytes]]] = {
    "metrics.json truncated": ("metrics.json", _truncate),
    "metrics.json a list": ("metrics.json", lambda p: b"[1, 2]\n"),
    "metrics.json temperature a word": ("metrics.json", lambda p: b'{"temperature": "hot"}\n'),
    "encoder.json truncated": ("encoder.json", _truncate),
    "encoder.json of another shape": (
        "encoder.json",
        lambda p: (
            b'{"params": {}, "learned": {"age_mean_": 50, "age_std_": 10, "categories_": {},'
            b' "feature_groups_": {"age": [0, 1]}}}\n'
        ),
    ),
    "splits.csv binary junk": ("splits.csv", lambda p: bytes(range(256)) * 8),
    "splits.csv without its split column": ("splits.csv", lambda p: b"image_id,lesion_id\nISIC_0024306,HAM_0000000\n"),
    "splits.csv with a split 'banana'": ("splits.csv", lambda p: p.read_text().replace(",test", ",banana").encode()),
    "splits.csv empty": ("splits.csv", lambda p: b""),
    "config.toml garbage": ("config.toml", lambda p: b"\x00\xff[[ not toml"),
    "config.toml with epochs = 0": (
        "config.toml",
        lambda p: p.read_text().replace("epochs = 2", "epochs = 0").encode(),
    ),
}
READERS = [
    ("metrics.json truncated", "evaluate"),
    ("metrics.json truncated", "predict"),
    ("metrics.json a list", "predict"),
    ("metrics.json temperature a word", "evaluate"),
    ("encoder.json truncated", "predict"),
    ("encoder.json of another shape", "explain"),
    ("splits.csv binary junk", "evaluate"),
    ("splits.csv without its split column", "explain"),
    ("splits.csv with a split 'banana'", "evaluate"),
    ("splits.csv empty", "resume"),
    ("config.toml garbage", "evaluate"),
    ("config.toml garbage", "predict"),
    ("config.toml garbage", "resume"),
    ("config.toml with epochs = 0", "explain"),
]


def _use_run(command: str, run: Path, dataset: Path, image: Path, out: Path) -> list[object]:
    return {
        "evaluate": ["evaluate", "--run", run],
        "predict": ["predict", "--run", run, "--image", image],
        "explain": ["explain", "--run", run, "--out", out, "--n", 1],
        "resume": ["train", "--data", dataset, "--out", run, *TINY, "--resume"],
    }[command]


@pytest.mark.slow
@pytest.mark.parametrize("damage, command", READERS, ids=[f"{d} -> {c}" for d, c in READERS])
def test_a_damaged_run_file_is_named_and_nothing_is_written(
    cli, run_copy: Path, cli_ham: Path, image: Path, tmp_path: Path, damage: str, command: str
) -> None:
    name, make = DAMAGE[damage]
    (run_copy / name).write_bytes(make(run_copy / name))
    before = snapshot(run_copy)
    proc = cli(*_use_run(command, run_copy, cli_ham, image, tmp_path / "out"))
    cli.error(proc, "train" if command == "resume" else command, f"{run_copy / name}: not readable")
    assert snapshot(run_copy) == before


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["garbage", "weights only"])
def test_a_damaged_last_checkpoint_is_named_on_resume(cli, run_copy: Path, cli_ham: Path, damage: str) -> None:
    last = run_copy / "last.pt"
    last.write_bytes(b"not a checkpoint" if damage == "garbage" else (run_copy / "best.pt").read_bytes())
    before = snapshot(run_copy)
    proc = cli("train", "--data", cli_ham, "--out", run_copy, *TINY, "--resume")
    cli.error(proc, "train", str(last), "checkpoint")
    assert snapshot(run_copy) == before


# --- 5. --resume never damages a run --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("change, key", [('model.name="film"', "model.name"), ("train.lr=0.1", "train.lr")])
def test_resume_with_other_settings_is_refused_and_the_run_still_evaluates(
    cli, run_copy: Path, cli_ham: Path, change: str, key: str
) -> None:
    before = snapshot(run_copy)
    proc = cli("train", "--data", cli_ham, "--out", run_copy, *TINY, "--set", change, "--resume")
    cli.error(proc, "train", str(run_copy), "cannot resume", key)
    assert snapshot(run_copy) == before
    cli.ok(cli("evaluate", "--run", run_copy))  # writes eval/test/ and nothing else
    assert {k: v for k, v in snapshot(run_copy).items() if not k.startswith("eval")} == before


@pytest.mark.slow
def test_resume_on_other_data_is_refused(
    cli, run_copy: Path, tiny_ham_factory: Callable[..., Path], tmp_path: Path
) -> None:
    other = tiny_ham_factory(tmp_path / "other", n_lesions=35, seed=3)
    before = snapshot(run_copy)
    proc = cli("train", "--data", other, "--out", run_copy, *TINY, "--resume")
    cli.error(proc, "train", str(run_copy / "splits.csv"), "split differently")
    assert snapshot(run_copy) == before


# --- 6. run folders are guarded: refused, replaced on request, never shared ----------------------------


@pytest.mark.slow
def test_training_into_a_run_folder_is_refused_without_overwrite(cli, run_copy: Path, cli_ham: Path) -> None:
    before = snapshot(run_copy)
    proc = cli("train", "--data", cli_ham, "--out", run_copy, *TINY)
    cli.error(proc, "train", str(run_copy), "already holds a run", "--overwrite", "--resume")
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_overwrite_replaces_the_run_and_its_stale_evaluation_only(cli, run_copy: Path, cli_ham: Path) -> None:
    (run_copy / "eval" / "test").mkdir(parents=True)
    (run_copy / "eval" / "test" / "metrics.json").write_text("{}\n")
    (run_copy / "notes.txt").write_text("my notes\n")
    cli.ok(cli("train", "--data", cli_ham, "--out", run_copy, *TINY, "--set", "train.seed=5", "--overwrite"))
    assert not (run_copy / "eval").exists()
    assert (run_copy / "notes.txt").read_text() == "my notes\n"
    assert tomllib.loads((run_copy / "config.toml").read_text())["train"]["seed"] == 5
    assert sorted(p.name for p in run_copy.iterdir() if p.name.startswith(".")) == []  # no lock, no leftovers


@pytest.mark.slow
def test_an_ablation_into_a_run_folder_is_refused(cli, run_copy: Path, cli_ham: Path) -> None:
    before = snapshot(run_copy)
    proc = cli("ablate", "--data", cli_ham, "--out", run_copy, *TINY_ABLATION)
    cli.error(proc, "ablate", str(run_copy), "holds a training run")
    assert snapshot(run_copy) == before


def _second_is_refused_while_first_runs(cli, args: list[object], out: Path, log: Path, command: str) -> None:
    """Start ``args`` twice on one folder: the second ends at once with exit 2 naming the folder and the
    first's pid; the first ends well and its files are its own (the second asked for another seed)."""
    first = cli.start(log, *args)
    lock = out / ".lock"
    cli.wait_for(
        lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), first, log, what="the first's lock"
    )
    t0 = time.monotonic()
    second = cli(*args, "--set", "train.seed=7", timeout=120)
    assert time.monotonic() - t0 < 30, "the second process was not refused at once"
    cli.error(second, command, str(out), f"pid {first.pid}")
    assert first.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert tomllib.loads((out / "config.toml").read_text())["train"]["seed"] == 0
    assert not lock.exists()


@pytest.mark.slow
def test_two_trainings_never_share_a_run_folder(cli, cli_ham: Path, tmp_path: Path, temp_files) -> None:
    out = tmp_path / "run"
    args: list[object] = ["train", "--data", cli_ham, "--out", out, *TINY]
    _second_is_refused_while_first_runs(cli, args, out, tmp_path / "first.log", "train")
    assert (out / "metrics.json").is_file() and temp_files(out) == []
    cli.ok(cli("evaluate", "--run", out))


@pytest.mark.slow
def test_two_ablations_never_share_a_folder(cli, cli_ham: Path, tmp_path: Path) -> None:
    out = tmp_path / "ablation"
    args: list[object] = ["ablate", "--data", cli_ham, "--out", out, *TINY_ABLATION]
    _second_is_refused_while_first_runs(cli, args, out, tmp_path / "first.log", "ablate")
    assert sorted(p.name for p in (out / "cells").iterdir()) == [
        f"metadata_only__fold{k}__seed0.json" for k in range(3)
    ]


# --- 7. the benchmark prints its table once -----------------------------------------------------------


@pytest.mark.slow
def test_bench_prints_its_table_once(cli, tmp_path: Path) -> None:
    proc = cli.ok(cli("bench", "--tiny", "--sections", "data", "--json", tmp_path / "bench.json"))
    assert proc.stdout.count("machine: ") == 1, proc.stdout
    assert (tmp_path / "bench.json").is_file()


@pytest.mark.parametrize(
    "argv, command",
    [(["train", "--bogus"], "train"), (["train"], "train"), (["trian"], ""), (["explain", "--n"], "explain")],
)
def test_a_parse_mistake_is_one_line_naming_the_command(argv: list[str], command: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "multimodal_lesion.cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(" ".join(filter(None, ("mmlesion", command))) + ": error: "), proc.stderr
