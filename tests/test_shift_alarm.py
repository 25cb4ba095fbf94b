"""Images unlike the run's: a clinic's known prior, the shift alarm, empty prediction sets, the external page.

The prior and the alarm's statistics are checked on synthetic numbers with known answers; one tiny
frozen run is trained on a tiny HAM10000-layout dataset, and "other" datasets are written from it: a
copy with new ids (the same images: the alarm must stay quiet) and a copy whose second source is
recoloured (the alarm must separate it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from multimodal_lesion.config import load_config
from multimodal_lesion.data.constants import METADATA_FILE
from multimodal_lesion.errors import ConfigError
from multimodal_lesion.runs.prior import estimate_prior, parse_prior, reweight
from multimodal_lesion.runs.shift import (
    REFERENCE_FILE,
    ShiftReference,
    conformal_p_values,
    mmd_test,
    shift_reference,
)
from multimodal_lesion.training.new_data import empty_set_counts, set_columns
from multimodal_lesion.training.uncertainty import EMPTY_SET_MEANING, ConformalSets, set_metrics
from multimodal_lesion.workflows import train_run

pytestmark = pytest.mark.usefixtures("single_thread")

CLASSES = ("a", "b", "c")


# --- a known prior (Saerens et al. 2002) ---------------------------------------------------------------


def gaussian_posteriors(x: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Exact posteriors of three unit-variance Gaussian classes at means -2, 0, 2 under ``prior``."""
    likelihood = np.exp(-0.5 * (x[:, None] - np.array([-2.0, 0.0, 2.0])[None, :]) ** 2)
    joint = likelihood * prior[None, :]
    return joint / joint.sum(1, keepdims=True)


def test_the_training_prior_changes_nothing() -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), 200)
    train = np.array([0.2, 0.5, 0.3])
    given = parse_prior("a=0.2,b=0.5,c=0.3", CLASSES, train)
    np.testing.assert_allclose(reweight(probs, train, given), probs, rtol=0, atol=1e-12)


def test_a_shifted_prior_recovers_the_bayes_decision() -> None:
    rng = np.random.default_rng(1)
    train, clinic = np.array([0.6, 0.3, 0.1]), np.array([0.1, 0.3, 0.6])
    y = rng.choice(3, 5000, p=clinic)
    x = rng.normal(np.array([-2.0, 0.0, 2.0])[y], 1.0)
    run_probs = gaussian_posteriors(x, train)  # a perfectly calibrated run of the training prevalence
    adjusted = reweight(run_probs, train, parse_prior("a=0.1,b=0.3,c=0.6", CLASSES, train))
    bayes = gaussian_posteriors(x, clinic)
    np.testing.assert_allclose(adjusted, bayes, atol=1e-12)
    assert (adjusted.argmax(1) == y).mean() > (run_probs.argmax(1) == y).mean() + 0.05
    # the balanced decision (arg-max of p / prior) is the same under either prevalence
    np.testing.assert_array_equal((run_probs / train).argmax(1), (adjusted / clinic).argmax(1))
    estimate, _ = estimate_prior(run_probs, train)  # only the prevalence changed: EM finds it
    np.testing.assert_allclose(estimate, clinic, atol=0.03)


def test_classes_left_out_keep_their_training_proportions() -> None:
    train = np.array([0.2, 0.5, 0.3])
    np.testing.assert_allclose(parse_prior("a=0.6", CLASSES, train), [0.6, 0.25, 0.15])


def test_a_prior_file_csv_or_toml(tmp_path: Path) -> None:
    train = np.array([0.2, 0.5, 0.3])
    (tmp_path / "p.csv").write_text("class,prevalence\na,0.1\nb,0.3\nc,0.6\n")
    (tmp_path / "p.toml").write_text("[prior]\na = 0.1\nb = 0.3\nc = 0.6\n")
    for name in ("p.csv", "p.toml"):
        np.testing.assert_allclose(parse_prior(str(tmp_path / name), CLASSES, train), [0.1, 0.3, 0.6])


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("z=0.1", "unknown class 'z'"),
        ("a=-0.1", "prevalence of 'a' must be a number from 0 to 1"),
        ("a=x", "prevalence of 'a' must be a number"),
        ("a=0.7,b=0.6", "sum to 1.3, more than 1"),
        ("a=0.2,b=0.2,c=0.2", "sum to 0.6, not 1"),
        ("mel", "expected a file or class=value"),
        ("missing.csv", "no such file"),
    ],
)
def test_a_bad_prior_is_one_line_naming_the_option(spec: str, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_prior(spec, CLASSES, np.array([0.2, 0.5, 0.3]))
    message = str(caught.value)
    assert message.startswith("--prior") and needle in message and "\n" not in message


def test_a_prior_summing_nearly_to_one_is_normalised_with_a_note() -> None:
    with pytest.warns(UserWarning, match="normalised"):
        prior = parse_prior("a=0.2,b=0.5,c=0.305", CLASSES, np.array([0.2, 0.5, 0.3]))
    assert prior.sum() == pytest.approx(1.0)


# --- the alarm's statistics ---------------------------------------------------------------------------


def test_conformal_p_values_of_exchangeable_scores_are_valid() -> None:
    rng = np.random.default_rng(2)
    calibration, new = rng.normal(size=500), rng.normal(size=4000)
    p = conformal_p_values(calibration, new)
    for level in (0.01, 0.05, 0.1):
        assert (p <= level).mean() <= level + 0.015
    assert conformal_p_values(calibration, [10.0])[0] == pytest.approx(1 / 501)


def test_the_reference_flags_shifted_embeddings_and_not_its_own() -> None:
    rng = np.random.default_rng(3)
    centre = rng.normal(size=16)
    same = lambda n: centre + rng.normal(size=(n, 16))
    reference = ShiftReference.fit(same(600), same(1000), same(300))
    shifted = -centre + rng.normal(size=(200, 16))  # the other side of the origin: other directions
    own = reference.p_values(reference.scores(same(1000)))
    moved = reference.p_values(reference.scores(shifted))
    assert (own <= 0.05).mean() < 0.08 and (moved <= 0.05).mean() > 0.9
    assert mmd_test(same(200), reference.val)["p_value"] > 0.01
    assert mmd_test(shifted, reference.val)["p_value"] < 0.01


# --- empty prediction sets ------------------------------------------------------------------------------


def test_empty_sets_are_counted_and_worded() -> None:
    rng = np.random.default_rng(4)
    y_val = rng.integers(0, 3, 300)
    confident = np.full((300, 3), 0.01)
    confident[np.arange(300), y_val] = 0.98
    conformal = ConformalSets("lac", (0.90,), True).fit(confident, y_val)
    diffuse = np.full((10, 3), 1 / 3)  # no class conforms to the confident calibration: empty sets
    probs = np.concatenate([confident[:20], diffuse])
    sets = conformal.predict(probs)
    counts = empty_set_counts(sets, (0.90,), flagged=np.arange(30) >= 20)
    assert counts["meaning"] == EMPTY_SET_MEANING == "no class is plausible at this level: refer"
    assert counts["0.90"]["n_empty"] == 10 and counts["0.90"]["empty_flagged"] == 1.0
    assert counts["0.90"]["empty_not_flagged"] == 0.0
    columns = set_columns(sets, CLASSES, (0.90,))
    assert columns["empty_set_0.90"].sum() == 10 and (columns["set_0.90"][20:] == "").all()
    assert set_metrics(sets, np.r_[y_val[:20], np.zeros(10, int)], CLASSES, (0.90,))["0.90"]["n_empty"] == 10


def test_a_prediction_says_what_its_empty_set_means() -> None:
    from multimodal_lesion.api.results import Prediction

    shift = {"shift_score": 0.9, "shift_p": 0.004, "out_of_distribution": True, "level": 0.01}
    prediction = Prediction(
        "x.jpg", {"nv": 0.6, "mel": 0.4}, "nv", None, None, {"0.90": [], "0.95": ["nv"]}, None, shift
    )
    out = prediction.to_json()
    assert out["empty_sets"] == {"0.90": EMPTY_SET_MEANING} and out["shift"]["out_of_distribution"] is True
    assert "0.90: {} (refer)" in repr(prediction)


def test_a_case_page_says_out_of_distribution_and_refer(tmp_path: Path) -> None:
    from html.parser import HTMLParser

    from multimodal_lesion.explain.results import CaseExplanation, CohortExplanation
    from multimodal_lesion.report.html import ReportFigures, case_page_name, write_report

    case = CaseExplanation(
        image_id="ISIC_1",
        target_class="nv",
        probabilities={"nv": 0.6, "mel": 0.4},
        prediction_sets={"0.90": [], "0.95": ["nv"]},
        shift={"shift_score": 0.9, "shift_p": 0.004, "out_of_distribution": True, "level": 0.01},
    )
    write_report(tmp_path, CohortExplanation("Shifted", {}, [case]), ReportFigures())

    class Text(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.chunks: list[str] = []

        def handle_data(self, data: str) -> None:
            self.chunks.append(data)

    parser = Text()
    parser.feed((tmp_path / "cases" / case_page_name("ISIC_1")).read_text())
    text = " ".join(" ".join(parser.chunks).split())
    assert f"(empty: {EMPTY_SET_MEANING})" in text
    assert "No: out of distribution (shift p = 0.004 ≤ 0.01)" in text


# --- a tiny run, a copy of its data and a recoloured copy ----------------------------------------------------


@pytest.fixture(scope="module")
def run(
    tmp_path_factory: pytest.TempPathFactory, tiny_run_settings: list[str], tiny_ham_factory: Callable[..., Path]
) -> tuple[Path, Path]:
    """(a finished tiny frozen concat run on ~160 images, its data root)."""
    os.environ["MMLESION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    root = tiny_ham_factory(tmp_path_factory.mktemp("data") / "dataset", n_lesions=120)
    out = tmp_path_factory.mktemp("runs") / "concat"
    train_run(load_config(None, [*tiny_run_settings, f'data.root="{root}"']), out, show=False)
    return out, root


def write_sources(source: Path, dest: Path, recolour: bool, first: int = 9_000_000) -> Path:
    """The run's images under new ids and a ``dataset`` column of two sources; ``recolour`` tints the second."""
    df = pd.read_csv(source / METADATA_FILE)
    df["dataset"] = np.where(np.arange(len(df)) % 2 == 0, "clinic_a", "clinic_b")
    (dest / "images").mkdir(parents=True)
    tint = np.array([1.5, 0.8, 0.4])
    for k, old in enumerate(df.image_id):
        with Image.open(next(source.rglob(f"{old}.jpg"))) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
        if recolour and df.dataset[k] == "clinic_b":
            pixels = np.clip(pixels * tint + 30, 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(dest / "images" / f"ISIC_{first + k:07d}.jpg", quality=90)
    df["image_id"] = [f"ISIC_{first + k:07d}" for k in range(len(df))]
    df["lesion_id"] = df.lesion_id.str.replace("HAM_", "HAM_9", regex=False)
    df.to_csv(dest / METADATA_FILE, index=False)
    (dest / "schema.toml").write_text('[dataset]\nextends = "ham10000"\nname = "clinics"\nsource_column = "dataset"\n')
    return dest


@pytest.fixture(scope="module")
def recoloured(run: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sources(run[1], tmp_path_factory.mktemp("other") / "recoloured", recolour=True)


def test_the_alarm_stays_quiet_on_the_run_s_own_held_out_images(run: tuple[Path, Path]) -> None:
    folder, _ = run
    reference = shift_reference(folder)
    assert reference is not None and (folder / REFERENCE_FILE).is_file()
    own = reference.p_values(reference.test_scores)
    assert (own <= 0.2).mean() <= 0.35  # ~40 test images against ~40 validation images: the level, give or take
    from multimodal_lesion.runs.shift import split_embeddings

    test, val = split_embeddings(folder, ("test", "val"))
    assert mmd_test(test, val)["p_value"] > 0.01


@pytest.mark.slow
def test_external_evaluation_flags_the_recoloured_source_and_shows_it(
    run: tuple[Path, Path], recoloured: Path, chromium_page
) -> None:
    import multimodal_lesion as mml

    folder, _ = run
    splits = pd.read_csv(folder / "splits.csv")
    train = splits[splits.split == "train"].dx.value_counts(normalize=True)
    prior = ",".join(f"{c}={train.get(c, 0.0)}" for c in mml.load_run(folder).classes)
    evaluation = mml.load_run(folder).evaluate(
        recoloured, schema=str(recoloured / "schema.toml"), prior=prior, estimate_prior=True, shift_level=0.05
    )
    metrics = json.loads(evaluation.path.read_text())
    predictions = pd.read_csv(evaluation.path.parent / "predictions.csv")
    tinted = predictions.image_id.str[-7:].astype(int) % 2 == 1
    auroc = roc_auc_score(tinted, predictions.shift_score)
    assert auroc > 0.9, auroc
    assert predictions.out_of_distribution[~tinted].mean() <= 0.15, predictions.out_of_distribution[~tinted].mean()
    by_source = {r["source"]: r for r in metrics["by_source"]}
    assert by_source["clinic_b"]["flagged"] > by_source["clinic_a"]["flagged"] + 0.5, by_source
    assert metrics["shift"]["dataset_test"]["p_value"] < 0.01
    assert metrics["estimated_prior"]["warning"] and "shift alarm fires" in metrics["estimated_prior"]["warning"]
    # the run's own training prior changes nothing
    p = predictions[[c for c in predictions if c.startswith("p_")]].to_numpy()
    np.testing.assert_allclose(
        predictions[[f"prior_{c}" for c in predictions if c.startswith("p_")]], p, rtol=0, atol=1e-12
    )
    page = chromium_page.page
    chromium_page.open(evaluation.path.parent / "report.html")
    assert chromium_page.errors == [] and chromium_page.requests[1:] == []
    n_classes = len(mml.load_run(folder).classes)
    assert page.locator("#prevalence-table tbody tr").count() == n_classes
    assert page.locator("#confusion-table tbody tr").count() == n_classes
    assert page.locator("#figure-reliability img").evaluate("img => img.naturalWidth") > 0
    assert page.locator("#empty-meaning").inner_text() == EMPTY_SET_MEANING
    assert "not like the run's" in page.locator("#shift-verdict").inner_text()
    assert page.locator("#source-table tbody tr").count() == 2
    assert page.locator("#prior .prior-effect tbody tr").count() == 4
    assert page.locator("#estimated-prior .prior-warning").count() == 1
