"""Temperature scaling (Guo et al. 2017): one scalar that divides the logits to calibrate them.

Fitted on the validation split only. Dividing every logit by the same positive T never changes the
arg-max, so accuracy, balanced accuracy and the confusion matrix are untouched; only confidence
(ECE, NLL, Brier) moves.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from scipy.special import log_softmax, softmax
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted


class TemperatureScaler(TransformerMixin, BaseEstimator):
    """Learn T > 0 minimising the NLL of ``softmax(logits / T)``; ``transform`` returns probabilities.

    Args:
        bounds: search interval for T. The NLL is convex in 1/T, hence unimodal in log T, so a
            bounded scalar search over log T finds the global minimum inside the interval.

    Attributes:
        temperature_: the fitted temperature.
        n_classes_: number of logit columns seen in ``fit``.
        nll_before_, nll_after_: validation NLL at T = 1 and at the fitted T.
    """

    def __init__(self, bounds: tuple[float, float] = (0.05, 20.0)) -> None:
        self.bounds = bounds

    def fit(self, logits: Any, y: Any) -> "TemperatureScaler":
        """Fit the temperature on (validation) logits (N, C) and integer targets (N,)."""
        from scipy.optimize import minimize_scalar

        z, y = _as_logits(logits), np.asarray(_to_numpy(y)).reshape(-1).astype(np.int64)
        low, high = self.bounds
        if not 0 < low < high:
            raise ValueError(f"bounds must satisfy 0 < low < high, got {self.bounds}")
        if len(y) != len(z) or y.min() < 0 or y.max() >= z.shape[1]:
            raise ValueError(f"y must hold {len(z)} class indices in [0, {z.shape[1]}), got {len(y)} values")
        result = minimize_scalar(lambda log_t: _nll(z / np.exp(log_t), y), method="bounded",
                                 bounds=(np.log(low), np.log(high)), options={"xatol": 1e-6})
        self.temperature_ = float(np.exp(result.x))
        self.n_classes_ = z.shape[1]
        self.nll_before_ = _nll(z, y)
        self.nll_after_ = _nll(z / self.temperature_, y)
        if np.isclose(self.temperature_, low, rtol=1e-3) or np.isclose(self.temperature_, high, rtol=1e-3):
            warnings.warn(f"temperature {self.temperature_:.4g} is at the edge of bounds {self.bounds}")
        return self

    def transform(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities ``softmax(logits / temperature_)``, shape (N, C), float64."""
        check_is_fitted(self, "temperature_")
        z = _as_logits(logits)
        if z.shape[1] != self.n_classes_:
            raise ValueError(f"expected {self.n_classes_} logit columns, got {z.shape[1]}")
        return softmax(z / self.temperature_, axis=1)


def _nll(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the targets under ``softmax(logits)``, computed stably."""
    return float(-np.mean(log_softmax(logits, axis=1)[np.arange(len(y)), y]))


def _as_logits(logits: Any) -> np.ndarray:
    """A finite 2-D float64 array from a numpy array, list or torch tensor."""
    z = np.asarray(_to_numpy(logits), dtype=np.float64)
    if z.ndim != 2 or len(z) == 0 or not np.all(np.isfinite(z)):
        raise ValueError(f"logits must be a finite non-empty (N, C) array, got shape {z.shape}")
    return z


def _to_numpy(x: Any) -> Any:
    """Detach a torch tensor to numpy without importing torch; anything else passes through."""
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x
