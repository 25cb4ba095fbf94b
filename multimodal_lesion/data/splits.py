"""Lesion-grouped, diagnosis-stratified splits and folds, reproducible by seed.

All images of a lesion land in the same split (otherwise the same lesion is in train and test), and
each class is spread over the splits in proportion to their size, counted in images. A lesion's
label is its diagnosis (the most frequent one if its images disagree).

The assignment is a greedy quota fill done per class: the lesions of a class, largest first (ties in
seeded random order), each go to the split that is furthest below its share of that class. Every
split gets a lesion of every class that has at least as many lesions as there are splits, and the
image proportions end within one lesion of their targets.

A group's label is its most frequent diagnosis (``group_label="majority"``, lesions), or, for groups
that are patients (``"rarest"``, :func:`split_rule`), the rarest diagnosis among its
images: a patient with one melanoma among forty naevi is stratified as a melanoma patient, so the few
melanoma patients of ISIC 2020 are spread over the splits.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError, note
from ..io import atomic_write
from .cache import cache_home, cache_key
from .constants import METADATA_FILE
from .reader import read_dataset
from .schema import DatasetSchema

SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
GroupLabel = Literal["majority", "rarest"]


def split_lesions(
    df: pd.DataFrame,
    *,
    test_size: float = 0.15,
    val_size: float = 0.15,
    folds: int = 0,
    seed: int = 0,
    group_label: GroupLabel = "majority",
) -> pd.DataFrame:
    """Assign every image to ``train``/``val``/``test``, grouped by lesion and stratified by ``dx``.

    Args:
        df: one row per image with ``image_id``, ``lesion_id`` and ``dx``.
        test_size: share of the images held out for test.
        val_size: share of the images held out for validation.
        folds: when > 1, the non-test images are cut into this many folds instead (``val_size`` is
            then unused); fold 0 is marked ``val``, the test rows get fold -1.
        seed: the same seed and table give the same split.
        group_label: how a group is labelled for the stratification (see the module docstring).

    Returns:
        A frame on ``df``'s index with ``image_id, lesion_id, dx, split`` (and ``fold`` when folds > 1).
    """
    _check_sizes(test_size, val_size, folds)
    _require(df, ("image_id", "lesion_id", "dx"))
    if folds:
        fractions = [test_size] + [(1.0 - test_size) / folds] * folds
        bins = _assign_rows(df, fractions, seed, group_label) - 1  # -1 = test, 0..folds-1
        split = np.where(bins < 0, "test", np.where(bins == 0, "val", "train"))
        extra = {"fold": bins.astype(np.int64)}
    else:
        fractions = [1.0 - test_size - val_size, val_size, test_size]
        split = np.asarray(SPLIT_NAMES, dtype=object)[_assign_rows(df, fractions, seed, group_label)]
        extra = {}
    out = df[["image_id", "lesion_id", "dx"]].copy()
    out["split"] = split
    return out.assign(**extra)


def fold_assignment(df: pd.DataFrame, folds: int, seed: int, group_label: GroupLabel = "majority") -> pd.Series:
    """Fold number (0..folds-1) of every row, grouped by lesion and stratified by ``dx`` (for ablations)."""
    if not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ConfigError(f"folds: must be an integer >= 2, got {folds!r}")
    _require(df, ("lesion_id", "dx"))
    bins = _assign_rows(df, [1.0 / folds] * folds, seed, group_label)
    return pd.Series(bins.astype(np.int64), index=df.index, name="fold")


def split_rule(schema: DatasetSchema) -> GroupLabel:
    """The ``group_label`` of a schema's splits and folds: ``"rarest"`` for patient groups, else ``"majority"``."""
    return "rarest" if schema.group_by == "patient" else "majority"


def _check_sizes(test_size: float, val_size: float, folds: int) -> None:
    """Refuse shares outside [0, 1), shares leaving no training data, and a single fold."""
    for key, value in (("test_size", test_size), ("val_size", val_size)):
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ConfigError(f"{key}: must be a number in [0, 1), got {value!r}")
    if not isinstance(folds, (int, np.integer)) or folds < 0 or folds == 1:
        raise ConfigError(f"folds: must be 0 (no folds) or an integer >= 2, got {folds!r}")
    if not folds and test_size + val_size >= 1.0:
        raise ConfigError(f"test_size + val_size: must be < 1 to leave training data, got {test_size + val_size:g}")


def _require(df: pd.DataFrame, columns: tuple[str, ...]) -> None:
    """The table must have ``columns`` with no empty value; names the first bad column and row."""
    absent = [c for c in columns if c not in df.columns]
    if absent:
        raise DataError(f"split: table has no column(s) {', '.join(map(repr, absent))}")
    if len(df) == 0:
        raise DataError("split: table has no rows")
    for column in columns:
        empty = df[column].isna().to_numpy() | (df[column].astype(str).str.strip() == "").to_numpy()
        if empty.any():
            raise DataError(f"split: row {df.index[int(np.flatnonzero(empty)[0])]!r}, column '{column}': empty value")


def _assign_rows(df: pd.DataFrame, fractions: list[float], seed: int, group_label: GroupLabel) -> np.ndarray:
    """Bin index (into ``fractions``) of every row, via its lesion."""
    lesions = _lesion_table(df, group_label)
    active = sum(f > 0 for f in fractions)
    noun = _group_noun(group_label)
    if len(lesions) < active:
        raise DataError(f"split: {len(lesions)} {noun[:-1]}(s) cannot fill {active} non-empty splits/folds")
    _note_thin_classes(lesions, active, noun)
    bins = _assign_lesions(lesions, np.asarray(fractions, dtype=float), np.random.default_rng(seed))
    return df["lesion_id"].map(bins).to_numpy(dtype=np.int64)


def _lesion_table(df: pd.DataFrame, group_label: GroupLabel = "majority") -> pd.DataFrame:
    """One row per lesion: its label (most frequent dx, or the rarest overall; ties -> alphabetical) and
    its image count."""
    if group_label not in ("majority", "rarest"):
        raise ConfigError(f"group_label: expected 'majority' or 'rarest', got {group_label!r}")
    counts = df.groupby(["lesion_id", "dx"], sort=True).size().rename("n").reset_index()
    if group_label == "rarest":  # rank by the class's frequency in the whole table, rarest first
        counts["n"] = -counts["dx"].map(df["dx"].value_counts())
    counts = counts.sort_values(["lesion_id", "n", "dx"], ascending=[True, False, True], kind="stable")
    label = counts.drop_duplicates("lesion_id").set_index("lesion_id")["dx"]
    size = df.groupby("lesion_id", sort=True).size()
    return pd.DataFrame({"dx": label, "n": size}).sort_index()


def _group_noun(group_label: GroupLabel) -> str:
    """What a group is, in the plural: patients split by :func:`split_rule` are labelled ``"rarest"``."""
    return "patients" if group_label == "rarest" else "lesions"


def _note_thin_classes(lesions: pd.DataFrame, active: int, noun: str) -> None:
    """Say which classes are too rare to appear in every split: their metrics will be missing there."""
    per_class = lesions.groupby("dx").size()
    thin = per_class[per_class < active]
    if len(thin):
        listed = ", ".join(f"{dx} ({n})" for dx, n in thin.items())
        note(
            f"split: class(es) with fewer {noun} than the {active} splits/folds cannot be in every one: {listed} "
            "(their per-class metrics are missing where they are absent)"
        )


def _assign_lesions(lesions: pd.DataFrame, fractions: np.ndarray, rng: np.random.Generator) -> pd.Series:
    """Greedy per-class quota fill; returns lesion_id -> bin index."""
    order = rng.permutation(len(lesions))
    shuffled = lesions.iloc[order]
    shuffled = shuffled.iloc[np.argsort(-shuffled["n"].to_numpy(), kind="stable")]
    out: dict[object, int] = {}
    for _, group in shuffled.groupby("dx", sort=True):
        targets = fractions * group["n"].sum()
        priority = rng.permutation(len(fractions))
        assigned = np.zeros(len(fractions))
        for lesion_id, n in zip(group.index, group["n"].to_numpy(), strict=True):
            b = _most_behind(assigned, targets, priority)
            assigned[b] += n
            out[lesion_id] = b
    return pd.Series(out, dtype=np.int64)


def _most_behind(assigned: np.ndarray, targets: np.ndarray, priority: np.ndarray) -> int:
    """The bin filled least relative to its target; ties -> larger target, then seeded priority."""
    active = np.flatnonzero(targets > 0)
    fill = assigned[active] / targets[active]
    keys = np.lexsort((priority[active], -targets[active], fill))
    return int(active[keys[0]])


def lesion_grouped_subset(
    source: str | os.PathLike, keep_one_in: int, seed: int = 0, *, parent: str | os.PathLike | None = None
) -> Path:
    """Write one of ``keep_one_in`` lesion-grouped, class-stratified folds of a HAM10000 root as a HAM10000 root.

    Whole lesions are kept, with their original CSV rows; their images and masks are hard-linked (else
    copied: the reader refuses links out of a data root). The CSV is written last, so a half-written
    folder is never taken for a finished one, and a finished one is reused.

    Args:
        source: the HAM10000 root to subsample.
        keep_one_in: K, to keep fold 0 of :func:`fold_assignment`'s K folds; 1 or less keeps everything.
        seed: seed of the fold assignment.
        parent: folder that receives the subset (default: ``notebooks`` under ``cache_home()``).

    Returns:
        The subset's root, or ``source`` itself when ``keep_one_in <= 1``.
    """
    source = Path(source)
    if keep_one_in <= 1:
        return source
    parent = Path(parent) if parent is not None else cache_home() / "notebooks"
    out = parent / f"ham10000-{cache_key(source.resolve())}-1in{keep_one_in}-seed{seed}"
    if (out / METADATA_FILE).is_file():
        return out
    dataset = read_dataset(source)
    keep = dataset.metadata[fold_assignment(dataset.metadata, keep_one_in, seed).to_numpy() == 0]
    for src in [p for p in (*keep["path"], *keep["mask_path"]) if p]:
        dest = out / Path(src).relative_to(dataset.root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            try:
                os.link(src, dest)
            except OSError:
                shutil.copyfile(src, dest)
    raw = pd.read_csv(source / METADATA_FILE, dtype=str, keep_default_na=False)
    with atomic_write(out / METADATA_FILE) as fh:
        raw[raw["image_id"].isin(set(keep["image_id"]))].to_csv(fh, index=False)
    return out
