"""MLflow tracking, read back from a real local MLflow file store through ``MlflowClient``.

A tiny ``mmlesion train --mlflow DIR`` must hold the resolved config as params, every epoch's scores as
metric histories, the final metrics of each split and the run's files as artefacts; a small ablation
(2 models x 3 folds on 2 worker processes) a parent run with one child per cell. A bad tracking URI is
one line naming ``--mlflow`` / ``tracking.mlflow_uri``, before any work.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from multimodal_lesion.config import load_config
from multimodal_lesion.errors import ConfigError

mlflow = pytest.importorskip("mlflow", reason="MLflow tracking needs the mlflow extra (test extra)")

EXPERIMENT = "multimodal_lesion"
#: The tiny ablation: two registered models, the fewest folds an ablation takes (3), one seed, two workers.
ABLATION = [
    'ablation.models=["metadata_only", "concat"]',
    'ablation.baseline="metadata_only"',
    "ablation.gbm=false",
    "ablation.folds=3",
    "ablation.seeds=[0]",
    "ablation.bootstrap=20",
    "ablation.workers=2",
]


def _sets(pairs: list[str]) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.fixture
def client_for(monkeypatch: pytest.MonkeyPatch):
    """``MlflowClient`` on a local file store (MLflow 3.7+ keeps that store behind an opt-in switch)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return lambda store: mlflow.MlflowClient(tracking_uri=str(store))


def _runs(client, **filters: str) -> list:
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, "no experiment was created"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    return [r for r in runs if all(r.data.tags.get(k) == v for k, v in filters.items())]


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


@pytest.fixture(scope="module")
def tracked_train(cli, cli_ham: Path, tiny_run_settings: list[str], tmp_path_factory: pytest.TempPathFactory):
    """One tiny ``mmlesion train --mlflow STORE`` (relative store, resolved from the command's folder)."""
    base = tmp_path_factory.mktemp("tracked-train")
    out, store = base / "run", base / "mlruns"
    args = ["train", "--data", str(cli_ham), "--out", str(out), "--mlflow", "mlruns", *_sets(tiny_run_settings)]
    proc = subprocess.run(
        [sys.executable, "-m", "multimodal_lesion.cli", *args],
        capture_output=True,
        text=True,
        env=cli.env,
        cwd=base,
        timeout=600,
    )
    cli.ok(proc)
    return out, store


def test_train_run_is_read_back_from_the_store(tracked_train, client_for) -> None:
    out, store = tracked_train
    client = client_for(store)
    (run,) = _runs(client, **{"mmlesion.kind": "train"})
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["mmlesion.out"] == str(out.resolve())

    # params: the resolved config, flattened section.key (data.root resolved to the dataset it read)
    params = run.data.params
    assert params["model.name"] == "concat" and params["train.epochs"] == "2"
    assert params["data.image_size"] == "[48, 64]" and params["train.device"] == "cpu"
    assert Path(params["data.root"]).resolve() == Path(json.loads((out / "metrics.json").read_text())["data_root"])
    assert params["tracking.mlflow_uri"] == "mlruns"

    # per-epoch metric histories equal history.csv, step = epoch
    history = pd.read_csv(out / "history.csv")
    for column in ("train_loss", "val_loss", "val_balanced_accuracy", "lr"):
        logged = sorted(client.get_metric_history(run.info.run_id, column), key=lambda m: m.step)
        assert [m.step for m in logged] == history["epoch"].tolist()
        assert [m.value for m in logged] == pytest.approx(history[column].tolist())

    # final metrics: every number of metrics.json under its path, per split
    metrics = json.loads((out / "metrics.json").read_text())
    logged = run.data.metrics
    for split in ("val", "test"):
        for name in ("balanced_accuracy", "macro_auroc", "ece"):
            assert logged[f"{split}.calibrated.{name}"] == pytest.approx(metrics[split]["calibrated"][name])
    assert logged["test.balanced.per_class.mel.sensitivity"] == pytest.approx(
        metrics["test"]["balanced"]["per_class"]["mel"]["sensitivity"]
    )
    assert logged["best_epoch"] == metrics["best_epoch"] and logged["n_lesions.test"] == metrics["n_lesions"]["test"]

    # artefacts: the run's config, metrics, history and every evaluation figure
    assert {"config.toml", "metrics.json", "history.csv", "figures"} <= _artifacts(client, run.info.run_id)
    figures = {Path(p).name for p in _artifacts(client, run.info.run_id, "figures")}
    assert figures == {p.name for p in (out / "figures").glob("*.png")} and "confusion_test.png" in figures


@pytest.mark.slow
def test_evaluate_is_a_run_of_its_own(cli, tracked_train, client_for) -> None:
    out, store = tracked_train
    cli.ok(cli("evaluate", "--run", out, "--split", "val", "--mlflow", store))
    client = client_for(store)
    (run,) = _runs(client, **{"mmlesion.kind": "evaluate"})
    assert run.info.status == "FINISHED" and run.data.tags["mmlesion.run"] == str(out.resolve())
    assert run.data.params["eval.split"] == "val" and run.data.params["model.name"] == "concat"
    metrics = json.loads((out / "eval" / "val" / "metrics.json").read_text())
    assert run.data.metrics["val.calibrated.balanced_accuracy"] == pytest.approx(
        metrics["val"]["calibrated"]["balanced_accuracy"]
    )
    assert {"metrics.json", "figures"} <= _artifacts(client, run.info.run_id)
    assert len(_runs(client, **{"mmlesion.kind": "train"})) == 1  # the training run is left as it was


def test_tracking_is_off_without_a_uri_and_mlflow_stays_unimported() -> None:
    """Without a URI nothing is tracked; importing the training code does not import MLflow."""
    assert load_config().tracking.mlflow_uri == ""
    code = (
        "import sys, multimodal_lesion.training.runner, multimodal_lesion.ablation, multimodal_lesion.workflows; "
        "assert 'mlflow' not in sys.modules, 'mlflow imported at module level'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


@pytest.mark.parametrize(
    ("pair", "needle"),
    [
        ("tracking.mlflow_uri=3", "expected a string"),
        ('tracking.experiment=""', "must name an MLflow experiment"),
        ('tracking.uri="x"', "unknown config key 'tracking.uri'"),
    ],
)
def test_tracking_config_keys_are_validated(pair: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        load_config(None, [pair])
    assert str(info.value).startswith(f"--set {pair}")


def _bad_store(tmp_path: Path, where: str) -> tuple[Path, str]:
    """A tracking folder that cannot be one, and the reason the error must give."""
    a_file = tmp_path / "mlruns"
    a_file.write_text("not a folder")
    return {
        "file": (a_file, "is a file, not a folder"),
        "below_a_file": (a_file / "store", "is a file, so nothing can be created below it"),
        "read_only": (Path("/proc/mmlesion-mlruns"), "cannot write there"),  # fails even as root
    }[where]


@pytest.mark.parametrize("where", ["file", "below_a_file", "read_only"])
@pytest.mark.parametrize("option", ["--mlflow", "tracking.mlflow_uri"])
def test_bad_tracking_folder_names_the_option(tmp_path: Path, where: str, option: str) -> None:
    from multimodal_lesion.errors import MMLesionError
    from multimodal_lesion.tracking import check_tracking

    uri, reason = _bad_store(tmp_path, where)
    with pytest.raises(MMLesionError) as info:
        check_tracking(str(uri), option)
    message = str(info.value)
    assert message.startswith(f"{option} {uri}: ") and reason in message and "\n" not in message


@pytest.mark.parametrize(
    ("command", "where", "given_by"),
    [
        ("train", "file", "--mlflow"),  # refused before the heavy imports: a fraction of a second each
        ("train", "read_only", "tracking.mlflow_uri"),
        ("ablate", "below_a_file", "tracking.mlflow_uri"),
        ("ablate", "read_only", "--mlflow"),
    ],
)
def test_bad_tracking_uri_is_one_line_before_any_work(
    cli, cli_ham: Path, tmp_path: Path, command: str, where: str, given_by: str
) -> None:
    uri, reason = _bad_store(tmp_path, where)
    option = ["--mlflow", str(uri)] if given_by == "--mlflow" else ["--set", f'tracking.mlflow_uri="{uri}"']
    out = tmp_path / "out"
    proc = cli(command, "--data", cli_ham, "--out", out, *option)
    cli.error(proc, command, given_by, str(uri), reason)
    assert not out.exists(), "the output was touched before the tracking URI was checked"


@pytest.fixture(scope="module")
def tracked_ablation(cli, cli_ham: Path, tiny_run_settings: list[str], tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("tracked-ablation")
    out, store = base / "ablation", base / "store"
    cli.ok(cli("ablate", "--data", cli_ham, "--out", out, "--mlflow", store, *_sets([*tiny_run_settings, *ABLATION])))
    return out, store


@pytest.mark.slow
def test_ablation_is_a_parent_run_with_a_child_per_cell(tracked_ablation, client_for) -> None:
    out, store = tracked_ablation
    client = client_for(store)
    (parent,) = _runs(client, **{"mmlesion.kind": "ablation"})
    assert parent.info.status == "FINISHED"
    assert parent.data.params["ablation.folds"] == "3" and parent.data.params["ablation.workers"] == "2"

    children = _runs(client, **{"mlflow.parentRunId": parent.info.run_id})
    cells = {(c.data.params["model"], int(c.data.params["fold"]), int(c.data.params["seed"])): c for c in children}
    assert set(cells) == {(m, f, 0) for m in ("metadata_only", "concat") for f in range(3)}
    assert all(c.info.status == "FINISHED" and c.data.tags["mmlesion.kind"] == "ablation_cell" for c in children)

    # each child holds its cell's test metrics and its per-epoch validation scores
    for (model, fold, seed), child in cells.items():
        record = json.loads((out / "cells" / f"{model}__fold{fold}__seed{seed}.json").read_text())
        assert child.data.metrics["test.balanced_accuracy"] == pytest.approx(record["metrics"]["balanced_accuracy"])
        assert child.data.metrics["test.per_class.nv.auroc"] == pytest.approx(
            record["metrics"]["per_class"]["nv"]["auroc"], nan_ok=True
        )
        steps = client.get_metric_history(child.info.run_id, "val_balanced_accuracy")
        assert sorted(m.step for m in steps) == [row["epoch"] for row in record["history"]] == [1, 2]

    # the parent: the summary's means and intervals as metrics, the tables and plots as artefacts
    summary = pd.read_csv(out / "summary.csv").set_index(["model", "metric"])
    for model in ("metadata_only", "concat"):
        for stat in ("mean", "ci_low", "ci_high"):
            expected = summary.loc[(model, "balanced_accuracy"), stat]
            assert parent.data.metrics[f"{model}.balanced_accuracy.{stat}"] == pytest.approx(expected)
    artifacts = _artifacts(client, parent.info.run_id)
    assert {"config.toml", "summary.csv", "summary.md", "comparison.csv", "balanced_accuracy.png"} <= artifacts


@pytest.mark.slow
def test_a_resumed_run_is_a_new_mlflow_run_holding_the_whole_history(
    cli_ham: Path, tiny_run_settings: list[str], tmp_path: Path, client_for
) -> None:
    """Resuming (here a finished run: no epoch left) logs the epochs before the interruption first."""
    from multimodal_lesion.workflows import train_run

    store = tmp_path / "store"
    pairs = [f'data.root="{cli_ham}"', f'tracking.mlflow_uri="{store}"', 'tracking.experiment="resumed"']
    cfg = load_config(None, [*tiny_run_settings, *pairs])
    first = train_run(cfg, tmp_path / "run", show=False)
    again = train_run(cfg, tmp_path / "run", resume=True, show=False)
    assert again["best_epoch"] == first["best_epoch"]
    client = client_for(store)
    experiment = client.get_experiment_by_name("resumed")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    for run in runs:
        logged = sorted(client.get_metric_history(run.info.run_id, "val_loss"), key=lambda m: m.step)
        assert [m.step for m in logged] == history["epoch"].tolist() == [1, 2]
        assert [m.value for m in logged] == pytest.approx(history["val_loss"].tolist())
