"""Knowing when not to trust a prediction: conformal sets (crepes), selective prediction, ensembles,
metadata dropout and absent metadata, the subgroup audit (fairlearn) and the what-if curves, on real
computations: simulated classifiers with known behaviour for the statistics, a real trained run for the
wiring (``metrics.json``, ``mmlesion predict``, the what-if of a case).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from multimodal_lesion.data.constants import CLASSES as CLASSES
from multimodal_lesion.data.encoder import MetadataEncoder
from multimodal_lesion.data.patient import read_patient
from multimodal_lesion.data.sampling import EpochSampler, MetaDropout, TensorBatches
from multimodal_lesion.runs import tta_spread
from multimodal_lesion.training.audit import subgroup_audit
from multimodal_lesion.training.metrics import expected_calibration_error
from multimodal_lesion.training.uncertainty import (
    ConformalSets,
    deferral,
    ensemble_members,
    key_triage,
    nonconformity,
    risk_coverage,
    set_metrics,
)

PRIOR = np.array([0.55, 0.2, 0.1, 0.08, 0.04, 0.02, 0.01])


def simulated(n: int, seed: int, signal: float = 1.2) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, classes) of a classifier biased towards the frequent class 0, on imbalanced classes."""
    rng = np.random.default_rng(seed)
    y = rng.choice(len(PRIOR), n, p=PRIOR)
    z = rng.normal(size=(n, len(PRIOR)))
    z[np.arange(n), y] += signal
    z[:, 0] += 1.0
    p = np.exp(z)
    return p / p.sum(1, keepdims=True), y


# --- conformal sets --------------------------------------------------------------------------------------


def test_aps_score_is_the_mass_ranked_at_or_above_the_class_and_lac_is_one_minus_p() -> None:
    p = np.array([[0.2, 0.5, 0.3]])
    assert np.allclose(nonconformity(p, "aps"), [[1.0, 0.5, 0.8]])
    assert np.allclose(nonconformity(p, "lac"), [[0.8, 0.5, 0.7]])
    assert np.allclose(nonconformity(p, "raps"), [[1.02, 0.5, 0.81]])


@pytest.mark.parametrize("score", ["aps", "raps", "lac"])
def test_class_conditional_sets_cover_every_class_where_marginal_sets_miss_the_rare_ones(score: str) -> None:
    """Averaged over 10 calibration draws, each class is covered at 90%; marginal sets under-cover the rare ones."""
    coverage: dict[bool, list[list[float]]] = {True: [], False: []}
    overall: dict[bool, list[float]] = {True: [], False: []}
    for draw in range(10):
        cal_p, cal_y = simulated(3000, seed=draw)
        test_p, test_y = simulated(5000, seed=100 + draw)
        for conditional in (True, False):
            sets = ConformalSets(score, (0.9,), conditional).fit(cal_p, cal_y).predict(test_p)
            m = set_metrics(sets, test_y, [str(c) for c in range(7)], (0.9,))["0.90"]
            coverage[conditional].append([v["coverage"] for v in m["per_class"].values()])
            overall[conditional].append(m["coverage"])
    assert np.mean(overall[True]) >= 0.89 and np.mean(overall[False]) >= 0.89
    per_class = {k: np.mean(v, axis=0) for k, v in coverage.items()}
    assert per_class[True].min() >= 0.87  # every class, the rarest (1%: ~30 calibration cases) included
    assert per_class[False][-1] < 0.85  # the marginal guarantee says nothing about a rare class


def test_sets_grow_with_the_level_and_a_class_without_enough_cases_is_always_in() -> None:
    cal_p, cal_y = simulated(400, seed=1)  # class 6: ~4 calibration cases, too few for 95%
    sets = ConformalSets("aps", (0.8, 0.95)).fit(cal_p, cal_y)
    out = sets.predict(simulated(500, seed=2)[0])
    assert (out[:, :, 1] >= out[:, :, 0]).all()  # the 95% set holds the 80% set
    small = [c for c, n in enumerate(sets.n_calibration_) if (n + 1) * 0.05 < 1]
    assert small and sets.always_in_[0.95] == small
    assert out[:, small, 1].all()


# --- selective prediction --------------------------------------------------------------------------------


def test_risk_coverage_matches_a_hand_count_and_a_perfect_ranking_is_the_oracle() -> None:
    y = np.array([0, 1, 0, 1])
    p = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.55, 0.45]])  # confidences .9 .8 .6 .55; errors: 3rd, 4th
    rc = risk_coverage(y, p)
    assert np.allclose(rc["risk"], [0, 0, 1 / 3, 2 / 4])
    assert rc["aurc"] == pytest.approx(np.mean([0, 0, 1 / 3, 1 / 2]))
    assert rc["aurc_oracle"] == pytest.approx(rc["aurc"]) and rc["e_aurc"] == pytest.approx(0)
    bad = np.array([[0.4, 0.6], [0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])  # the most confident case is an error
    worse = risk_coverage(y, bad)
    assert np.allclose(worse["risk"], [1, 1 / 2, 1 / 3, 2 / 4])
    assert worse["e_aurc"] == pytest.approx(np.mean([1, 1 / 2, 1 / 3, 1 / 2]) - np.mean([0, 0, 1 / 3, 1 / 2]))


def test_deferring_the_least_confident_cases_raises_the_accuracy_kept() -> None:
    p, y = simulated(5000, seed=3)
    d = deferral(y, p, key=4, shares=(0.1, 0.3))
    all_kept = float((p.argmax(1) == y).mean())
    assert all_kept < d["0.10"]["accuracy_kept"] < d["0.30"]["accuracy_kept"]
    assert d["0.30"]["key_deferred"] >= d["0.10"]["key_deferred"]
    assert d["0.10"]["system_key_sensitivity"] >= d["0.10"]["key_deferred"]


def test_the_triage_threshold_reaches_its_sensitivity_on_val_and_about_it_on_new_data() -> None:
    val, test = simulated(4000, seed=4), simulated(20000, seed=5)
    t = key_triage((val[1], val[0]), (test[1], test[0]), key=1, sensitivity=0.95)
    on_val = (val[0][val[1] == 1, 1] >= t["threshold"]).mean()
    assert on_val >= 0.95
    assert abs(t["sensitivity"] - 0.95) < 0.02 and 0 < t["referred"] < 1


def test_an_ensemble_of_noisy_members_beats_its_members_and_tta_spread_is_the_view_std() -> None:
    rng = np.random.default_rng(6)
    clean, y = simulated(4000, seed=6, signal=2.0)
    members = []
    for _ in range(5):
        z = np.log(clean) + rng.normal(scale=1.0, size=clean.shape)
        members.append(np.exp(z) / np.exp(z).sum(1, keepdims=True))
    ensemble = ensemble_members(members)
    accuracy = [float((m.argmax(1) == y).mean()) for m in members]
    assert float((ensemble.argmax(1) == y).mean()) > max(accuracy)
    views = np.stack(members[:4])
    top = views.mean(0).argmax(1)
    assert np.allclose(tta_spread(views), views[:, np.arange(len(y)), top].std(0))


# --- absent metadata -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder(patients) -> MetadataEncoder:
    return MetadataEncoder().fit(patients(300, 0))


def test_blanking_every_feature_is_the_encoding_of_a_patient_with_nothing_known(encoder, patients) -> None:
    meta = encoder.transform(patients(20, 1))
    nobody = encoder.transform(read_patient())[0]
    assert np.array_equal(encoder.blank(meta, list(encoder.feature_groups_)), np.tile(nobody, (20, 1)))
    assert np.array_equal(encoder.missing_row(), nobody)
    only_age = encoder.blank(meta, ["age"])
    rest = [c for c in range(meta.shape[1]) if c not in encoder.feature_groups_["age"]]
    assert np.array_equal(only_age[:, rest], meta[:, rest]) and (only_age[:, 1] == 1).all()


def test_metadata_dropout_reads_features_as_missing_at_its_rate_and_repeats_per_epoch(encoder, patients) -> None:
    meta = torch.from_numpy(encoder.transform(patients(4000, 2)))
    inner = TensorBatches(
        {"meta": meta, "target": torch.zeros(len(meta))},
        [str(i) for i in range(len(meta))],
        500,
        EpochSampler(len(meta), shuffle=False),
    )
    dropout = MetaDropout(inner, encoder.missing_row(), encoder.feature_groups_, p_each=0.2, p_all=0.1, seed=0)
    first = torch.cat([b["meta"] for b in dropout])
    assert torch.equal(first, torch.cat([b["meta"] for b in dropout]))  # same epoch: same draws
    dropout.set_epoch(1)
    assert not torch.equal(first, torch.cat([b["meta"] for b in dropout]))
    missing = torch.from_numpy(encoder.missing_row())
    dropped = {}
    for feature, columns in encoder.feature_groups_.items():
        was = (meta[:, columns] == missing[columns]).all(1)
        now = (first[:, columns] == missing[columns]).all(1)
        assert now[was].all()  # what was missing stays missing
        dropped[feature] = float(now[~was].float().mean())
    everything = float((first == missing).all(1).float().mean())
    expected_each = 1 - (1 - 0.2) * (1 - 0.1)  # a feature goes alone or with all the others
    for share in dropped.values():
        assert abs(share - expected_each) < 0.03
    assert 0.1 <= everything < 0.1 + 0.2**3 + 0.03


# --- the subgroup audit ----------------------------------------------------------------------------------


def test_the_audit_matches_direct_computations_and_leaves_small_groups_out_of_the_gaps() -> None:
    p, y = simulated(3000, seed=7)
    rng = np.random.default_rng(1007)  # not the stream of the classes: sex independent of the class
    sex = pd.Series(rng.choice(["female", "male", "unknown"], len(y), p=[0.5, 0.495, 0.005]))
    lesions = np.array([f"L{i // 2}" for i in range(len(y))])
    audit = subgroup_audit(y, p, {"sex": sex}, lesions, key=4, n_boot=50)["sex"]
    for value in ("female", "male"):
        mine = (sex == value).to_numpy()
        group = audit["groups"][value]
        assert group["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y[mine], p[mine].argmax(1)))
        assert group["ece"] == pytest.approx(expected_calibration_error(y[mine], p[mine]))
        assert group["n_lesions"] == len(set(lesions[mine]))
    assert audit["groups"]["unknown"]["too_small"] and not audit["groups"]["male"]["too_small"]
    gap = audit["gaps"]["balanced_accuracy"]
    bas = [audit["groups"][v]["balanced_accuracy"] for v in ("female", "male")]
    assert gap["gap"] == pytest.approx(max(bas) - min(bas))  # the tiny 'unknown' group is not in the gap
    assert gap["ci"][0] <= gap["gap"] <= gap["ci"][1] and set(gap["between"]) == {"female", "male"}


# --- a real run: metrics.json, predict, what-if ----------------------------------------------------------


@pytest.fixture(scope="module")
def run_metrics(end2end_run) -> dict:
    return json.loads((end2end_run.folder / "metrics.json").read_text())


@pytest.mark.slow
def test_a_run_reports_sets_deferral_audit_and_absent_metadata_on_test(run_metrics: dict) -> None:
    test = run_metrics["test"]
    conformal = test["uncertainty"]["conformal"]
    assert conformal["fitted_on"] == "val" and {"0.90", "0.95"} <= set(conformal)
    assert conformal["0.95"]["mean_size"] >= conformal["0.90"]["mean_size"]
    assert set(test["subgroups"]) == {"sex", "age_band", "localization"}
    missing = test["missing_metadata"]
    assert {"full", "none/unknown", "none/marginalise", "no_age/unknown"} <= set(missing)
    # the 'full' row is the run's own balanced decision, scored again from embeddings computed once
    assert missing["full"]["balanced_accuracy"] == pytest.approx(test["balanced"]["balanced_accuracy"], abs=1e-9)
    assert "uncertainty" not in run_metrics["val"]  # nothing fitted on val is scored on val


@pytest.mark.slow
def test_predict_prints_nested_sets_and_the_spread_of_flipped_views(cli, end2end_run, cli_ham: Path) -> None:
    image = next((cli_ham / "HAM10000_images_part_1").glob("*.jpg"))
    out = json.loads(cli.ok(cli("predict", "--run", end2end_run.folder, "--image", image, "--age", 50)).stdout)
    assert abs(sum(out["probabilities"].values()) - 1) < 1e-4
    assert set(out["prediction_sets"]["0.90"]) <= set(out["prediction_sets"]["0.95"])
    assert out["tta_spread"] > 0  # four different views of a real image do not agree to the last digit


@pytest.mark.slow
def test_the_what_if_curve_passes_through_the_shown_prediction(end2end_run) -> None:
    from multimodal_lesion.explain.whatif import what_if
    from multimodal_lesion.runs import load_run

    run = load_run(end2end_run.folder, show=False)
    inputs = run.inputs
    row = int(np.flatnonzero(inputs.dataset.metadata["age"].notna().to_numpy() & (inputs.splits["split"] == "test"))[0])
    patient = inputs.dataset.metadata.iloc[[row]][["age", "sex", "localization"]].reset_index(drop=True)
    patient["age"] = 45.0
    embedding = inputs.embeddings_of(np.array([row]))
    result = what_if(inputs.model, inputs.encoder, patient, embedding, run.temperature, CLASSES)
    meta = torch.from_numpy(inputs.encoder.transform(patient).astype(np.float32))
    with torch.no_grad():
        shown = torch.softmax(inputs.model.forward_head(embedding, meta) / run.temperature, 1)[0].numpy()
    at_45 = result.values["age"].index("45")
    assert np.allclose(result.probs["age"][at_45], shown, atol=1e-5)
    assert set(result.values["sex"]) == set(inputs.encoder.categories_["sex"])
    assert len(result.probs["localization"]) == len(inputs.encoder.categories_["localization"])


# --- an ablation's seeds as an ensemble ------------------------------------------------------------------


@pytest.mark.slow
def test_an_ablation_scores_the_ensemble_of_its_seeds_against_each_seed(tiny_ham_factory, tmp_path: Path) -> None:
    from multimodal_lesion.ablation import run_ablation
    from multimodal_lesion.config import load_config

    data = tiny_ham_factory(tmp_path / "dataset", n_lesions=60)
    pairs = [
        f'data.root="{data}"',
        'model.backbone="test_resnet"',
        'model.weights="none"',
        "data.image_size=[48, 64]",
        'data.cache_dir="' + str(tmp_path / "cache") + '"',
        "train.epochs=3",
        'train.device="cpu"',
        "ablation.folds=3",
        "ablation.seeds=[0, 1]",
        'ablation.models=["image_only", "concat"]',
        "ablation.gbm=false",
        "ablation.workers=1",
        "ablation.bootstrap=200",
    ]
    out = tmp_path / "ablation"
    paths = run_ablation(load_config(None, pairs), out, show=False)
    frame = pd.read_csv(paths["ensembles"])
    assert len(frame[frame.kind == "ensemble"]) == 2 * 3 and len(frame[frame.kind == "member"]) == 2 * 3 * 2
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    targets = pd.read_csv(out / "folds.csv").set_index("image_id")["dx"]
    a, b = cells["concat__fold1__seed0"], cells["concat__fold1__seed1"]
    mean = (np.asarray(a["probs"]) + np.asarray(b["probs"])) / 2
    y = targets.reindex(a["image_ids"]).map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    row = frame[(frame.model == "concat") & (frame.fold == 1) & (frame.kind == "ensemble")].iloc[0]
    assert row["accuracy"] == pytest.approx(float((mean.argmax(1) == y).mean()))
    compared = pd.read_csv(paths["ensemble_comparison"])
    assert set(compared.metric) >= {"accuracy", "nll", "ece", "set_size"} and (compared["n"] == 3).all()
    assert "single seed" in Path(paths["ensembles_md"]).read_text()


@pytest.mark.slow
def test_each_case_page_shows_its_sets_spread_and_what_if(end2end_run, tmp_path: Path) -> None:
    from multimodal_lesion.training.uncertainty import ConformalSets
    from multimodal_lesion.workflows import explain_run

    index = explain_run(end2end_run.folder, tmp_path / "report", n=2, show=False)
    cases = json.loads((tmp_path / "report" / "explanations.json").read_text())["cases"]
    folder_val = pd.read_csv(end2end_run.folder / "predictions_val.csv")
    y_val = folder_val["target"].map({c: i for i, c in enumerate(CLASSES)}).to_numpy()
    conformal = ConformalSets().fit(folder_val[[f"p_{c}" for c in CLASSES]].to_numpy(), y_val)
    for case in cases:
        expected = conformal.predict(np.asarray([[case["probabilities"][c] for c in CLASSES]]))[0]
        assert case["prediction_sets"]["0.90"] == [c for c, keep in zip(CLASSES, expected[:, 0], strict=True) if keep]
        assert case["tta_spread"] >= 0 and set(case["what_if"]["values"]) == {"age", "sex", "localization"}
        page = (index.parent / "cases").glob(f"{case['image_id']}*.html")
        html = next(page).read_text()
        assert "Prediction set, 90% coverage" in html and "What if" in html


def test_the_weighted_bootstrap_replicate_is_fairlearn_on_the_resampled_rows() -> None:
    """A replicate of the gaps' bootstrap (integer row weights) scores exactly what MetricFrame scores on the
    rows repeated that many times."""
    from fairlearn.metrics import MetricFrame

    from multimodal_lesion.training.audit import weighted_group_metrics

    p, y = simulated(2000, seed=8)
    values = np.random.default_rng(8).choice(list("abcde"), len(y))
    weights = np.random.default_rng(9).poisson(1.0, len(y))
    rows = np.repeat(np.arange(len(y)), weights)
    frame = MetricFrame(
        metrics={
            "balanced_accuracy": lambda t, q: balanced_accuracy_score(t, q.argmax(1)),
            "ece": expected_calibration_error,
        },
        y_true=y[rows],
        y_pred=p[rows],
        sensitive_features=values[rows],
    ).by_group
    ours = weighted_group_metrics(y, p, values, weights.astype(float))
    assert np.allclose(ours["balanced_accuracy"], frame["balanced_accuracy"].to_numpy())
    assert np.allclose(ours["ece"], frame["ece"].to_numpy())
