"""Encode the patient features (age, sex, localization) as a fixed-width float vector.

Only the columns in :data:`PATIENT_FEATURES` are ever read: ``dx`` and ``dx_type`` (which gives the
label away) cannot leak into a model through this encoder.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from ..errors import DataError, Note
from .constants import PATIENT_FEATURES, UNKNOWN

#: The one-hot encoded columns, in output order.
CATEGORICAL: tuple[str, ...] = ("sex", "localization")


class MetadataEncoder(TransformerMixin, BaseEstimator):
    """Standardised age + missing flag, and one-hot sex and localization with an explicit unknown.

    Output columns: ``age_z``, ``age_missing``, ``sex=<c>`` for each sex seen in :meth:`fit` then
    ``sex=unknown``, ``localization=<c>`` likewise then ``localization=unknown``. A missing age
    encodes as ``age_z = 0`` (the training mean) with ``age_missing = 1``; a category not seen in
    ``fit`` encodes as unknown, with a warning naming it. Fit it on the training split only.

    Attributes:
        age_mean_, age_std_: training statistics of the known ages.
        categories_: column -> categories seen in ``fit`` (sorted), ``"unknown"`` always last.
        feature_groups_: patient feature -> output column indices (for grouped SHAP).
    """

    def fit(self, X: pd.DataFrame, y: object = None) -> MetadataEncoder:
        """Learn age mean/std and the categories from ``X`` (a DataFrame with age, sex, localization)."""
        age, cats = _patient_columns(X)
        known = age[~np.isnan(age)]
        self.age_mean_ = float(known.mean()) if known.size else 0.0
        std = float(known.std()) if known.size else 0.0
        self.age_std_ = std if std > 0 else 1.0
        self.categories_ = {c: [*sorted(set(v) - {UNKNOWN}), UNKNOWN] for c, v in cats.items()}
        self.feature_groups_ = _groups(self.categories_)
        return self

    def transform(self, X: pd.DataFrame) -> np.ndarray:
        """Encode ``X`` as float32 ``(len(X), len(get_feature_names_out()))``; unseen categories warn."""
        check_is_fitted(self, "categories_")
        age, cats = _patient_columns(X)
        missing = np.isnan(age)
        age_z = np.where(missing, 0.0, (np.nan_to_num(age) - self.age_mean_) / self.age_std_)
        blocks = [age_z[:, None], missing[:, None].astype(float)]
        blocks += [self._one_hot(column, values) for column, values in cats.items()]
        return np.hstack(blocks).astype(np.float32)

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        """Names of the output columns, e.g. ``age_z``, ``sex=male``, ``localization=unknown``."""
        check_is_fitted(self, "categories_")
        names = ["age_z", "age_missing"]
        names += [f"{column}={c}" for column, cats in self.categories_.items() for c in cats]
        return np.asarray(names, dtype=object)

    def missing_row(self) -> np.ndarray:
        """The encoding of a patient with every feature missing: age at the mean + flag, every category unknown."""
        check_is_fitted(self, "categories_")
        row = np.zeros(len(self.get_feature_names_out()), dtype=np.float32)
        row[1] = 1.0  # age_missing
        start = 2
        for cats in self.categories_.values():
            row[start + cats.index(UNKNOWN)] = 1.0
            start += len(cats)
        return row

    def blank(self, meta: np.ndarray, features: Sequence[str]) -> np.ndarray:
        """A copy of encoded rows ``meta`` with the patient ``features`` (e.g. ``["age"]``) read as missing."""
        check_is_fitted(self, "categories_")
        unknown = [f for f in features if f not in self.feature_groups_]
        if unknown:
            raise DataError(f"MetadataEncoder: unknown patient feature(s) {', '.join(map(repr, unknown))}")
        out = np.array(meta, dtype=np.float32, copy=True)
        missing = self.missing_row()
        for feature in features:
            columns = self.feature_groups_[feature]
            out[:, columns] = missing[columns]
        return out

    def to_json(self) -> dict[str, Any]:
        """Parameters and learned attributes as plain JSON (a run folder's ``encoder.json``; no pickle)."""
        check_is_fitted(self, "categories_")
        learned = {k: v for k, v in vars(self).items() if k.endswith("_") and not k.startswith("_")}
        return {"params": self.get_params(), "learned": learned}

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> MetadataEncoder:
        """Rebuild a fitted encoder from :meth:`to_json`'s output; a malformed state is a DataError."""
        try:
            encoder = cls(**state["params"])
            for key in ("age_mean_", "age_std_", "categories_", "feature_groups_"):
                setattr(encoder, key, state["learned"][key])
        except (KeyError, TypeError) as exc:
            raise DataError(f"not a saved MetadataEncoder (missing or bad {exc})") from None
        return encoder

    def _one_hot(self, column: str, values: np.ndarray) -> np.ndarray:
        """One-hot ``values`` over the fitted categories; values not seen in fit become unknown."""
        cats = self.categories_[column]
        index = {c: i for i, c in enumerate(cats)}
        unseen = sorted(set(values) - index.keys())
        if unseen:
            shown = ", ".join(repr(v) for v in unseen[:5]) + (", ..." if len(unseen) > 5 else "")
            warnings.warn(
                f"MetadataEncoder: column '{column}': value(s) {shown} not seen in fit; encoded as '{UNKNOWN}'",
                Note,
                stacklevel=3,
            )
        codes = np.fromiter((index.get(v, index[UNKNOWN]) for v in values), dtype=np.int64, count=len(values))
        return np.eye(len(cats))[codes]


def _patient_columns(X: pd.DataFrame) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Read only the patient columns: ages as float (NaN = missing), categories normalised to str."""
    if not isinstance(X, pd.DataFrame):
        raise DataError(
            f"MetadataEncoder expects a pandas DataFrame with columns {', '.join(PATIENT_FEATURES)}, "
            f"got {type(X).__name__}"
        )
    absent = [c for c in PATIENT_FEATURES if c not in X.columns]
    if absent:
        raise DataError(f"MetadataEncoder: missing column(s) {', '.join(map(repr, absent))}")
    if len(X) == 0:
        raise DataError("MetadataEncoder: empty table (no rows)")
    return _ages(X["age"]), {c: _categories(X[c]) for c in CATEGORICAL}


def _ages(column: pd.Series) -> np.ndarray:
    """Ages as float64 with NaN for missing; text or infinite ages are refused by row label."""
    blank = column.isna() | column.astype(str).str.strip().isin({"", "nan", "NaN", "None"})
    ages = pd.to_numeric(column.where(~blank, None), errors="coerce").astype(float).to_numpy()
    bad = ~blank.to_numpy() & ~np.isfinite(ages)
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"MetadataEncoder: row {column.index[pos]!r}, column 'age': {column.iloc[pos]!r} is not a finite number"
        )
    return ages


def _categories(column: pd.Series) -> np.ndarray:
    """Strip and lower-case; missing or empty values mean unknown."""
    text = column.astype(object).where(column.notna(), "").astype(str).str.strip().str.lower()
    return text.replace("", UNKNOWN).to_numpy(dtype=object)


def _groups(categories: dict[str, list[str]]) -> dict[str, list[int]]:
    """Output column indices of each patient feature: age first, then each categorical block."""
    groups = {"age": [0, 1]}
    start = 2
    for column, cats in categories.items():
        groups[column] = list(range(start, start + len(cats)))
        start += len(cats)
    return groups
