"""The rules of the patient fields (age, sex, localization), shared by the CSV reader and ``predict``.

One rule per field, applied wherever a value comes from: an age is a number from 0 to 120 (or
missing), and a sex or localization outside the HAM10000 vocabulary is read as ``unknown`` and
reported with :func:`~multimodal_lesion.errors.note`, never dropped or guessed.
"""

from __future__ import annotations

import math
import numbers
import re

import numpy as np
import pandas as pd

from ..errors import DataError, note
from .constants import LOCALIZATIONS, SEXES, UNKNOWN

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


def subgroup_attributes(metadata: pd.DataFrame) -> dict[str, pd.Series]:
    """The patient attributes a model is audited over, one value per image: sex, age band, localization."""
    return {"sex": metadata["sex"], "age_band": age_band(metadata["age"]), "localization": metadata["localization"]}
