"""The explanation pipeline on a tiny real run (frozen, flip-averaged, temperature-scaled): the CAM
explains the shown probability, cases are picked by outcome, and the real-data script runs end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from multimodal_lesion.data.constants import CLASSES
from multimodal_lesion.explain import perturbation_curve, shown_view
from multimodal_lesion.explain.pipeline import explain_run
from multimodal_lesion.explain.selection import CORRECT, ERROR, LEAST_CONFIDENT, select_by_outcome
from multimodal_lesion.runs import load_run

REPO = Path(__file__).resolve().parents[1]
TINY = (
    'model.backbone="test_resnet"',
    'model.weights="none"',
    "data.image_size=[48, 64]",
    "train.epochs=3",
    "train.batch_size=16",
    "train.threads=1",
    'train.device="cpu"',
)
EXPLAIN = {"faithfulness_cases": 4, "randomisation_cases": 3, "background_size": 20, "bootstrap": 200, "steps": 4}


@pytest.fixture(scope="module")
def frozen_run(cli, cli_ham: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny frozen concat run: cached 4-flip embeddings and a fitted temperature, like the demo's."""
    folder = tmp_path_factory.mktemp("frozen") / "run"
    cli.ok(cli("train", "--data", cli_ham, *[a for pair in TINY for a in ("--set", pair)], "--out", folder))
    return folder


def test_the_cam_explains_the_displayed_probability(frozen_run: Path, cli_ham: Path) -> None:
    """The old pipeline showed the flip-averaged calibrated probability and explained one raw view."""
    cohort = explain_run(frozen_run, data=cli_ham, n=6, settings=EXPLAIN)
    run = load_run(frozen_run, cli_ham)
    assert run.inputs.cfg.train.flip_average and run.temperature != pytest.approx(1.0)
    for case in cohort.cases:
        shown = case.probabilities[case.target_class]
        assert case.explained_probability == pytest.approx(shown, abs=1e-5), case.image_id
    first = cohort.cases[0]
    row = int(np.flatnonzero(run.inputs.dataset.metadata["image_id"].to_numpy() == first.image_id)[0])
    image = run.inputs.normalized_images(np.array([row]))[0]
    meta = torch.from_numpy(run.inputs.meta[[row]])
    predict = shown_view(run.inputs.model, True, run.temperature, meta)
    curve = perturbation_curve(predict, image, first.cam, CLASSES.index(first.target_class), steps=4)
    assert curve[0] == pytest.approx(first.probabilities[first.target_class], abs=1e-5)  # the curves start there too
    raw = torch.softmax(run.inputs.model({"image": image[None], "meta": meta}).double(), -1)[0]
    assert abs(raw[CLASSES.index(first.target_class)].item() - curve[0]) > 1e-4  # what the old CAM explained
    assert "stride" in cohort.provenance["CAM layer"] and "fitted" in cohort.provenance["baselines"]
    assert {c.metric for c in cohort.comparisons} >= {"energy_inside", "pointing_game", "deletion_auc", "road"}
    assert cohort.randomisation[0].stage == "head" and cohort.random_logit is not None
    assert cohort.class_counts["all"] == 6
    assert all(set(c.shap_error) == set(c.shap) for c in cohort.cases)


def test_cases_are_picked_by_outcome() -> None:
    truth = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    probs = np.full((8, 4), 0.1)
    probs[[0, 2, 4], [0, 1, 2]] = 0.7  # correct and confident
    probs[1, 3], probs[3, 0] = 0.9, 0.8  # two confident errors
    probs[6, 3], probs[7, 3] = 0.3, 0.35  # correct, least confident
    rows, why = select_by_outcome(truth, probs, 6, seed=0)
    assert why.count(CORRECT) == 4 and set(rows[:4]) <= {0, 2, 4, 6, 7}
    assert why[4:] == [ERROR, ERROR] or why[4:] == [ERROR, LEAST_CONFIDENT]
    assert rows[4] == 1  # the most confident error first
    assert len(set(rows)) == len(rows)
    assert len(select_by_outcome(truth, probs, 20, seed=0)[0]) == 8


@pytest.mark.slow
def test_real_faithfulness_script_on_synthetic_data(frozen_run: Path, cli_ham: Path, tmp_path: Path) -> None:
    out = tmp_path / "faith"
    args = [sys.executable, str(REPO / "experiments" / "real_faithfulness.py"), "--run", str(frozen_run)]
    args += ["--data", str(cli_ham), "--out", str(out), "--n", "5", "--randomisation-cases", "2"]
    args += ["--set", "explain.background_size=20", "--set", "explain.bootstrap=200", "--set", "explain.steps=4"]
    env = {**os.environ, "MMLESION_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = out / frozen_run.name
    table = (folder / "faithfulness.csv").read_text().splitlines()
    assert table[0].startswith("metric,baseline,n,cam,baseline_value,diff,ci_low,ci_high,verdict")
    assert any(line.startswith("road,centre,5,") for line in table)
    assert "| head |" in (folder / "randomisation.md").read_text()
    assert (folder / "index.html").is_file() and "| energy_inside | mean_mask |" in proc.stdout


@pytest.mark.parametrize(
    "pair,needles",
    [
        ("train.epochs=3", ("--set train.epochs=3", "explain.* settings only")),
        ("explain.shap_scale=odds", ("--set explain.shap_scale=odds", "'probability', 'log_odds'")),
        ("explain.road_percentiles=[0]", ("explain.road_percentiles", "in [1, 99]")),
    ],
)
def test_explain_settings_are_checked_before_any_work(cli, tmp_path: Path, pair: str, needles: tuple[str, ...]) -> None:
    proc = cli("explain", "--run", tmp_path / "no-run", "--out", tmp_path / "out", "--set", pair)
    cli.error(proc, "explain", *needles)
    assert not (tmp_path / "out").exists()
