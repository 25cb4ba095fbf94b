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

from multimodal_lesion.config import replace
from multimodal_lesion.data.constants import CLASSES
from multimodal_lesion.explain import (
    baseline_maps,
    curve_auc,
    energy_inside,
    perturbation_curve,
    pointing_game,
    road_scores,
    shown_view,
)
from multimodal_lesion.explain.pipeline import (
    case_predictor,
    compute_cams,
    explain_run,
    faithfulness,
    lesion_mask,
    load_cases,
)
from multimodal_lesion.explain.resume import FILE_NAME, ReportStore
from multimodal_lesion.explain.selection import CORRECT, ERROR, LEAST_CONFIDENT, select_by_outcome
from multimodal_lesion.models.inference import backend_available
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


def _one_case_at_a_time(run, batch, cams, masks, priors, steps: int) -> list[dict[str, dict[str, float]]]:
    """Today's reference: every map's deletion and insertion curve, then its ROAD, one case at a time."""
    cfg, shape = run.inputs.cfg.explain, cams.shape[-2:]
    out = []
    for i in range(len(batch.rows)):
        predict = shown_view(run.inputs.model, True, run.temperature, batch.meta[i : i + 1])
        maps = {"cam": cams[i], **priors.maps((shape[0], shape[1]), cfg.seed + i)}
        road = road_scores(predict, batch.images[i], np.stack(list(maps.values())), batch.targets[i], seed=cfg.seed)
        report = {}
        for k, (name, sal) in enumerate(maps.items()):
            curves = {
                m: perturbation_curve(predict, batch.images[i], sal, batch.targets[i], mode=m, steps=steps)
                for m in ("deletion", "insertion")
            }
            report[name] = {f"{m}_auc": curve_auc(c) for m, c in curves.items()} | {"road": float(road[k])}
            if masks[i] is not None:
                report[name] |= {
                    "pointing_game": float(pointing_game(sal, masks[i])),
                    "energy_inside": energy_inside(sal, masks[i]),
                }
        out.append(report)
    return out


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_batched_curves_equal_one_case_at_a_time(frozen_run: Path, cli_ham: Path, backend: str) -> None:
    """All cases' curves in shared batches (on the exported backend too) = each case's curves on its own."""
    if not backend_available(backend):
        pytest.skip(f"{backend} is not installed")
    run = load_run(frozen_run, cli_ham)
    run.inputs.cfg = replace(run.inputs.cfg, train={"embed_backend": backend}, explain={"faithfulness_cases": 6})
    rows = run.inputs.indices("test")[:6]
    batch = load_cases(run, rows, ["named"] * len(rows))
    cams = compute_cams(run, batch.images, batch.meta, batch.targets).maps
    masks = [lesion_mask(run.inputs, int(r)) for r in rows]
    priors = baseline_maps(None, smooth_sigma=4)
    batched = faithfulness(run, batch, cams, masks, priors)
    reference = _one_case_at_a_time(run, batch, cams, masks, priors, run.inputs.cfg.explain.steps)
    tolerance = 1e-5 if backend == "torch" else 1e-4  # the exported graph agrees with eager to ~1e-5
    assert len(batched) == 6 and any(m is not None for m in masks)
    for got, want in zip(batched, reference, strict=True):
        assert got.keys() == want.keys()
        for name in want:
            assert got[name] == pytest.approx(want[name], abs=tolerance), name


def test_a_killed_faithfulness_pass_resumes_without_redoing_finished_cases(
    frozen_run: Path, cli_ham: Path, tmp_path: Path
) -> None:
    run = load_run(frozen_run, cli_ham)
    run.inputs.cfg = replace(run.inputs.cfg, explain={"faithfulness_cases": 5, "steps": 4})
    rows = run.inputs.indices("test")[:5]
    batch = load_cases(run, rows, ["named"] * len(rows))
    cams = compute_cams(run, batch.images, batch.meta, batch.targets).maps
    masks = [lesion_mask(run.inputs, int(r)) for r in rows]
    priors = baseline_maps(None, smooth_sigma=4)
    whole = faithfulness(run, batch, cams, masks, priors, store=ReportStore(tmp_path))
    lines = (tmp_path / FILE_NAME).read_text().splitlines()
    assert len(lines) == 5
    (tmp_path / FILE_NAME).write_text("\n".join(lines[:2]) + "\n" + lines[2][:40])  # killed while writing case 3
    measured: list[int] = []
    predict = case_predictor(run)

    def counting(images: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        measured.append(len(images))
        return predict(images, meta)

    resumed = faithfulness(run, batch, cams, masks, priors, counting, ReportStore(tmp_path))
    assert resumed[:2] == whole[:2]  # read back
    for got, want in zip(resumed[2:], whole[2:], strict=True):  # measured again, in other batches
        assert all(got[name] == pytest.approx(want[name], abs=1e-6) for name in want)
    per_case = 1 + 2 + 3 * 2 * 3 + 2 * 3 * 3  # image, 2 baselines, 3 maps x 2 curves x 3 inner steps, ROAD
    assert sum(measured) == 3 * per_case  # cases 3-5 only
    assert faithfulness(run, batch, cams, masks, priors, counting, ReportStore(tmp_path)) == resumed
    assert sum(measured) == 3 * per_case  # all held now: nothing measured


# --- many cases: computed in chunks, pages written as each chunk finishes, a killed run resumed ----------


def _same_case(got, want) -> None:
    """Every number and map of two explanations of one case agree (to float noise; the maps to 1e-3, as a
    network's convolutions give other roundings in batches of another size)."""
    assert got.image_id == want.image_id and got.target_class == want.target_class
    for field in ("probabilities", "shap", "shap_error", "modality", "modality_error", "faithfulness"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.keys() == b.keys(), field
        assert all(a[k] == pytest.approx(b[k], abs=1e-6) for k in b), field
    for field in ("cam", "runner_up_cam", "cam_without_metadata"):  # convolutions of other batch sizes: ~1e-4
        np.testing.assert_allclose(getattr(got, field), getattr(want, field), atol=1e-3)


def test_chunks_give_the_report_of_one_pass(frozen_run: Path, cli_ham: Path) -> None:
    """7 cases in chunks of 3 (faithfulness on the first 4: across a chunk's edge) = 7 cases at once:
    the same cases, values, maps, faithfulness, baselines' random maps and sanity checks."""
    whole = explain_run(frozen_run, data=cli_ham, n=7, settings=EXPLAIN, chunk_size=16)
    chunked = explain_run(frozen_run, data=cli_ham, n=7, settings=EXPLAIN, chunk_size=3)
    assert [c.image_id for c in chunked.cases] == [c.image_id for c in whole.cases]
    for got, want in zip(chunked.cases, whole.cases, strict=True):
        _same_case(got, want)
    assert sum(bool(c.faithfulness) for c in chunked.cases) == 4
    np.testing.assert_allclose(chunked.shap_values.values, whole.shap_values.values, atol=1e-6)
    stages = [(s.stage, s.verdict, s.n_valid) for s in whole.randomisation]
    assert [(s.stage, s.verdict, s.n_valid) for s in chunked.randomisation] == stages and stages
    similarity = [c.spearman for s in whole.randomisation for c in s.cases]
    assert [c.spearman for s in chunked.randomisation for c in s.cases] == pytest.approx(similarity, nan_ok=True)
    assert [c.diff for c in chunked.comparisons] == pytest.approx([c.diff for c in whole.comparisons], abs=1e-6)


class _Killed(Exception):
    """Stands for the kill of a long report after its second chunk's pages were written."""


def test_pages_stream_and_a_killed_report_resumes_without_redoing_finished_chunks(
    frozen_run: Path, cli_ham: Path, tmp_path: Path
) -> None:
    from multimodal_lesion.report.html import case_page_name
    from multimodal_lesion.report.pages import CasePages

    out = tmp_path / "report"
    pages = CasePages(out)
    on_disk: list[list[bool]] = []

    def killed_after_two_chunks(view):  # what is on disk as each chunk finishes
        pages.write(view)
        on_disk.append([(out / "cases" / case_page_name(i)).is_file() for i in view.ids])
        if view.offset >= 3:
            raise _Killed

    with pytest.raises(_Killed):
        explain_run(
            frozen_run, data=cli_ham, n=7, settings=EXPLAIN, resume=out, on_chunk=killed_after_two_chunks, chunk_size=3
        )
    assert on_disk == [[True] * 3 + [False] * 4, [True] * 6 + [False]]  # each chunk's pages as it finishes
    kept = sorted((out / ".explain-chunks").iterdir())
    assert len(kept) == 2 and pages.reused == 0
    mtimes = {f: f.stat().st_mtime_ns for f in kept}

    again = CasePages(out, parallel=True)  # the rest drawn in a worker process
    resumed = explain_run(
        frozen_run, data=cli_ham, n=7, settings=EXPLAIN, resume=out, on_chunk=again.write, chunk_size=3
    )
    drawn = again.finish()
    assert again.reused == 2 and again.seconds > 0  # chunks 1-2 not drawn again, chunk 3 drawn by the worker
    assert all(f.stat().st_mtime_ns == t for f, t in mtimes.items())  # chunks 1-2 read back, not computed
    assert resumed.timings["gradcam"] > 0  # chunk 3 computed
    assert sorted(drawn) == sorted(c.image_id for c in resumed.cases)
    assert all(p is None or p.is_file() for figures in drawn.values() for p in figures.values())
    assert len(list((out / "cases").glob("*.html"))) == 7
    whole = explain_run(frozen_run, data=cli_ham, n=7, settings=EXPLAIN)
    for got, want in zip(resumed.cases, whole.cases, strict=True):
        _same_case(got, want)
    last = explain_run(frozen_run, data=cli_ham, n=7, settings=EXPLAIN, resume=out, chunk_size=3)
    assert "gradcam" not in last.timings and "faithfulness" not in last.timings  # all read back


def test_a_long_report_draws_in_a_worker_and_writes_every_page(frozen_run: Path, cli_ham: Path, tmp_path: Path) -> None:
    """More than a chunk of cases: the figures come from the worker process, every page and the index are
    written, and the timings say how long the report waited for the figures."""
    from multimodal_lesion.report.html import case_page_name
    from multimodal_lesion.workflows import explain_cohort

    index, cohort = explain_cohort(
        frozen_run, tmp_path, data=cli_ham, split="train", n=20, settings=EXPLAIN, show=False
    )
    assert len(cohort.cases) == 20 and "waiting for figures" in cohort.timings
    assert all((tmp_path / "cases" / case_page_name(c.image_id)).is_file() for c in cohort.cases)
    assert len(list((tmp_path / "cases" / "assets").glob("*_overlay.png"))) == 20
    assert len(list((tmp_path / "cases" / "assets" / ".drawn").iterdir())) == 2  # two chunks drawn
    assert case_page_name(cohort.cases[-1].image_id) in index.read_text()
    assert not (tmp_path / ".explain-chunks").exists()  # a finished report keeps no chunks


# --- a model that fuses the metadata into the maps, through the whole pipeline ---------------------------

MAP_RUN = (*TINY, 'model.name="metanet"', 'train.mode="partial"', "model.tail_blocks=1", "train.epochs=2")


@pytest.fixture(scope="module")
def map_run(cli, cli_ham: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny partial metanet run: its metadata re-weights the channels of the maps its last stage reads."""
    folder = tmp_path_factory.mktemp("maps") / "run"
    cli.ok(cli("train", "--data", cli_ham, *[a for pair in MAP_RUN for a in ("--set", pair)], "--out", folder))
    return folder


def test_a_map_model_is_explained_through_its_maps(map_run: Path, cli_ham: Path, tmp_path: Path) -> None:
    """SHAP and the modality split add up on the maps, the CAM (after the fusion) explains the displayed
    probability, the sanity checks run, and every case carries its map without metadata."""
    cohort = explain_run(map_run, data=cli_ham, n=4, settings=EXPLAIN)
    run = load_run(map_run, cli_ham)
    assert run.inputs.model.fuses_on_maps and cohort.provenance["fusion"] == "maps"
    for case in cohort.cases:
        assert case.explained_probability == pytest.approx(case.probabilities[case.target_class], abs=1e-5)
        assert case.shap_base_value + sum(case.shap.values()) == pytest.approx(case.model_output, abs=1e-6)
        assert case.modality_base_value + sum(case.modality.values()) == pytest.approx(case.model_output, abs=1e-6)
        assert case.fusion == "maps" and case.cam_without_metadata is not None
        assert case.cam_without_metadata.shape == case.cam.shape and list(case.age_cams) == ["20", "40", "60", "80"]
    assert "all" in cohort.metadata_map_spearman
    assert cohort.randomisation[0].stage == "head" and cohort.random_logit is not None
    assert any("Metadata on the map" in note for note in cohort.notes)
    from multimodal_lesion.explain.pipeline import save_explanations

    entry = save_explanations(tmp_path, cohort).read_text()
    assert '"fusion": "maps"' in entry and "_cam_without_metadata.npy" in entry


@pytest.mark.slow
def test_metadata_on_map_script(map_run: Path, frozen_run: Path, cli_ham: Path, tmp_path: Path) -> None:
    out = tmp_path / "effect.json"
    args = [sys.executable, "-m", "multimodal_lesion.bench.metadata_on_map", str(frozen_run), str(map_run)]
    args += ["--data", str(cli_ham), "--cases", "5", "--resamples", "50", "--out", str(out)]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| concat") or line.startswith("| metanet")]
    assert [r.split(" | ")[1] for r in rows] == ["late", "maps"]
    import json

    results = json.loads(out.read_text())
    assert [r["fusion"] for r in results] == ["late", "maps"] and all(r["valid"] <= 5 for r in results)
    assert all(-1.0 <= r["mean_spearman"] <= 1.0 for r in results)
