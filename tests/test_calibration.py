"""Temperature scaling recovers a known over-confidence factor and improves calibration, not accuracy;
the balanced scaler recovers a known class-prior shift and with it balanced accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn.exceptions import NotFittedError
from sklearn.metrics import balanced_accuracy_score, log_loss

from multimodal_lesion.training.calibration import BalancedScaler, TemperatureScaler
from multimodal_lesion.training.metrics import classification_metrics, expected_calibration_error


def _calibrated_logits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true label distribution: targets are sampled from it."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=(n, 7))
    probs = softmax(logits, axis=1)
    y = np.array([rng.choice(7, p=row) for row in probs])
    return logits, y


def test_recovers_overconfidence_factor_and_improves_calibration() -> None:
    logits, y = _calibrated_logits(6000, seed=0)
    over = 3.0 * logits  # deliberately over-confident
    val, test = slice(0, 3000), slice(3000, None)
    scaler = TemperatureScaler().fit(over[val], y[val])
    assert scaler.temperature_ == pytest.approx(3.0, rel=0.1)
    before, after = softmax(over[test], axis=1), scaler.transform(over[test])
    assert log_loss(y[test], after) < log_loss(y[test], before) - 0.1
    assert expected_calibration_error(y[test], after) < 0.5 * expected_calibration_error(y[test], before)
    m_before, m_after = classification_metrics(y[test], before), classification_metrics(y[test], after)
    assert m_after["accuracy"] == m_before["accuracy"]
    assert m_after["confusion_matrix"] == m_before["confusion_matrix"]
    assert scaler.nll_after_ < scaler.nll_before_


def test_temperature_minimises_validation_nll() -> None:
    logits, y = _calibrated_logits(1500, seed=1)
    logits = 0.5 * logits  # under-confident: T < 1
    scaler = TemperatureScaler().fit(logits, y)
    assert scaler.temperature_ < 1.0
    grid = np.linspace(0.2, 2.0, 181)
    best = grid[np.argmin([log_loss(y, softmax(logits / t, axis=1), labels=range(7)) for t in grid])]
    assert scaler.temperature_ == pytest.approx(best, abs=0.011)


def test_accepts_torch_tensors_and_returns_probabilities() -> None:
    logits, y = _calibrated_logits(300, seed=2)
    scaler = TemperatureScaler().fit(torch.tensor(logits, dtype=torch.float32), torch.tensor(y))
    probs = scaler.transform(torch.tensor(logits, dtype=torch.float32))
    assert probs.shape == (300, 7)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_array_equal(probs.argmax(1), logits.argmax(1))


def test_transform_before_fit_and_bad_input_are_refused() -> None:
    logits, y = _calibrated_logits(50, seed=3)
    with pytest.raises(NotFittedError):
        TemperatureScaler().transform(logits)
    scaler = TemperatureScaler().fit(logits, y)
    with pytest.raises(ValueError, match="logit columns"):
        scaler.transform(logits[:, :5])
    with pytest.raises(ValueError):
        TemperatureScaler().fit(logits, y[:10])
    with pytest.raises(ValueError):
        TemperatureScaler(bounds=(2.0, 1.0)).fit(logits, y)
    assert TemperatureScaler(bounds=(0.1, 10.0)).get_params() == {"bounds": (0.1, 10.0)}


PRIOR = np.array([0.62, 0.12, 0.11, 0.06, 0.05, 0.02, 0.02])


def _prior_shifted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits z of a model that is calibrated on data where class 0 is common and 5-6 are rare, y ~ softmax(z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, 7)) + np.log(PRIOR)
    y = (softmax(z, axis=1).cumsum(1) > rng.random((n, 1))).argmax(1)
    return z, y


def test_balanced_scaler_recovers_a_prior_shift_and_balanced_accuracy() -> None:
    """For a calibrated model, reweighting every class to the same total turns p(y|x) into
    p(y|x) / p(y) (renormalised): the fitted biases must be -log of the class frequencies (up to a
    constant), the temperature must stay 1, and test balanced accuracy must reach that of the
    exact prior correction."""
    z_val, y_val = _prior_shifted(30000, seed=0)
    z, y = _prior_shifted(30000, seed=1)
    log_freq = np.log(np.bincount(y_val, minlength=7) / len(y_val))
    scaler = BalancedScaler().fit(z_val, y_val)
    assert np.allclose(scaler.bias_, -log_freq + log_freq.mean(), atol=0.1)
    assert scaler.temperature_ == pytest.approx(1.0, abs=0.05)
    before = balanced_accuracy_score(y, z.argmax(1))
    after = balanced_accuracy_score(y, scaler.transform(z).argmax(1))
    exact = balanced_accuracy_score(y, (z - log_freq).argmax(1))
    assert after > before + 0.05
    assert after == pytest.approx(exact, abs=0.01)


def test_balanced_scaler_leaves_calibrated_balanced_logits_alone_and_survives_an_absent_class() -> None:
    logits, y = _calibrated_logits(20000, seed=3)
    counts = np.bincount(y, minlength=7)
    keep = np.concatenate([np.flatnonzero(y == c)[: counts.min()] for c in range(7)])  # balanced classes
    scaler = BalancedScaler().fit(logits[keep], y[keep])
    assert np.abs(scaler.bias_).max() < 0.2 and scaler.temperature_ == pytest.approx(1.0, abs=0.1)
    present = y != 6
    scaler = BalancedScaler().fit(logits[present], y[present])
    assert np.all(np.isfinite(scaler.bias_)) and scaler.bias_.argmin() == 6
    assert np.allclose(scaler.transform(logits).sum(1), 1.0)
    with pytest.raises(NotFittedError):
        BalancedScaler().transform(logits)
    with pytest.raises(ValueError, match="logit columns"):
        scaler.transform(logits[:, :5])
    with pytest.raises(ValueError, match="class indices"):
        BalancedScaler().fit(logits, y[:10])


@pytest.mark.parametrize(
    ("labels", "needles"),
    [
        ("random", ("is 20, the largest allowed", "barely tell the classes apart", "nearly uniform")),
        ("separated", ("is 0.05, the smallest allowed", "separates the validation images almost perfectly")),
    ],
)
def test_a_temperature_at_the_edge_is_a_note_in_the_user_s_terms(labels: str, needles: tuple[str, ...]) -> None:
    """It was a raw 'runner.py:91: UserWarning: temperature 20 is at the edge of bounds (0.05, 20.0)'."""
    from multimodal_lesion.errors import Note

    logits = np.random.default_rng(1).normal(scale=100.0, size=(300, 7))  # confident, and (random) wrong
    y = logits.argmax(axis=1) if labels == "separated" else np.random.default_rng(2).integers(0, 7, 300)
    with pytest.warns(Note) as caught:
        TemperatureScaler().fit(logits, y)
    (message,) = [str(w.message) for w in caught]
    assert message.startswith("calibration: the temperature fitted on the validation split ")
    assert all(n in message for n in needles) and "bounds" not in message
