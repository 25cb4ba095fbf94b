"""Splits the user brings, instead of one drawn here: a file (``data.splits``) or a column (``split_column``).

Challenges, Derm7pt and clinics fix their test set before anyone trains. A given split names, for
every image, ``train`` / ``val`` / ``test`` (``valid``, ``validation``, ``training`` read as such) or
a fold number (``0..K-1``; ``test`` or ``-1`` for a held-out test set). It is used as given, and
checked as ours is built: the groups (lesions, patients) it puts on two sides, and the pairs of the
duplicates file (``mmlesion duplicates`` writes one) that cross its train and test, are counted and
refused unless ``data.allow_leaks`` (``--allow-leaks``). A bad image id, an unknown split name or an
empty split is a one-line DataError naming the file (or column) and the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError, note
from .dataset import LesionDataset
from .images import IMAGE_EXTENSIONS
from .splits import SPLIT_NAMES

#: The canonical table's column holding the values of the schema's ``split_column``.
GIVEN_SPLIT = "given_split"
#: Spellings of the three split names.
SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
#: Column names read as the image id / the split of a split file, in order of preference.
ID_COLUMNS = ("image_id", "image", "image_name", "isic_id", "id")
SPLIT_COLUMNS = ("split", "fold", "partition", "set")


@dataclass(frozen=True)
class GivenSplit:
    """One split value per image of a dataset, and where each came from (for one-line errors)."""

    values: pd.Series  # on the dataset's index: the raw text of every image's split
    where: list[str]  # per image: 'FILE: row N (line L)' or 'column C of image X'
    source: str  # the file, or 'schema key dataset.split_column (C)'


def given_split(dataset: LesionDataset, splits_file: str = "") -> GivenSplit | None:
    """The split ``dataset`` comes with: ``splits_file`` when given, else its schema's ``split_column``, else None."""
    if splits_file:
        return read_split_file(splits_file, dataset)
    column = dataset.schema.split_column
    if not column:
        return None
    values = dataset.metadata[GIVEN_SPLIT].astype(str).str.strip()
    where = [f"column '{column}' of image {i}" for i in dataset.metadata["image_id"]]
    return GivenSplit(values, where, f"schema key 'dataset.split_column' ({column})")


def read_split_file(path: str | Path, dataset: LesionDataset) -> GivenSplit:
    """Read a CSV of image id and split (or fold); every image of ``dataset`` must be in it exactly once."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data.splits: {path}: file not found")
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    id_col = next((c for c in ID_COLUMNS if c in table.columns), None)
    split_col = next((c for c in SPLIT_COLUMNS if c in table.columns), None)
    if id_col is None or split_col is None:
        raise DataError(
            f"{path}: needs an image id column ({', '.join(ID_COLUMNS)}) and a split column "
            f"({', '.join(SPLIT_COLUMNS)}); has {', '.join(map(str, table.columns[:6]))}"
        )
    ids = table[id_col].str.strip().map(_stem)
    known = dataset.metadata["image_id"]
    rows = pd.Series(np.arange(len(table)), index=ids)
    seen_twice = ids.duplicated().to_numpy()
    if seen_twice.any():
        k = int(np.flatnonzero(seen_twice)[0])
        raise DataError(f"{path}: row {k + 1} (line {k + 2}): image {ids.iloc[k]!r} is listed twice")
    unknown = ~ids.isin(set(known)).to_numpy()
    if unknown.any():
        k = int(np.flatnonzero(unknown)[0])
        raise DataError(
            f"{path}: row {k + 1} (line {k + 2}): image {ids.iloc[k]!r} is not in the data "
            f"({int(unknown.sum())} such row(s))"
        )
    absent = ~known.isin(set(ids)).to_numpy()
    if absent.any():
        raise DataError(
            f"{path}: {int(absent.sum())} image(s) of the data have no split there "
            f"(first: {known.iloc[int(np.flatnonzero(absent)[0])]!r})"
        )
    position = rows[known.to_numpy()].to_numpy()
    values = pd.Series(table[split_col].str.strip().to_numpy()[position], index=dataset.metadata.index)
    where = [f"{path}: row {k + 1} (line {k + 2})" for k in position]
    return GivenSplit(values, where, str(path))


def _stem(value: str) -> str:
    """An id written with an image extension, without it (``ISIC_1.jpg`` -> ``ISIC_1``)."""
    return Path(value).stem if Path(value).suffix.lower() in IMAGE_EXTENSIONS else value


def split_frame(dataset: LesionDataset, given: GivenSplit, fold: int = 0) -> pd.DataFrame:
    """The split as :func:`~multimodal_lesion.data.splits.split_lesions` returns one (``fold`` when folds given).

    Split names give ``split``; fold numbers give ``fold`` (test rows -1) and ``split`` with fold
    ``fold`` as validation. An unknown value or an empty split is a DataError naming the row / split.
    """
    values = given.values.str.lower()
    words = values.map(SPLIT_WORDS)
    numbers = pd.to_numeric(values.where(~values.isin(["test", "testing"]), "-1"), errors="coerce")
    is_fold = numbers.notna() & (numbers == numbers.round()) & (numbers >= -1)
    out = dataset.metadata[["image_id", "lesion_id", "dx"]].copy()
    if is_fold.all() and (numbers >= 0).any():
        folds = numbers.astype(np.int64)
        if fold not in set(folds):
            raise DataError(f"{given.source}: no image in fold {fold} (data.fold); folds: {sorted(set(folds) - {-1})}")
        out["split"] = np.where(folds < 0, "test", np.where(folds == fold, "val", "train"))
        out["fold"] = folds.to_numpy()
    else:
        bad = words.isna().to_numpy()
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{given.where[k]}: split {given.values.iloc[k]!r} is not one of train, val, test "
                f"(or a fold number; {int(bad.sum())} such row(s))"
            )
        out["split"] = words.to_numpy()
    for name in SPLIT_NAMES:
        if not (out["split"] == name).any():
            raise DataError(f"{given.source}: split '{name}' is empty (every one of train, val, test needs images)")
    return out


@dataclass(frozen=True)
class SplitLeaks:
    """What a given split puts on two sides: groups (lesions; patients) and duplicate pairs across train and test."""

    lesions: list[str]  # lesion ids (after the duplicates file's merges) with images in two splits
    patients: list[str]  # patient ids with images in two splits (when the data name patients)
    duplicate_pairs: list[tuple[str, str]]  # pairs of the duplicates file with one image in train, one in test
    n_lesions: int
    n_patients: int

    @property
    def any(self) -> bool:
        return bool(self.lesions or self.patients or self.duplicate_pairs)

    def describe(self) -> str:
        """One line with the counts and the first ids of each."""

        def some(ids: list[str]) -> str:
            return f" (e.g. {', '.join(ids[:3])})" if ids else ""

        parts = [f"{len(self.lesions)} of {self.n_lesions} lesions have images in two splits{some(self.lesions)}"]
        if self.n_patients:
            parts.append(
                f"{len(self.patients)} of {self.n_patients} patients have images in two splits{some(self.patients)}"
            )
        pairs = [f"{a}/{b}" for a, b in self.duplicate_pairs]
        parts.append(f"{len(pairs)} near-duplicate pair(s) of the duplicates file cross train and test{some(pairs)}")
        return "; ".join(parts)


def split_leaks(dataset: LesionDataset, splits: pd.DataFrame, pairs: pd.DataFrame | None = None) -> SplitLeaks:
    """The groups that ``splits`` (its ``split`` column: split names or folds) puts on two sides, and the
    ``pairs`` (two image ids) across train and test (across two folds)."""
    meta = dataset.metadata
    side = pd.Series(splits["split"].to_numpy(), index=meta["image_id"].to_numpy())

    def crossing(column: str) -> list[str]:
        if column not in meta.columns:
            return []
        n_sides = pd.Series(side.to_numpy()).groupby(meta[column].to_numpy()).nunique()
        return [str(g) for g in n_sides[n_sides > 1].index]

    across: list[tuple[str, str]] = []
    if pairs is not None and len(pairs):
        a, b = pairs.iloc[:, 0].map(_stem), pairs.iloc[:, 1].map(_stem)
        usable = a.isin(side.index) & b.isin(side.index)
        sa, sb = side[a[usable]].to_numpy(), side[b[usable]].to_numpy()
        if set(side) <= set(SPLIT_NAMES):  # a split: train against test
            cross = ((sa == "train") & (sb == "test")) | ((sa == "test") & (sb == "train"))
        else:  # folds: any two folds
            cross = sa != sb
        across = list(zip(a[usable][cross], b[usable][cross], strict=True))
    has_patients = "patient_id" in meta.columns
    return SplitLeaks(
        crossing("lesion_id"),
        crossing("patient_id") if has_patients else [],
        across,
        int(meta["lesion_id"].nunique()),
        int(meta["patient_id"].nunique()) if has_patients else 0,
    )


def check_given_split(leaks: SplitLeaks, source: str, allow_leaks: bool) -> None:
    """Refuse a split with leaks (DataError with the counts) unless ``allow_leaks``; then say them in a note."""
    if not leaks.any:
        return
    if not allow_leaks:
        raise DataError(f"{source}: the given split leaks: {leaks.describe()}; fix it, or pass --allow-leaks")
    note(f"{source}: the given split leaks (allowed by --allow-leaks): {leaks.describe()}")


def duplicate_pairs(dataset: LesionDataset) -> pd.DataFrame | None:
    """The two id columns of the schema's duplicates file, or None when it names none."""
    schema = dataset.schema
    if not schema.duplicates:
        return None
    path = Path(schema.duplicates).expanduser()
    path = path if path.is_absolute() else dataset.root / path
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    return frame[list(schema.duplicate_columns)].apply(lambda c: c.str.strip())


def given_folds(dataset: LesionDataset, given: GivenSplit, n_folds: int, allow_leaks: bool) -> pd.Series:
    """An ablation's folds from a given split: fold numbers ``0..n_folds-1`` for every image, leak-checked."""
    numbers = pd.to_numeric(given.values, errors="coerce")
    bad = ~(numbers.notna() & numbers.isin(range(n_folds))).to_numpy()
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{given.where[k]}: {given.values.iloc[k]!r} is not a fold number 0..{n_folds - 1} "
            f"(ablation.folds = {n_folds}; an ablation needs every image in a fold)"
        )
    folds = numbers.astype(np.int64).rename("fold")
    for k in range(n_folds):
        if not (folds == k).any():
            raise DataError(f"{given.source}: fold {k} is empty (ablation.folds = {n_folds})")
    splits = pd.DataFrame({"split": folds.astype(str).to_numpy()}, index=dataset.metadata.index)
    check_given_split(split_leaks(dataset, splits, duplicate_pairs(dataset)), given.source, allow_leaks)
    return folds
