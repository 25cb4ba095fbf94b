"""Post-hoc calibration fitted on the validation split only.

- :class:`TemperatureScaler` (Guo et al. 2017): one scalar divides the logits. It never changes the
  arg-max, so accuracy, balanced accuracy and the confusion matrix are untouched; only confidence
  (ECE, NLL, Brier) moves.
- :class:`BalancedScaler`: a temperature and one bias per class, fitted by *class-balanced* NLL, so
  the probabilities are those of a uniform class prior and their arg-max is the decision that
  balanced accuracy rewards. Balanced sampling and class weights aim at this during training, but a
  network that memorises its few rare-class images still under-predicts those classes on new ones;
  the biases correct that on held-out data (the prior-shift correction of Saerens et al. 2002,
  with the shift estimated rather than assumed).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import log_softmax, softmax
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from ..errors import note


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

    def fit(self, logits: Any, y: Any) -> TemperatureScaler:
        """Fit the temperature on (validation) logits (N, C) and integer targets (N,)."""
        from scipy.optimize import minimize_scalar

        low, high = self.bounds
        if not 0 < low < high:
            raise ValueError(f"bounds must satisfy 0 < low < high, got {self.bounds}")
        z = _as_logits(logits)
        y = _as_targets(y, z)
        result = minimize_scalar(
            lambda log_t: _nll(z / np.exp(log_t), y),
            method="bounded",
            bounds=(np.log(low), np.log(high)),
            options={"xatol": 1e-6},
        )
        self.temperature_ = float(np.exp(result.x))
        self.n_classes_ = z.shape[1]
        self.nll_before_ = _nll(z, y)
        self.nll_after_ = _nll(z / self.temperature_, y)
        _note_edge(self.temperature_, low, high)
        return self

    def transform(self, logits: Any) -> np.ndarray:
        """Calibrated probabilities ``softmax(logits / temperature_)``, shape (N, C), float64."""
        return softmax(_fitted_logits(self, logits, "temperature_") / self.temperature_, axis=1)


def _note_edge(temperature: float, low: float, high: float) -> None:
    """Say, in the user's terms, what a temperature stuck at a bound of its search means."""
    if np.isclose(temperature, high, rtol=1e-3):
        note(
            f"calibration: the temperature fitted on the validation split is {temperature:.3g}, the largest allowed: "
            "there the model's scores barely tell the classes apart, so its calibrated probabilities are nearly "
            "uniform (too few validation images, or a model that has not learnt yet?)"
        )
    elif np.isclose(temperature, low, rtol=1e-3):
        note(
            f"calibration: the temperature fitted on the validation split is {temperature:.3g}, the smallest "
            "allowed: the model separates the validation images almost perfectly, so its calibrated probabilities "
            "are pushed to 0 or 1 (too few validation images to calibrate?)"
        )


class BalancedScaler(TransformerMixin, BaseEstimator):
    """Learn T > 0 and class biases b minimising the class-balanced NLL of ``softmax(logits / T + b)``.

    Each class's images weigh 1 / (its count) in total, so every class counts as much as any other,
    as in balanced accuracy; a small ridge on ``b`` fixes the softmax's shift invariance and keeps
    a class absent from the fitting split at a finite bias.

    Attributes:
        temperature_, bias_: the fitted temperature and the per-class biases (mean zero).
        n_classes_: number of logit columns seen in ``fit``.
    """

    def __init__(self, ridge: float = 1e-3) -> None:
        self.ridge = ridge

    def fit(self, logits: Any, y: Any) -> BalancedScaler:
        """Fit on (validation) logits (N, C) and integer targets (N,)."""
        from scipy.optimize import minimize

        z = _as_logits(logits)
        y = _as_targets(y, z)
        n, c = z.shape
        counts = np.bincount(y, minlength=c)
        w = 1.0 / counts[y]
        w /= w.sum()
        onehot = np.eye(c)[y]

        def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            a, b = np.exp(theta[0]), theta[1:]
            logp = log_softmax(z * a + b, axis=1)
            d = w[:, None] * (np.exp(logp) - onehot)  # d loss / d (z a + b)
            loss = float(-(w * logp[np.arange(n), y]).sum() + self.ridge * b @ b)
            return loss, np.concatenate([[a * (d * z).sum()], d.sum(0) + 2 * self.ridge * b])

        result = minimize(
            loss_grad, np.zeros(c + 1), jac=True, method="L-BFGS-B", options={"maxiter": 1000, "gtol": 1e-10}
        )
        self.temperature_ = float(np.exp(-result.x[0]))
        self.bias_ = result.x[1:] - result.x[1:].mean()
        self.n_classes_ = c
        return self

    def transform(self, logits: Any) -> np.ndarray:
        """Probabilities under a uniform class prior, ``softmax(logits / temperature_ + bias_)``."""
        return softmax(_fitted_logits(self, logits, "bias_") / self.temperature_ + self.bias_, axis=1)


def _fitted_logits(scaler: BaseEstimator, logits: Any, attribute: str) -> np.ndarray:
    """``logits`` as float64 once ``scaler`` is fitted (``attribute`` set) and the class count matches."""
    check_is_fitted(scaler, attribute)
    z = _as_logits(logits)
    if z.shape[1] != scaler.n_classes_:
        raise ValueError(f"expected {scaler.n_classes_} logit columns, got {z.shape[1]}")
    return z


def _as_targets(y: Any, z: np.ndarray) -> np.ndarray:
    """Integer class indices matching the logit array ``z`` row for row."""
    y = np.asarray(_to_numpy(y)).reshape(-1).astype(np.int64)
    if len(y) != len(z) or y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"y must hold {len(z)} class indices in [0, {z.shape[1]}), got {len(y)} values")
    return y


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
