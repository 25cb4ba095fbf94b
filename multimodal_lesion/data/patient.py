"""The rules of the patient fields, shared by the readers and ``predict``.

One rule per field, applied wherever a value comes from: an age is a number from 0 to 120 (or
missing), and a sex or localization outside the HAM10000 vocabulary is read as ``unknown`` and
reported with :func:`~multimodal_lesion.errors.note`, never dropped or guessed. Any schema's typed
features follow the same rules: numeric (a finite number, NaN when unknown), categorical (normalised,
``unknown`` when missing), boolean (``true`` / ``false`` / ``unknown`` by the schema's spellings).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable

import numpy as np
import pandas as pd

from ..errors import DataError, note
from .constants import LOCALIZATIONS, SEXES, UNKNOWN
from .schema import Features, preset

#: Oldest plausible age; anything above is a data-entry error.
MAX_AGE = 120.0

#: Spellings of a missing age in a table cell (compared lower-cased).
MISSING_AGE = frozenset({"", "nan", "na", "n/a", "none", "null", "unknown"})

#: The values each categorical patient field may take, besides ``unknown``.
VOCABULARY: dict[str, tuple[str, ...]] = {"sex": SEXES, "localization": LOCALIZATIONS}

#: A plain decimal number (no '_', hex, 'inf' or 'nan', which Python's float() would take).
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def parse_age(value: object, field: str = "age", *, missing_ok: bool = True) -> float:
    """An age in years from a table cell (text) or an option (a number); NaN when missing.

    Args:
        value: text as written in a table (``''``, ``'NA'``, ``'unknown'`` ... mean missing), a
            number, or None (missing).
        field: what the message names, e.g. ``age`` or ``FILE: row 8 (line 9), column 'age'``; empty
            when the caller names it (argparse prefixes ``argument --age:``).
        missing_ok: whether a missing age is allowed; when not (an option given explicitly), a
            missing spelling or NaN is refused like any other non-age.

    Raises:
        DataError: ``FIELD: '-3' is not an age (a number from 0 to 120 ...)``.
    """
    age = _age_or_none(value)
    if age is None or (math.isnan(age) and not missing_ok):
        rule = ", or empty when unknown" if missing_ok else "; leave it out when unknown"
        prefix = f"{field}: " if field else ""
        raise DataError(f"{prefix}{_shown(value)} is not an age (a number from 0 to {MAX_AGE:g}{rule})")
    return age


def _age_or_none(value: object) -> float | None:
    """The age in ``value``; NaN when it spells a missing age; None when it is not an age at all."""
    if value is None:
        return math.nan
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in MISSING_AGE:
            return math.nan
        if not _NUMBER.fullmatch(text):
            return None
        number = float(text)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        if math.isnan(number):
            return math.nan
    else:
        return None
    return number if math.isfinite(number) and 0 <= number <= MAX_AGE else None


def normalise_category(value: object) -> str:
    """Strip and lower-case; None, NaN and empty mean ``unknown``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return UNKNOWN
    return str(value).strip().lower() or UNKNOWN


def is_known(column: str, value: str) -> bool:
    """Whether a normalised ``value`` belongs to the vocabulary of ``column`` (``unknown`` does)."""
    return value == UNKNOWN or value in VOCABULARY[column]


def patient_category(column: str, value: object, field: str | None = None) -> str:
    """One sex or localization value as the reader reads it: normalised, and ``unknown`` (with a
    note naming ``field`` and the known values) when outside the vocabulary."""
    text = normalise_category(value)
    if is_known(column, text):
        return text
    note(
        f"{field or column}: unrecognised value {_shown(value)} read as '{UNKNOWN}' "
        f"(known: {', '.join(VOCABULARY[column])})"
    )
    return UNKNOWN


def read_patient(age: object = None, sex: object = None, localization: object = None) -> pd.DataFrame:
    """One patient's fields as a one-row table, by the reader's rules (None = unknown).

    An age that is given must be an age (a missing spelling or NaN is refused: leave it out instead);
    an unrecognised sex or localization becomes ``unknown`` with a note.

    Raises:
        DataError: naming the field (``age``), when the age is not a number from 0 to 120.
    """
    years = math.nan if age is None else parse_age(age, "age", missing_ok=False)
    row = {
        "age": years,
        "sex": patient_category("sex", sex),
        "localization": patient_category("localization", localization),
    }
    return pd.DataFrame([row]).astype({"age": np.float64})


def more_rows(count: int, what: str = "row") -> str:
    """'' for one problem, else ' (N rows in all)'."""
    return "" if count <= 1 else f" ({count} {what}s in all)"


def _shown(value: object, limit: int = 60) -> str:
    """A value quoted for a message: text as written, numbers compactly ('-3', '1e+09', 'nan')."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return f"'{float(value):g}'"
    text = repr(str(value))
    return text if len(text) <= limit else text[: limit - 4] + "...'"


#: Age bands of the subgroup audit: (low, high, name), ``low <= age < high``.
AGE_BANDS = ((0, 30, "<30"), (30, 50, "30-50"), (50, 70, "50-70"), (70, 200, ">=70"))


def age_band(age: pd.Series) -> pd.Series:
    """Age bands <30, 30-50, 50-70, >=70 and 'unknown' for a missing age."""
    bands = pd.Series("unknown", index=age.index, dtype=object)
    for low, high, name in AGE_BANDS:
        bands[(age >= low) & (age < high)] = name
    return bands


def subgroup_attributes(metadata: pd.DataFrame, features: Features | None = None) -> dict[str, pd.Series]:
    """The patient attributes a model is audited over, one value per image: each declared categorical
    feature and the age band (HAM10000: sex, age band, localization).

    ``features`` defaults to HAM10000's.
    """
    features = features if features is not None else preset("ham10000").features
    out = {name: metadata[name] for name in features.categorical if name in metadata.columns}
    age = features.age_feature
    if age and age in metadata.columns:
        out["age_band"] = age_band(metadata[age])
    return out


# --- typed features of any schema -----------------------------------------------------------------

#: What a boolean feature reads as.
TRUE, FALSE = "true", "false"


def parse_number(value: object, field: str, features: Features) -> float:
    """A numeric feature's value from a table cell: NaN when it spells unknown; else a finite number.

    Raises:
        DataError: ``FIELD: 'abc' is not a number (or empty when unknown)``.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    text = str(value).strip()
    if text.lower() in features.unknown_tokens:
        return math.nan
    if not _NUMBER.fullmatch(text):
        raise DataError(f"{field}: {_shown(value)} is not a number (or empty when unknown)")
    return float(text)


def parse_boolean(value: object, field: str, features: Features) -> str:
    """A boolean feature's value: ``true``, ``false`` or ``unknown`` (by the schema's tokens).

    Raises:
        DataError: naming ``field`` when the value is none of the true, false or unknown spellings.
    """
    text = normalise_category(value)
    if text in features.true_tokens:
        return TRUE
    if text in features.false_tokens:
        return FALSE
    if text == UNKNOWN or text in features.unknown_tokens:
        return UNKNOWN
    raise DataError(
        f"{field}: {_shown(value)} is not a boolean (true: {', '.join(features.true_tokens[:3])}; false: "
        f"{', '.join(features.false_tokens[:3])}; unknown: {', '.join(t for t in features.unknown_tokens[:4] if t)})"
    )


def parse_category(value: object, features: Features) -> str:
    """A categorical feature's value: normalised; the schema's unknown spellings read as ``unknown``."""
    text = normalise_category(value)
    return UNKNOWN if text in features.unknown_tokens else text


def typed_column(cells: pd.Series, name: str, features: Features, where: Callable[[int], str]) -> pd.Series:
    """A numeric (float, NaN unknown; the age feature 0 to 120) or boolean (text) feature's column, by the
    reader's rules; each distinct value is parsed once.

    Raises:
        DataError: naming the first bad cell (``where(row)``: file, row, column) and how many rows are bad.
    """
    if name in features.numeric:
        kind: type = float
        parse: Callable[[object, str], object] = (
            parse_age if name == features.age_feature else lambda v, field: parse_number(v, field, features)
        )
    elif name in features.boolean:
        kind, parse = object, lambda v, field: parse_boolean(v, field, features)
    else:
        raise ValueError(f"{name!r} is not a numeric or boolean feature")
    parsed, bad = {}, set()
    for value in cells.unique():
        try:
            parsed[value] = parse(value, "")
        except DataError:
            bad.add(value)
    if bad:
        rows = np.flatnonzero(cells.isin(bad).to_numpy())
        try:
            parse(cells.iloc[rows[0]], where(int(rows[0])))
        except DataError as exc:
            raise DataError(f"{exc}{more_rows(len(rows))}") from None
    values = cells.map(parsed)
    return values.astype(float) if kind is float else values.astype(object)


def read_features(features: Features, values: dict[str, object]) -> pd.DataFrame:
    """One patient's features (name -> value as written; absent = unknown) as a one-row table, by the
    reader's rules; a categorical value outside a fixed vocabulary is ``unknown`` with a note."""
    row: dict[str, object] = {}
    for name in features.numeric:
        value = values.get(name)
        if name == features.age_feature:
            row[name] = math.nan if value is None else parse_age(value, name, missing_ok=False)
        else:
            row[name] = parse_number(value, name, features)
    for name in features.categorical:
        text = parse_category(values.get(name), features)
        known = features.categories.get(name)
        if known is not None and text != UNKNOWN and text not in known:
            shown = _shown(values.get(name))
            note(f"{name}: unrecognised value {shown} read as '{UNKNOWN}' (known: {', '.join(known)})")
            text = UNKNOWN
        row[name] = text
    for name in features.boolean:
        row[name] = parse_boolean(values.get(name), name, features)
    return pd.DataFrame([row]).astype({n: np.float64 for n in features.numeric})
