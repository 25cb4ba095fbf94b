"""Encode a schema's patient features as a fixed-width float vector.

Only the features the encoder was built with are ever read (a schema's ``features``; HAM10000's age,
sex and localization by default): the label and the leak columns (``dx_type``, ``biopsed``...) cannot
reach a model through this encoder.
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
from .constants import UNKNOWN
from .schema import Features

#: HAM10000's features: the encoder's defaults (and what an ``encoder.json`` without parameters means).
HAM_NUMERIC: tuple[str, ...] = ("age",)
CATEGORICAL: tuple[str, ...] = ("sex", "localization")
#: The one-hot block of a boolean feature, in output order.
BOOLEAN_VALUES: list[str] = ["false", "true", UNKNOWN]


class MetadataEncoder(TransformerMixin, BaseEstimator):
    """Numeric features standardised + a missing flag; categorical and boolean features one-hot with an
    explicit unknown.

    Output columns, in order: for each numeric feature ``<f>_z`` and ``<f>_missing``; for each
    categorical feature ``<f>=<c>`` for each value seen in :meth:`fit` then ``<f>=unknown``; for each
    boolean feature ``<f>=false``, ``<f>=true``, ``<f>=unknown``. A missing number encodes as ``z = 0``
    (the training mean) with the flag set; a category not seen in ``fit`` encodes as unknown, with a
    warning naming it. Fit it on the training split only. The defaults are HAM10000's features
    (``age_z, age_missing, sex=..., localization=...``).

    Attributes:
        means_, stds_: numeric feature -> training mean / standard deviation of its known values.
        categories_: categorical or boolean feature -> its one-hot values (``"unknown"`` always last).
        feature_groups_: feature -> output column indices (grouped SHAP, metadata dropout, blanking).
    """

    def __init__(
        self,
        numeric: Sequence[str] = HAM_NUMERIC,
        categorical: Sequence[str] = CATEGORICAL,
        boolean: Sequence[str] = (),
    ) -> None:
        self.numeric = numeric
        self.categorical = categorical
        self.boolean = boolean

    @classmethod
    def for_features(cls, features: Features) -> MetadataEncoder:
        """An unfitted encoder of a schema's features."""
        return cls(numeric=features.numeric, categorical=features.categorical, boolean=features.boolean)

    @property
    def features(self) -> list[str]:
        """Every feature read, in output order."""
        return [*self.numeric, *self.categorical, *self.boolean]

    @property
    def age_mean_(self) -> float:
        """Training mean of the first numeric feature (HAM10000's age)."""
        return self.means_[self.numeric[0]]

    @property
    def age_std_(self) -> float:
        return self.stds_[self.numeric[0]]

    def fit(self, X: pd.DataFrame, y: object = None) -> MetadataEncoder:
        """Learn each numeric feature's mean / std and each categorical feature's values from ``X``."""
        numbers, cats = self._columns(X)
        self.means_, self.stds_ = {}, {}
        for name, values in numbers.items():
            known = values[~np.isnan(values)]
            std = float(known.std()) if known.size else 0.0
            self.means_[name] = float(known.mean()) if known.size else 0.0
            self.stds_[name] = std if std > 0 else 1.0
        self.categories_ = {c: [*sorted(set(v) - {UNKNOWN}), UNKNOWN] for c, v in cats.items()}
        self.categories_.update({c: list(BOOLEAN_VALUES) for c in self.boolean})
        self.feature_groups_ = self._groups()
        return self

    def transform(self, X: pd.DataFrame) -> np.ndarray:
        """Encode ``X`` as float32 ``(len(X), len(get_feature_names_out()))``; unseen categories warn."""
        check_is_fitted(self, "categories_")
        numbers, cats = self._columns(X)
        blocks = []
        for name, values in numbers.items():
            missing = np.isnan(values)
            z = np.where(missing, 0.0, (np.nan_to_num(values) - self.means_[name]) / self.stds_[name])
            blocks += [z[:, None], missing[:, None].astype(float)]
        blocks += [self._one_hot(column, values) for column, values in cats.items()]
        blocks += [self._one_hot(column, _booleans(X[column])) for column in self.boolean]
        return np.hstack(blocks).astype(np.float32)

    def get_feature_names_out(self, input_features: object = None) -> np.ndarray:
        """Names of the output columns, e.g. ``age_z``, ``sex=male``, ``localization=unknown``, ``itch=true``."""
        check_is_fitted(self, "categories_")
        names = [f"{n}_{part}" for n in self.numeric for part in ("z", "missing")]
        names += [f"{column}={c}" for column, cats in self.categories_.items() for c in cats]
        return np.asarray(names, dtype=object)

    def missing_row(self) -> np.ndarray:
        """The encoding of a patient with every feature missing: numbers at the mean + flag, values unknown."""
        check_is_fitted(self, "categories_")
        row = np.zeros(len(self.get_feature_names_out()), dtype=np.float32)
        for i in range(len(self.numeric)):
            row[2 * i + 1] = 1.0  # <f>_missing
        start = 2 * len(self.numeric)
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
        return {"params": {k: list(v) for k, v in self.get_params().items()}, "learned": learned}

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> MetadataEncoder:
        """Rebuild a fitted encoder from :meth:`to_json`'s output; a malformed state is a DataError.

        A state written before schemas (no parameters; ``age_mean_`` / ``age_std_``) is HAM10000's.
        """
        try:
            encoder = cls(**{k: tuple(v) for k, v in state["params"].items()})
            learned = dict(state["learned"])
            if "age_mean_" in learned:  # before schemas
                learned["means_"] = {"age": learned.pop("age_mean_")}
                learned["stds_"] = {"age": learned.pop("age_std_")}
            for key in ("means_", "stds_", "categories_", "feature_groups_"):
                setattr(encoder, key, learned[key])
        except (KeyError, TypeError) as exc:
            raise DataError(f"not a saved MetadataEncoder (missing or bad {exc})") from None
        return encoder

    def _columns(self, X: pd.DataFrame) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Read only the feature columns: numbers as float (NaN = missing), categories normalised to str."""
        if not isinstance(X, pd.DataFrame):
            raise DataError(
                f"MetadataEncoder expects a pandas DataFrame with columns {', '.join(self.features)}, "
                f"got {type(X).__name__}"
            )
        absent = [c for c in self.features if c not in X.columns]
        if absent:
            raise DataError(f"MetadataEncoder: missing column(s) {', '.join(map(repr, absent))}")
        if len(X) == 0:
            raise DataError("MetadataEncoder: empty table (no rows)")
        return {n: _numbers(X[n]) for n in self.numeric}, {c: _categories(X[c]) for c in self.categorical}

    def _groups(self) -> dict[str, list[int]]:
        """Output column indices of each feature: numeric pairs first, then each one-hot block."""
        groups = {name: [2 * i, 2 * i + 1] for i, name in enumerate(self.numeric)}
        start = 2 * len(self.numeric)
        for column, cats in self.categories_.items():
            groups[column] = list(range(start, start + len(cats)))
            start += len(cats)
        return groups

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


def _numbers(column: pd.Series) -> np.ndarray:
    """Numbers as float64 with NaN for missing; text or infinite values are refused by row label."""
    blank = column.isna() | column.astype(str).str.strip().isin({"", "nan", "NaN", "None"})
    values = pd.to_numeric(column.where(~blank, None), errors="coerce").astype(float).to_numpy()
    bad = ~blank.to_numpy() & ~np.isfinite(values)
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"MetadataEncoder: row {column.index[pos]!r}, column '{column.name}': {column.iloc[pos]!r} is not a "
            "finite number"
        )
    return values


def _categories(column: pd.Series) -> np.ndarray:
    """Strip and lower-case; missing or empty values mean unknown."""
    text = column.astype(object).where(column.notna(), "").astype(str).str.strip().str.lower()
    return text.replace("", UNKNOWN).to_numpy(dtype=object)


def _booleans(column: pd.Series) -> np.ndarray:
    """``true`` / ``false`` (also Python booleans), anything else unknown (the reader has checked them)."""
    text = _categories(column.map(lambda v: str(v) if isinstance(v, (bool, np.bool_)) else v))
    return np.where(np.isin(text, BOOLEAN_VALUES), text, UNKNOWN).astype(object)
