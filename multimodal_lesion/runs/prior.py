"""A clinic's class prevalence: re-weighting a run's calibrated probabilities for it (Saerens et al. 2002).

A run's calibrated probabilities ``p(y|x)`` hold for images drawn with its training prevalence ``pi``
(the training split's class shares; the validation split that fitted the temperature is stratified
alike). Where only the prevalence changes, to ``pi'``, Bayes' rule gives

    p'(y|x) = p(y|x) pi'(y) / pi(y)  /  sum_c p(c|x) pi'(c) / pi(c).

Decisions with a known prevalence:

- ``predicted`` (the arg-max of ``p'``) becomes the Bayes decision at the clinic's prevalence: the
  most probable class there, which maximises accuracy at that prevalence.
- The balanced decision does **not** move. It is the arg-max of ``p(y|x) / pi(y)`` (the probabilities
  of a uniform prior), and ``p'(y|x) / pi'(y)`` is proportional to it: a decision scored by balanced
  accuracy weighs every class equally whatever its prevalence, so no prevalence changes it.

Estimating ``pi'`` from unlabelled images (:func:`estimate_prior`, the EM of Saerens et al.) holds only
when nothing but the prevalence changed; where the images themselves look different, it mistakes the
shift for prevalence (see :mod:`~multimodal_lesion.runs.shift`).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import tomllib

from ..errors import ConfigError, note

#: How far the prevalences of every class may sum from 1 and still be read (then normalised, with a note).
SUM_TOLERANCE = 0.01


def reweight(probs: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``p'(y|x)``: probabilities (N, C) under prior ``old`` moved to prior ``new`` (both (C,))."""
    p = np.asarray(probs, dtype=np.float64)
    weighted = p * (np.asarray(new, np.float64) / np.asarray(old, np.float64))[None, :]
    total = weighted.sum(axis=1, keepdims=True)
    return np.divide(weighted, total, out=np.full_like(weighted, 1.0 / p.shape[1]), where=total > 0)


def estimate_prior(
    probs: np.ndarray, old: np.ndarray, max_iter: int = 1000, tol: float = 1e-8
) -> tuple[np.ndarray, int]:
    """The prevalence of unlabelled images by EM (Saerens et al. 2002): (the estimate, iterations).

    Alternates re-weighting the probabilities to the current estimate and taking their mean as the
    next; assumes the images differ from the run's only in their class prevalence.
    """
    prior = np.asarray(old, dtype=np.float64)
    for step in range(1, max_iter + 1):
        new = reweight(probs, old, prior).mean(axis=0)
        if np.abs(new - prior).max() < tol:
            return new, step
        prior = new
    return prior, max_iter


def training_prior(dx: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """The class shares of the training split's labels (a class without an image gets a tiny share)."""
    counts = np.array([sum(1 for d in dx if d == c) for c in classes], dtype=np.float64)
    counts = np.maximum(counts, 0.5)  # a class the run never saw: half an image, so no division by zero
    return counts / counts.sum()


def parse_prior(spec: str, classes: Sequence[str], train: np.ndarray, option: str = "--prior") -> np.ndarray:
    """The prevalence of ``spec``: a CSV / TOML file of class, prevalence, or ``class=value,...``.

    Classes left out share what the named ones leave, in their training proportions (``mel=0.015``: the
    other classes keep their relative shares). An unknown class, a value that is not a number, a
    negative one, named ones summing above 1 or every class named with a sum off 1 by more than 1% is a
    ConfigError naming ``option``; a sum within 1% is normalised, with a note.
    """
    given = _read_spec(spec, option)
    unknown = sorted(set(given) - set(classes))
    if unknown:
        raise ConfigError(f"{option}: unknown class '{unknown[0]}' (the run's classes: {', '.join(classes)})")
    bad = {c: v for c, v in given.items() if not np.isfinite(v) or v < 0}
    if bad:
        name, value = next(iter(bad.items()))
        raise ConfigError(f"{option}: prevalence of '{name}' must be a number from 0 to 1, got {value}")
    return _completed(given, classes, np.asarray(train, np.float64), option)


def _completed(given: Mapping[str, float], classes: Sequence[str], train: np.ndarray, option: str) -> np.ndarray:
    """Every class's prevalence: the given ones, the rest in training proportions (see :func:`parse_prior`)."""
    total = sum(given.values())
    named = np.array([c in given for c in classes])
    if named.all():
        if abs(total - 1) > SUM_TOLERANCE:
            raise ConfigError(f"{option}: the prevalences of all classes sum to {total:.4g}, not 1")
        if abs(total - 1) > 1e-9:
            note(f"{option}: the prevalences sum to {total:.6g}; normalised to sum to 1")
        return np.array([given[c] for c in classes]) / total
    if total > 1 + 1e-9:
        raise ConfigError(f"{option}: the named prevalences sum to {total:.4g}, more than 1")
    prior = np.array([given.get(c, 0.0) for c in classes])
    rest = train * ~named
    prior[~named] = max(1 - total, 0.0) * rest[~named] / rest.sum()
    return prior


def _read_spec(spec: str, option: str) -> dict[str, float]:
    """``class -> value`` from a file (``.csv``: two columns class, prevalence; ``.toml``: class = value) or text."""
    text = spec.strip()
    if not text:
        raise ConfigError(f"{option}: empty (give a file or class=value,...)")
    path = Path(text).expanduser()
    if path.suffix.lower() in (".csv", ".toml") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"{option}: no such file {text}")
        return _read_toml(path, option) if path.suffix.lower() == ".toml" else _read_csv(path, option)
    pairs = [part.partition("=") for part in text.split(",") if part.strip()]
    if any(not sep or not name.strip() for name, sep, _ in pairs):
        raise ConfigError(f"{option}: expected a file or class=value,... (e.g. mel=0.015), got {spec!r}")
    return {name.strip(): _number(value, name.strip(), option) for name, _, value in pairs}


def _read_csv(path: Path, option: str) -> dict[str, float]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh) if any(cell.strip() for cell in r)]
    if rows and len(rows[0]) >= 2 and not _is_number(rows[0][1]):
        rows = rows[1:]  # a header
    if not rows or any(len(r) != 2 for r in rows):
        raise ConfigError(f"{option}: {path}: expected two columns, class and prevalence, one class a row")
    return {r[0].strip(): _number(r[1], r[0].strip(), f"{option}: {path}") for r in rows}


def _read_toml(path: Path, option: str) -> dict[str, float]:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{option}: {path}: not readable TOML ({exc})") from None
    table = raw.get("prior", raw)
    return {str(k): _number(v, str(k), f"{option}: {path}") for k, v in table.items()}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(value: object, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str) or not _is_number(str(value)):
        raise ConfigError(f"{where}: prevalence of '{name}' must be a number from 0 to 1, got {value!r}")
    return float(value)
