"""Lesion-grouped, dx-stratified splits and folds: disjoint, reproducible, proportional."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from multimodal_lesion.data.constants import CLASSES, METADATA_FILE
from multimodal_lesion.data.ham10000 import read_ham10000
from multimodal_lesion.data.splits import fold_assignment, lesion_grouped_subset, split_lesions
from multimodal_lesion.errors import ConfigError, DataError


def _lesions_shared(frame: pd.DataFrame, column: str) -> int:
    """How many lesions have images in more than one value of ``column``."""
    return int((frame.groupby("lesion_id")[column].nunique() > 1).sum())


def _max_class_deviation(frame: pd.DataFrame, column: str) -> float:
    """Largest gap (in share of images) between a class's share in any group and in the whole."""
    whole = frame["dx"].value_counts(normalize=True)
    parts = frame.groupby(column)["dx"].value_counts(normalize=True).unstack(fill_value=0.0)
    return float((parts - whole).abs().to_numpy().max())


@pytest.fixture
def meta(tiny_ham: Path) -> pd.DataFrame:
    return read_ham10000(tiny_ham).metadata


def test_split_on_fixture(meta: pd.DataFrame) -> None:
    out = split_lesions(meta, seed=0)
    assert list(out.columns) == ["image_id", "lesion_id", "dx", "split"]
    assert out.index.equals(meta.index) and list(out.image_id) == list(meta.image_id)
    assert set(out.split) == {"train", "val", "test"} and _lesions_shared(out, "split") == 0
    assert (out.groupby("split").dx.nunique() == len(CLASSES)).all()  # 4 lesions per class, 3 splits
    assert out.split.value_counts()["train"] > out.split.value_counts()["test"]


def test_same_seed_same_split_other_seed_other_split(meta: pd.DataFrame) -> None:
    first = split_lesions(meta, seed=7)
    assert first.equals(split_lesions(meta, seed=7))
    assert any(not first.split.equals(split_lesions(meta, seed=s).split) for s in range(8, 12))


def test_folds(meta: pd.DataFrame) -> None:
    out = split_lesions(meta, folds=3, seed=1)
    assert out.fold.dtype == np.int64 and set(out.fold) == {-1, 0, 1, 2}
    assert ((out.fold == -1) == (out.split == "test")).all()
    assert ((out.fold == 0) == (out.split == "val")).all()
    assert ((out.fold > 0) == (out.split == "train")).all()
    assert _lesions_shared(out, "fold") == 0


def test_fold_assignment_covers_all_rows(meta: pd.DataFrame) -> None:
    shuffled = meta.sample(frac=1.0, random_state=0)  # index and order are kept, not assumed
    folds = fold_assignment(shuffled, 4, seed=2)
    assert folds.name == "fold" and folds.index.equals(shuffled.index)
    assert set(folds) == {0, 1, 2, 3} and _lesions_shared(shuffled.assign(fold=folds), "fold") == 0
    assert folds.sort_index().equals(fold_assignment(meta, 4, seed=2))  # row order does not matter


def test_mixed_dx_lesion_stays_together(meta: pd.DataFrame) -> None:
    lesion = meta.lesion_id[0]
    mixed = meta.copy()
    mixed.loc[mixed.lesion_id == lesion, "dx"] = ["mel", "nv"]
    out = split_lesions(mixed, seed=0)
    assert out.loc[out.lesion_id == lesion, "split"].nunique() == 1


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(test_size=1.2), "test_size"),
        (dict(val_size=-0.1), "val_size"),
        (dict(folds=1), "folds"),
        (dict(test_size=0.5, val_size=0.5), "test_size + val_size"),
        (dict(folds=2.5), "folds"),
    ],
)
def test_bad_sizes_name_the_key(meta: pd.DataFrame, kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key.replace('+', '[+]')}:"):
        split_lesions(meta, **kwargs)


def test_fold_assignment_needs_two_folds(meta: pd.DataFrame) -> None:
    with pytest.raises(ConfigError, match="folds: must be an integer >= 2"):
        fold_assignment(meta, 1, seed=0)


def test_bad_tables_name_the_column_or_row(meta: pd.DataFrame) -> None:
    with pytest.raises(DataError, match="no column\\(s\\) 'lesion_id'"):
        split_lesions(meta.drop(columns="lesion_id"))
    with pytest.raises(DataError, match="no rows"):
        split_lesions(meta.iloc[:0])
    gap = meta.copy()
    gap.loc[4, "dx"] = None
    with pytest.raises(DataError, match="row 4, column 'dx': empty value"):
        split_lesions(gap)
    with pytest.raises(DataError, match="2 lesion\\(s\\) cannot fill 3"):
        split_lesions(meta[meta.lesion_id.isin(meta.lesion_id.unique()[:2])])


def test_rare_class_warns(meta: pd.DataFrame) -> None:
    rare = meta[(meta.dx != "df") | (meta.lesion_id == meta.lesion_id[meta.dx == "df"].iloc[0])]
    with pytest.warns(UserWarning, match=r"df \(1\)"):
        out = split_lesions(rare, seed=0)
    assert _lesions_shared(out, "split") == 0


@pytest.mark.real_data
def test_real_data_splits(real_data_root: Path) -> None:
    meta = read_ham10000(real_data_root).metadata
    assert len(meta) == 10015 and meta.lesion_id.nunique() == 7470
    for frame, column in (
        (split_lesions(meta, seed=0), "split"),
        (split_lesions(meta, folds=5, seed=0), "fold"),
        (meta.assign(fold=fold_assignment(meta, 5, seed=0)), "fold"),
    ):
        assert len(frame) == 10015 and frame.lesion_id.nunique() == 7470
        assert _lesions_shared(frame, column) == 0
        assert (frame.groupby(column).dx.nunique() == len(CLASSES)).all()
        assert _max_class_deviation(frame, column) < 0.02
    shares = split_lesions(meta, seed=0).split.value_counts(normalize=True)
    assert abs(shares["test"] - 0.15) < 0.01 and abs(shares["val"] - 0.15) < 0.01


def test_lesion_grouped_subset_writes_whole_lesions_as_a_readable_root(
    tiny_ham_factory: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tiny_ham_factory(tmp_path / "dataset", n_lesions=40)  # >= 5 lesions per class, some with 2 images
    full = read_ham10000(source).metadata
    out = lesion_grouped_subset(source, 4, seed=1, parent=tmp_path / "subsets")
    assert out.parent == tmp_path / "subsets" and (out / METADATA_FILE).is_file()

    subset = read_ham10000(out).metadata  # the reader's checks: CSV, every image and mask, paths in the root
    kept = set(subset.lesion_id)
    assert kept == set(full.lesion_id[fold_assignment(full, 4, seed=1).to_numpy() == 0])  # fold 0 of 4
    assert 0 < len(kept) < full.lesion_id.nunique() and set(subset.dx) == set(CLASSES)  # stratified
    whole = full[full.lesion_id.isin(kept)]
    assert sorted(subset.image_id) == sorted(whole.image_id)  # every image of a kept lesion, no other
    images_per_lesion = subset.groupby("lesion_id").size()
    assert images_per_lesion.equals(whole.groupby("lesion_id").size()) and (images_per_lesion > 1).any()
    original = whole.set_index("image_id")
    for row in subset.itertuples():
        assert Path(row.path).read_bytes() == Path(original.loc[row.image_id, "path"]).read_bytes()
        assert Path(row.mask_path).read_bytes() == Path(original.loc[row.image_id, "mask_path"]).read_bytes()
    raw = pd.read_csv(source / METADATA_FILE, dtype=str, keep_default_na=False)
    written = pd.read_csv(out / METADATA_FILE, dtype=str, keep_default_na=False)
    expected = raw[raw.image_id.isin(set(subset.image_id))].reset_index(drop=True)
    pd.testing.assert_frame_equal(written, expected)  # the original rows, unchanged, in their order
    assert not list(out.rglob(".*.tmp"))

    stamp = (out / METADATA_FILE).stat().st_mtime_ns
    assert lesion_grouped_subset(source, 4, seed=1, parent=tmp_path / "subsets") == out  # reused, not rewritten
    assert (out / METADATA_FILE).stat().st_mtime_ns == stamp
    assert lesion_grouped_subset(source, 4, seed=2, parent=tmp_path / "subsets") != out
    assert lesion_grouped_subset(source, 1) == source  # 1 in 1: the whole root, nothing written
    monkeypatch.setenv("MMLESION_CACHE", str(tmp_path / "cache"))
    assert lesion_grouped_subset(source, 4, seed=1).parent == tmp_path / "cache" / "notebooks"


# --- properties ------------------------------------------------------------------------------------


@st.composite
def image_tables(draw: st.DrawFn) -> pd.DataFrame:
    """Any valid table: 4-60 lesions of random dx, 1-4 images each, random patient fields."""
    n_lesions = draw(st.integers(4, 60))
    rows = []
    for lesion in range(n_lesions):
        dx = draw(st.sampled_from(CLASSES))
        for _ in range(draw(st.integers(1, 4))):
            rows.append(
                {
                    "lesion_id": f"HAM_{lesion:07d}",
                    "image_id": f"ISIC_{len(rows):07d}",
                    "dx": dx,
                    "age": draw(st.one_of(st.just(np.nan), st.floats(0, 120))),
                    "sex": draw(st.sampled_from(["female", "male", "unknown"])),
                }
            )
    order = draw(st.permutations(range(len(rows))))
    return pd.DataFrame(rows).iloc[list(order)].reset_index(drop=True)


@settings(max_examples=30, deadline=None)
@given(table=image_tables(), folds=st.sampled_from([0, 2, 3]), seed=st.integers(0, 2**31 - 1))
def test_any_valid_table_gives_a_disjoint_reproducible_split(table: pd.DataFrame, folds: int, seed: int) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # rare classes warn by design
        out = split_lesions(table, folds=folds, seed=seed)
        again = split_lesions(table, folds=folds, seed=seed)
        fold = fold_assignment(table, 3, seed)
    assert out.equals(again) and len(out) == len(table) and out.index.equals(table.index)
    assert set(out.split) <= {"train", "val", "test"} and (out.split == "train").any()
    assert _lesions_shared(out, "split") == 0
    if folds:
        assert _lesions_shared(out, "fold") == 0 and set(out.fold) <= set(range(-1, folds))
    assert _lesions_shared(table.assign(fold=fold), "fold") == 0 and set(fold) <= {0, 1, 2}
    # stratified by class, a class with >= 3 lesions reaches every fold; with only classes of 1-2 lesions
    # (e.g. 2 akiec + 2 bcc) a fold can stay empty, which split_lesions warns about
    if table.groupby("dx")["lesion_id"].nunique().max() >= 3:
        assert set(fold) == {0, 1, 2}
