"""A split the user brings (a file, or a schema column): honoured, checked for leaks, bad ones refused in one line."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from multimodal_lesion.config import load_config, replace
from multimodal_lesion.data.constants import METADATA_FILE
from multimodal_lesion.data.reader import read_dataset
from multimodal_lesion.data.schema_file import resolve_schema
from multimodal_lesion.errors import DataError
from multimodal_lesion.runs import make_splits


def lesion_split(root: Path) -> pd.DataFrame:
    """A clean given split of a tiny HAM: whole lesions, cycled over test / val / train / train."""
    meta = pd.read_csv(root / METADATA_FILE)
    order = {lesion: k for k, lesion in enumerate(meta["lesion_id"].unique())}
    names = ["test", "valid", "train", "train"]  # 'valid' is read as val
    return pd.DataFrame({"image_id": meta["image_id"], "split": [names[order[g] % 4] for g in meta["lesion_id"]]})


def splits_of(root: Path, **data) -> pd.DataFrame:
    cfg = replace(load_config(None), data={"root": str(root), **data})
    schema = resolve_schema(cfg.data.schema, duplicates=cfg.data.duplicates)
    return make_splits(cfg, read_dataset(root, schema))


def test_a_split_file_is_used_as_given(tiny_ham: Path, tmp_path: Path) -> None:
    given = lesion_split(tiny_ham)
    given.assign(image_id=given["image_id"] + ".jpg").to_csv(tmp_path / "split.csv", index=False)  # ids with .jpg
    splits = splits_of(tiny_ham, splits=str(tmp_path / "split.csv"))
    expected = given["split"].replace({"valid": "val"})
    assert splits["split"].tolist() == expected.tolist()


def test_a_fold_file_gives_folds_and_the_validation_fold(tiny_ham: Path, tmp_path: Path) -> None:
    meta = pd.read_csv(tiny_ham / METADATA_FILE)
    codes = pd.factorize(meta["lesion_id"])[0]
    folds = ["test" if c % 4 == 0 else str(c % 3) for c in codes]
    pd.DataFrame({"image": meta["image_id"], "fold": folds}).to_csv(tmp_path / "folds.csv", index=False)
    splits = splits_of(tiny_ham, splits=str(tmp_path / "folds.csv"), fold=2)
    assert (splits["split"] == "val").tolist() == [f == "2" for f in folds]
    assert (splits["split"] == "test").tolist() == [f == "test" for f in folds]
    assert (splits["fold"] == -1).sum() == folds.count("test")


def test_a_split_column_named_by_the_schema_is_used(tiny_ham: Path, tmp_path: Path) -> None:
    meta = pd.read_csv(tiny_ham / METADATA_FILE)
    meta.assign(partition=lesion_split(tiny_ham)["split"]).to_csv(tiny_ham / METADATA_FILE, index=False)
    schema = tmp_path / "mine.toml"
    schema.write_text('[dataset]\nextends = "ham10000"\nname = "mine"\nsplit_column = "partition"\n')
    splits = splits_of(tiny_ham, schema=str(schema))
    assert splits["split"].tolist() == lesion_split(tiny_ham)["split"].replace({"valid": "val"}).tolist()


@pytest.mark.parametrize(
    ("breakage", "needles"),
    [
        (lambda f: f.assign(split=f["split"].where(f.index != 3, "holdout")), ["row 4 (line 5)", "'holdout'"]),
        (lambda f: f.assign(image_id=f["image_id"].where(f.index != 2, "ISIC_0000001")), ["row 3", "not in the data"]),
        (lambda f: f.iloc[1:], ["1 image(s) of the data have no split", "ISIC_0024306"]),
        (lambda f: f.assign(split=f["split"].replace({"valid": "train"})), ["split 'val' is empty"]),
        (lambda f: pd.concat([f, f.iloc[[0]]]), ["listed twice"]),
    ],
    ids=["unknown-name", "unknown-id", "missing-id", "empty-split", "twice"],
)
def test_bad_split_files_are_refused_in_one_line(tiny_ham: Path, tmp_path: Path, cli, breakage, needles) -> None:
    path = tmp_path / "split.csv"
    breakage(lesion_split(tiny_ham)).to_csv(path, index=False)
    with pytest.raises(DataError) as caught:
        splits_of(tiny_ham, splits=str(path))
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    for needle in needles:
        assert needle in str(caught.value)


def test_a_split_that_separates_a_lesion_is_reported_and_refused_unless_allowed(tiny_ham, tmp_path, cli) -> None:
    given = lesion_split(tiny_ham)
    meta = pd.read_csv(tiny_ham / METADATA_FILE)
    twice = meta["lesion_id"].value_counts()
    lesion = twice[twice > 1].index[0]
    rows = meta.index[meta["lesion_id"] == lesion]
    given.loc[rows[0], "split"], given.loc[rows[1], "split"] = "train", "test"
    given.to_csv(tmp_path / "split.csv", index=False)
    with pytest.raises(DataError, match=rf"1 of \d+ lesions have images in two splits \(e.g. {lesion}\)"):
        splits_of(tiny_ham, splits=str(tmp_path / "split.csv"))
    assert len(splits_of(tiny_ham, splits=str(tmp_path / "split.csv"), allow_leaks=True)) == len(meta)
    args = ["train", "--data", tiny_ham, "--splits", tmp_path / "split.csv", "--out", tmp_path / "run"]
    cli.error(cli(*args), "train", "leaks", "1 of", "--allow-leaks")


def test_a_duplicate_pair_across_train_and_test_is_counted(tiny_ham: Path, tmp_path: Path) -> None:
    given = lesion_split(tiny_ham)
    train, test = given[given["split"] == "train"].iloc[0], given[given["split"] == "test"].iloc[0]
    pd.DataFrame({"from_img": [train["image_id"]], "to_img": [test["image_id"]]}).to_csv(
        tmp_path / "d.csv", index=False
    )
    given.to_csv(tmp_path / "split.csv", index=False)
    with pytest.raises(DataError, match=r"1 near-duplicate pair\(s\) of the duplicates file cross train and test"):
        splits_of(tiny_ham, splits=str(tmp_path / "split.csv"), duplicates=str(tmp_path / "d.csv"))


@pytest.mark.slow
def test_train_honours_the_given_split(cli, cli_ham: Path, tiny_run_settings, tmp_path: Path) -> None:
    given = lesion_split(cli_ham)
    given.to_csv(tmp_path / "split.csv", index=False)
    sets = [a for s in tiny_run_settings for a in ("--set", s)]
    cli.ok(cli("train", "--data", cli_ham, "--splits", tmp_path / "split.csv", "--out", tmp_path / "run", *sets))
    stored = pd.read_csv(tmp_path / "run" / "splits.csv")
    assert stored["split"].tolist() == given["split"].replace({"valid": "val"}).tolist()


def test_ablation_folds_come_from_a_fold_file(tiny_ham: Path, tmp_path: Path) -> None:
    from multimodal_lesion.data.user_splits import given_folds, given_split

    meta = pd.read_csv(tiny_ham / METADATA_FILE)
    codes = pd.factorize(meta["lesion_id"])[0]
    pd.DataFrame({"image_id": meta["image_id"], "fold": codes % 3}).to_csv(tmp_path / "folds.csv", index=False)
    dataset = read_dataset(tiny_ham)
    given = given_split(dataset, str(tmp_path / "folds.csv"))
    assert given is not None
    assert given_folds(dataset, given, 3, allow_leaks=False).tolist() == (codes % 3).tolist()
    with pytest.raises(DataError, match=r"not a fold number 0\.\.4 \(ablation.folds = 5"):
        given_folds(dataset, _with(given, "7"), 5, allow_leaks=False)


def _with(given, value: str):
    from multimodal_lesion.data.user_splits import GivenSplit

    values = given.values.copy()
    values.iloc[0] = value
    return GivenSplit(values, given.where, given.source)
