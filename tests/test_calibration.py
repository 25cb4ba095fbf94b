"""Temperature scaling recovers a known over-confidence factor and improves calibration, not accuracy."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn.exceptions import NotFittedError
from sklearn.metrics import log_loss

from multimodal_lesion.training.calibration import TemperatureScaler
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
