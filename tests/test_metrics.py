"""Metrics against scikit-learn computed directly, hand-checkable cases, edge cases; evaluation figures."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import sklearn.metrics as skm
from PIL import Image

from multimodal_lesion.data.constants import CLASSES
from multimodal_lesion.report.figures import plot_confusion, plot_reliability, plot_roc
from multimodal_lesion.training.metrics import (
    classification_metrics,
    expected_calibration_error,
    reliability_curve,
)

MEL = CLASSES.index("mel")
SENS_KEY = "melanoma_sensitivity_at_specificity_0.80"


def _predictions(n: int = 600, seed: int = 0, skill: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced targets and informative but imperfect softmax probabilities."""
    rng = np.random.default_rng(seed)
    y = rng.choice(len(CLASSES), size=n, p=[0.05, 0.08, 0.12, 0.03, 0.12, 0.55, 0.05])
    logits = rng.normal(size=(n, len(CLASSES)))
    logits[np.arange(n), y] += skill
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


def _is_png(path: Path) -> bool:
    """True when the file starts with the PNG signature and decodes as a non-blank image."""
    if path.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("L"))
    return pixels.std() > 0


def test_headline_metrics_match_sklearn() -> None:
    y, p = _predictions()
    m = classification_metrics(y, p)
    pred = p.argmax(1)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["macro_auroc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr", average="macro"))
    assert m["melanoma_auroc"] == pytest.approx(skm.roc_auc_score(y == MEL, p[:, MEL]))
    assert m["nll"] == pytest.approx(skm.log_loss(y, p))
    assert m["confusion_matrix"] == skm.confusion_matrix(y, pred).tolist()
    assert m["n_images"] == m["n_lesions"] == len(y)
    assert 0.3 < m["balanced_accuracy"] < 0.95  # the fixture is informative, not perfect


def test_brier_is_the_multiclass_sum_of_squares() -> None:
    y, p = _predictions(seed=1)
    onehot = np.zeros_like(p)
    for i, k in enumerate(y):
        onehot[i, k] = 1.0
    expected = sum(((p[i] - onehot[i]) ** 2).sum() for i in range(len(y))) / len(y)
    assert classification_metrics(y, p)["brier"] == pytest.approx(expected)
    if "scale_by_half" in inspect.signature(skm.brier_score_loss).parameters:  # sklearn >= 1.7
        sk = skm.brier_score_loss(y, p, labels=range(len(CLASSES)), scale_by_half=False)
        assert classification_metrics(y, p)["brier"] == pytest.approx(sk)


def test_per_class_sensitivity_specificity_support() -> None:
    y, p = _predictions(seed=2)
    m = classification_metrics(y, p)
    pred = p.argmax(1)
    recalls = skm.recall_score(y, pred, average=None, labels=range(len(CLASSES)))
    for k, cls in enumerate(CLASSES):
        row = m["per_class"][cls]
        negatives = y != k
        assert row["sensitivity"] == pytest.approx(recalls[k])
        assert row["specificity"] == pytest.approx(np.mean(pred[negatives] != k))
        assert row["auroc"] == pytest.approx(skm.roc_auc_score(y == k, p[:, k]))
        assert row["support"] == int(np.sum(y == k))


def test_melanoma_sensitivity_at_specificity_by_brute_force() -> None:
    y, p = _predictions(seed=3, skill=1.0)
    score, positive = p[:, MEL], y == MEL
    best = 0.0
    for t in np.unique(score):  # every threshold, predicted positive when score >= t
        called = score >= t
        if np.mean(~called[~positive]) >= 0.80:
            best = max(best, np.mean(called[positive]))
    assert classification_metrics(y, p)[SENS_KEY] == pytest.approx(best)
    assert 0 < best < 1


def test_hand_checkable_sensitivity_at_specificity() -> None:
    # 5 negatives, 4 positives. Threshold 0.7 calls 1 negative (spec 0.8) and 3 positives (sens 0.75).
    y_mel = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    mel_prob = np.array([0.1, 0.2, 0.3, 0.5, 0.8, 0.4, 0.7, 0.9, 0.95])
    probs = np.zeros((9, len(CLASSES)))
    probs[:, MEL] = mel_prob
    probs[:, CLASSES.index("nv")] = 1 - mel_prob
    y = np.where(y_mel == 1, MEL, CLASSES.index("nv"))
    assert classification_metrics(y, probs)[SENS_KEY] == pytest.approx(0.75)


def test_ece_on_hand_checkable_cases() -> None:
    # Bin (0.533, 0.6]: 4 images at confidence 0.6, all right -> gap 0.4.
    # Bin (0.933, 1.0]: 4 images at confidence 0.95, 2 right -> gap 0.45.  ECE = (4*0.4 + 4*0.45) / 8.
    probs = np.array([[0.6, 0.4]] * 4 + [[0.95, 0.05]] * 4)
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    assert expected_calibration_error(y, probs) == pytest.approx(0.425)
    # 10 images all at confidence 0.9, 8 right -> ECE 0.1, whatever the bin count.
    probs = np.array([[0.9, 0.1]] * 10)
    y = np.array([0] * 8 + [1] * 2)
    for bins in (1, 10, 15):
        assert expected_calibration_error(y, probs, bins=bins) == pytest.approx(0.1)


def test_ece_matches_a_per_sample_loop() -> None:
    y, p = _predictions(seed=4)
    conf, correct = p.max(1), p.argmax(1) == y
    total = 0.0
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - conf[inside].mean())
    assert classification_metrics(y, p)["ece"] == pytest.approx(total / len(y))


def test_reliability_curve_accounts_for_every_image() -> None:
    y, p = _predictions(seed=5)
    curve = reliability_curve(y, p, bins=15)
    assert curve.counts.sum() == len(y) and len(curve.centers) == 15
    filled = curve.counts > 0
    assert np.all((curve.confidences[filled] >= 0) & (curve.confidences[filled] <= 1))
    assert np.all(np.isnan(curve.accuracies[~filled]))
    assert curve.centers[0] == pytest.approx(1 / 30) and curve.centers[-1] == pytest.approx(1 - 1 / 30)


def test_perfect_predictions() -> None:
    y = np.repeat(np.arange(len(CLASSES)), 5)
    probs = np.eye(len(CLASSES))[y]
    m = classification_metrics(y, probs)
    assert m["accuracy"] == m["balanced_accuracy"] == m["macro_f1"] == 1.0
    assert m["macro_auroc"] == m["melanoma_auroc"] == m[SENS_KEY] == 1.0
    assert m["ece"] == pytest.approx(0.0) and m["brier"] == pytest.approx(0.0)
    assert m["nll"] == pytest.approx(0.0, abs=1e-6)
    assert m["confusion_matrix"] == np.diag([5] * len(CLASSES)).tolist()


def test_absent_class_is_nan_and_left_out_of_macro() -> None:
    y, p = _predictions(seed=6)
    df = CLASSES.index("df")
    keep = y != df
    y, p = y[keep], p[keep]
    m = classification_metrics(y, p)
    row = m["per_class"]["df"]
    assert row["support"] == 0 and math.isnan(row["auroc"]) and math.isnan(row["sensitivity"])
    assert not math.isnan(row["specificity"])
    present = [k for k in range(len(CLASSES)) if k != df]
    expected = np.mean([skm.roc_auc_score(y == k, p[:, k]) for k in present])
    assert m["macro_auroc"] == pytest.approx(expected)
    pred = p.argmax(1)
    assert m["balanced_accuracy"] == pytest.approx(np.mean([np.mean(pred[y == k] == k) for k in present]))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, labels=present, average="macro"))
    assert len(m["confusion_matrix"]) == len(CLASSES)


def test_result_is_json_ready_and_counts_lesions() -> None:
    y, p = _predictions(n=40, seed=7)
    lesions = [f"HAM_{i // 2:07d}" for i in range(40)]
    m = classification_metrics(y, p.astype(np.float32), lesion_ids=lesions)
    assert m["n_images"] == 40 and m["n_lesions"] == 20
    assert json.loads(json.dumps(m)).keys() == m.keys()
    scalars = [v for v in m.values() if not isinstance(v, (dict, list))]
    assert all(type(v) in (int, float) for v in scalars)
    assert all(type(v) in (int, float) for row in m["per_class"].values() for v in row.values())


@pytest.mark.parametrize("bad", ["logits", "shape", "labels"])
def test_invalid_input_is_refused(bad: str) -> None:
    y, p = _predictions(n=20)
    if bad == "logits":
        p = np.log(p)
    elif bad == "shape":
        p = p[:, :5]
    else:
        y = y + len(CLASSES)
    with pytest.raises(ValueError):
        classification_metrics(y, p)


def test_evaluation_figures_are_valid_pngs(tmp_path: Path) -> None:
    y, p = _predictions(seed=8)
    y = np.where(y == CLASSES.index("df"), CLASSES.index("nv"), y)  # one class absent: still plots
    cm = classification_metrics(y, p)["confusion_matrix"]
    paths = [
        plot_confusion(cm, CLASSES, tmp_path / "confusion.png"),
        plot_confusion(cm, CLASSES, tmp_path / "confusion_counts.png", normalize=False),
        plot_roc(y, p, CLASSES, tmp_path / "roc.png"),
        plot_reliability(y, p, tmp_path / "sub" / "reliability.png"),
    ]
    for path in paths:
        assert path.exists() and _is_png(path)
    leftovers = [f.name for f in tmp_path.rglob("*") if f.is_file() and f.suffix != ".png"]
    assert leftovers == []  # no temp files left behind
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []  # nothing left open in pyplot


def test_confusion_plot_rejects_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="7x7"):
        plot_confusion(np.ones((3, 3)), CLASSES, tmp_path / "cm.png")


def test_binary_task_metrics_by_hand() -> None:
    """Two classes (other, mel): AUROC, sensitivity / specificity / balanced accuracy of the arg-max, by hand."""
    from multimodal_lesion.training.metrics import key_vs_rest

    y = np.array([1, 1, 1, 0, 0, 0, 0, 0])
    p_mel = np.array([0.9, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.05])
    probs = np.stack([1 - p_mel, p_mel], axis=1)
    m = classification_metrics(y, probs, classes=("other", "mel"), key_class="mel")
    # pairs (positive, negative) ranked right: 0.9 beats all 5, 0.6 beats 4, 0.3 beats 3 -> 12 of 15
    assert m["binary"]["auroc"] == m["key_auroc"] == m["melanoma_auroc"] == pytest.approx(12 / 15)
    assert m["binary"]["sensitivity"] == pytest.approx(2 / 3)  # 0.9 and 0.6 are above 0.5
    assert m["binary"]["specificity"] == pytest.approx(4 / 5)  # 0.7 is the one false positive
    assert m["binary"]["balanced_accuracy"] == m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    # specificity >= 0.8 allows one false positive (threshold 0.6 or higher): 2 of 3 melanomas found
    assert m["binary"]["sensitivity_at_specificity_0.80"] == m["key_sensitivity_at_specificity_0.80"] == 2 / 3
    assert m["binary"]["n_key"] == 3 and m["binary"]["n_rest"] == 5
    # a multi-class prediction scored as melanoma vs rest: the rest's probability is the others' sum
    y7, p7 = _predictions(seed=4)
    y_bin, p_bin = key_vs_rest(y7, p7, MEL)
    assert y_bin.tolist() == (y7 == MEL).astype(int).tolist()
    np.testing.assert_allclose(p_bin[:, 1], p7[:, MEL])
    np.testing.assert_allclose(p_bin.sum(1), 1)
    binary = classification_metrics(y_bin, p_bin, classes=("rest", "mel"), key_class="mel")
    assert binary["key_auroc"] == pytest.approx(classification_metrics(y7, p7)["melanoma_auroc"])
    with pytest.raises(ValueError, match="key class 'scc'"):
        classification_metrics(y, probs, classes=("other", "mel"), key_class="scc")
