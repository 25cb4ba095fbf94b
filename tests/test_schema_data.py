"""Reading each schema preset's own file format, and what a bad schema or bad data ends with.

The tiny datasets (conftest) are written in each release's layout: ISIC 2019's one-hot ground truth
and metadata CSVs (CRLF) with the images elsewhere, ISIC 2020's table + duplicates file + a partial
image folder, PAD-UFES-20's 26 columns with ``UNK`` booleans and ``biopsed``, and no images.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from multimodal_lesion.data.encoder import MetadataEncoder
from multimodal_lesion.data.patient import subgroup_attributes
from multimodal_lesion.data.reader import read_dataset
from multimodal_lesion.data.schema import preset
from multimodal_lesion.data.splits import split_lesions
from multimodal_lesion.errors import DataError


def _read(root: Path, name: str, **kwargs: object):
    with pytest.warns(UserWarning):  # every read here has something to tell
        return read_dataset(root, preset(name), **kwargs)


def test_isic2019_csvs_over_images_kept_elsewhere(tiny_isic2019: tuple[Path, Path]) -> None:
    root, images = tiny_isic2019
    with pytest.raises(DataError, match=r"32 image\(s\) listed in .* \(40 of 72 found\).*--drop-missing"):
        read_dataset(root, preset("isic2019"), images=str(images))
    data = _read(root, "isic2019", images=str(images), drop_missing=True)
    meta = data.metadata
    assert len(meta) == 40 and set(meta["dx"]) == set(preset("isic2019").classes)
    assert (meta["dx"] == "scc").sum() == 4 and (meta["dx"] == "ak").sum() == 4
    truth = pd.read_csv(root / "ISIC_2019_Training_GroundTruth.csv").set_index("image")
    onehot = truth.loc[meta["image_id"], ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]]
    assert list(onehot.idxmax(axis=1).str.lower()) == list(meta["dx"])  # the 1-column of each row
    assert meta["path"].map(lambda p: Path(p).is_relative_to(images)).all()
    assert meta["lesion_id"].nunique() == 32  # 31 lesions + the image without a lesion id, its own group
    assert any("1 image(s) without a group id are each their own group: ISIC_0024345" in n for n in data.notes)
    assert any("(40 of 72 found)" in n and n.startswith("dropped 32") for n in data.notes)
    assert meta["age_approx"].isna().sum() > 0 and meta["age_approx"].dropna().between(0, 120).all()
    assert "UNK" not in meta.columns and "anatom_site_general" in meta.columns


def test_isic2020_binary_split_by_patient_with_duplicates_together(tiny_isic2020: Path) -> None:
    data = _read(tiny_isic2020, "isic2020", drop_missing=True)
    meta = data.metadata
    assert set(meta["dx"]) == {"other", "mel"} and data.schema.binary
    assert "diagnosis" not in meta.columns and "benign_malignant" not in meta.columns
    pair = meta.set_index("image_id").loc[["ISIC_0010000", "ISIC_0010003"]]
    assert pair["patient_id"].nunique() == 2 and pair["lesion_id"].nunique() == 1  # two patients, one group
    assert meta["lesion_id"].nunique() == meta["patient_id"].nunique() - 1
    for seed in range(5):
        splits = split_lesions(meta, test_size=0.25, val_size=0.25, seed=seed).assign(patient=meta["patient_id"])
        per_patient = splits.groupby("patient")["split"].nunique()
        groups = splits.groupby("lesion_id")["split"].nunique()
        assert (groups == 1).all()
        # a patient spans splits only through the duplicate pair that joins two patients
        assert set(per_patient.index[per_patient > 1]) <= set(pair["patient_id"])
        assert splits.set_index("image_id").loc[pair.index, "split"].nunique() == 1


def test_pad_ufes_20_without_images_reads_every_typed_feature(tiny_pad: Path) -> None:
    with pytest.raises(DataError, match=r"not found below"):
        read_dataset(tiny_pad, preset("pad_ufes_20"))
    data = _read(tiny_pad, "pad_ufes_20", images="none")
    meta, f = data.metadata, data.schema.features
    raw = pd.read_csv(tiny_pad / "metadata.csv", dtype=str, keep_default_na=False)
    assert len(meta) == len(raw) and not data.has_images and (meta["path"] == "").all()
    assert "biopsed" not in meta.columns and len(f.names) == 21
    assert list(meta["lesion_id"]) == list(raw["patient_id"])  # grouped by patient: lesion ids repeat
    for column in f.boolean:
        expected = raw[column].str.lower().replace({"unk": "unknown", "": "unknown"})
        assert list(meta[column]) == list(expected), column
    assert meta["diameter_2"].isna().all() and meta["fitspatrick"].dropna().between(1, 6).all()
    assert set(meta["region"]) <= {"arm", "face", "neck", "back", "chest"}
    encoder = MetadataEncoder.for_features(f).fit(meta)
    assert list(encoder.feature_groups_) == list(f.names)
    assert encoder.transform(meta).shape == (len(meta), 4 * 2 + sum(len(c) for c in encoder.categories_.values()))
    assert set(subgroup_attributes(meta, f)) == {*f.categorical, "age_band"}


def test_pad_ufes_20_booleans_outside_the_spellings_are_named(tiny_pad: Path) -> None:
    csv = tiny_pad / "metadata.csv"
    raw = pd.read_csv(csv, dtype=str, keep_default_na=False)
    raw.loc[4, "bleed"] = "sometimes"
    raw.to_csv(csv, index=False)
    with pytest.raises(
        DataError, match=r"metadata.csv: row 5 \(line 6\), column 'bleed': 'sometimes' is not a boolean"
    ):
        read_dataset(tiny_pad, preset("pad_ufes_20"), images="none")


def test_pad_ufes_20_with_images_finds_ids_written_with_their_extension(tmp_path: Path) -> None:
    from conftest import write_tiny_pad_ufes_20

    root = write_tiny_pad_ufes_20(tmp_path / "pad", images=True)
    data = _read(root, "pad_ufes_20")
    assert data.has_images and data.metadata["image_id"].str.endswith(".png").sum() == 0
    assert any("written with a file extension" in n for n in data.notes)


def test_ham10000_duplicates_file_merges_pairs_into_one_lesion(tiny_ham: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(
        "similarity,from_img,to_img\n0.98,ISIC_0024306.jpg,ISIC_0024309.jpg\n0.97,ISIC_0024310.jpg,ISIC_0024999.jpg\n"
    )
    plain = read_dataset(tiny_ham, preset("ham10000")).metadata
    with pytest.warns(
        UserWarning, match=r"1 pair\(s\) of images of one lesion kept in one group \(1 were in different"
    ):
        data = read_dataset(tiny_ham, dataclasses.replace(preset("ham10000"), duplicates=str(pairs)))
    meta = data.metadata
    assert meta["lesion_id"].nunique() == plain["lesion_id"].nunique() - 1
    ids = meta.set_index("image_id")["lesion_id"]
    assert ids["ISIC_0024306"] == ids["ISIC_0024309"]
    assert meta.drop(columns="lesion_id").equals(plain.drop(columns="lesion_id"))
    assert any("1 pair(s) naming images not in the data ignored" in n for n in data.notes)


# --- bad schema or bad data: one line naming the schema key, the file and the column, exit 2 ---------------


def _schema_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "schema.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("dataset", "features", "needles"),
    [
        ("", 'numeric = ["age", "weight"]', ["features.numeric", "metadata.csv", "'weight'"]),
        ('patient_column = "patient"', "", ["dataset.patient_column", "metadata.csv", "'patient'"]),
        ('key_class = "melanoma"', "", ["dataset.key_class", "schema.toml", "'melanoma'"]),
        ('leak_columns = ["region"]', "", ["features.categorical", "schema.toml", "'region'", "leak column"]),
        (
            'classes = ["bcc", "ack", "nev", "sek", "mel"]\nclass_names = []',
            "",
            ["metadata.csv", "column 'diagnostic'", "'SCC'"],
        ),
        ('image_dir = "../elsewhere"', "", ["dataset.image_dir", "outside the data root"]),
    ],
)
def test_a_bad_schema_or_data_is_one_cli_line(
    cli, tiny_pad: Path, tmp_path: Path, dataset: str, features: str, needles: list
) -> None:
    text = f'[dataset]\nextends = "pad_ufes_20"\n{dataset}\n' + (f"[features]\n{features}\n" if features else "")
    schema = _schema_file(tmp_path, text)
    images = () if "image_dir" in dataset else ("--images", "none")
    proc = cli("eda", "--data", tiny_pad, "--schema", schema, *images, "--out", tmp_path / "eda")
    cli.error(proc, "eda", *needles)


def test_biopsed_listed_as_a_feature_is_refused_on_the_command_line(cli, tiny_pad: Path, tmp_path: Path) -> None:
    listed = ", ".join(f'"{b}"' for b in (*preset("pad_ufes_20").features.boolean, "biopsed"))
    schema = _schema_file(tmp_path, f'[dataset]\nextends = "pad_ufes_20"\n[features]\nboolean = [{listed}]\n')
    proc = cli("train", "--data", tiny_pad, "--schema", schema, "--images", "none", "--out", tmp_path / "run")
    cli.error(proc, "train", str(schema), "features.boolean", "'biopsed' is a leak column")
    assert not (tmp_path / "run").exists()


def test_a_label_neither_a_class_nor_mapped_is_named(cli, tiny_isic2020: Path, tmp_path: Path) -> None:
    table = tiny_isic2020 / "ISIC_2020_Training_GroundTruth.csv"
    raw = pd.read_csv(table, dtype=str, keep_default_na=False)
    raw.loc[6, "target"] = "2"
    raw.to_csv(table, index=False)
    proc = cli("eda", "--data", tiny_isic2020, "--schema", "isic2020", "--drop-missing", "--out", tmp_path / "eda")
    cli.error(proc, "eda", "row 7 (line 8), column 'target'", "'2'", "dataset.classes", "dataset.label_map")


def test_an_image_path_escaping_the_root_is_refused(tiny_pad: Path, tmp_path: Path) -> None:
    raw = pd.read_csv(tiny_pad / "metadata.csv", dtype=str, keep_default_na=False)
    raw.loc[2, "img_id"] = "../../etc/passwd"
    raw.to_csv(tiny_pad / "metadata.csv", index=False)
    with pytest.raises(DataError, match=r"row 3 \(line 4\), column 'img_id': '../../etc/passwd' is not an image id"):
        read_dataset(tiny_pad, preset("pad_ufes_20"), images="none")


def test_relative_path_ids_below_the_image_dir(tmp_path: Path, tiny_ham_factory) -> None:
    root = tmp_path / "clinic"
    rng = np.random.default_rng(0)
    from PIL import Image

    rows = []
    for i in range(12):
        rel = f"visit_{i % 3}/img_{i}.png"
        (root / "images" / f"visit_{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "images" / rel)
        rows.append({"image": rel, "diagnosis": ["melanoma (in situ)", "nev", "bcc"][i % 3], "patient": f"p{i // 2}"})
    (root / "outside.png").write_bytes((root / "images" / rows[0]["image"]).read_bytes())
    (root / "images" / "visit_0" / "link.png").symlink_to(root / "outside.png")
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    schema = _schema_file(
        tmp_path,
        '[dataset]\nname = "clinic"\nmetadata = "labels.csv"\nimage_column = "image"\nimage_dir = "images"\n'
        'label_column = "diagnosis"\nclasses = ["mel", "nev", "bcc"]\ngroup_column = "patient"\n'
        '[dataset.label_map]\n"melanoma (in situ)" = "mel"\n',
    )
    from multimodal_lesion.data.schema_file import load_schema

    data = read_dataset(root, load_schema(schema))
    assert list(data.metadata["dx"][:3]) == ["mel", "nev", "bcc"] and data.metadata["lesion_id"].nunique() == 6
    assert data.metadata["path"].map(lambda p: Path(p).is_file()).all()
    raw = pd.DataFrame(rows)
    raw.loc[0, "image"] = "visit_0/link.png"
    raw.to_csv(root / "labels.csv", index=False)
    with pytest.raises(DataError, match="links outside the image root"):
        read_dataset(root, load_schema(schema))


def test_patient_groups_are_stratified_by_their_rarest_class(tiny_isic2020: Path) -> None:
    from multimodal_lesion.data.splits import fold_assignment, split_rule

    data = _read(tiny_isic2020, "isic2020", drop_missing=True)
    meta, rule = data.metadata, split_rule(data.schema)
    assert rule == "rarest" and split_rule(preset("ham10000")) == "majority"
    for seed in range(5):
        splits = split_lesions(meta, test_size=0.25, val_size=0.25, seed=seed, group_label=rule)
        mel = splits[meta["dx"] == "mel"]["split"].value_counts().reindex(["train", "val", "test"], fill_value=0)
        assert (abs(mel - np.array([4, 2, 2])) <= 1).all(), mel.to_dict()  # 8 melanomas: 50 / 25 / 25 %
        folds = fold_assignment(meta, 4, seed, rule)
        assert (folds[meta["dx"] == "mel"].value_counts().reindex(range(4), fill_value=0) == 2).all()


def test_one_hot_labels_need_exactly_one_column_set(tiny_isic2019: tuple[Path, Path]) -> None:
    root, images = tiny_isic2019
    truth = root / "ISIC_2019_Training_GroundTruth.csv"
    raw = pd.read_csv(truth, dtype=str, keep_default_na=False)
    raw.loc[2, ["MEL", "NV"]] = "1.0"
    raw.to_csv(truth, index=False)
    with pytest.raises(DataError, match=r"row 3 \(line 4\), column 'MEL': 2 of the one-hot label columns .* expected"):
        read_dataset(root, preset("isic2019"), images=str(images), drop_missing=True)
    raw.loc[2, ["MEL", "NV"]] = "0.0"
    raw.loc[2, "BCC"] = "yes"
    raw.to_csv(truth, index=False)
    with pytest.raises(DataError, match=r"row 3 \(line 4\), column 'BCC': 'yes' is not 0 or 1"):
        read_dataset(root, preset("isic2019"), images=str(images), drop_missing=True)


def test_split_command_keeps_a_duplicates_file_pair_together(cli, tiny_ham: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("similarity,from_img,to_img\n0.99,ISIC_0024306.jpg,ISIC_0024330.jpg\n")
    out = tmp_path / "splits.csv"
    proc = cli.ok(cli("split", "--data", tiny_ham, "--duplicates", pairs, "--folds", "5", "--out", out))
    assert any("1 pair(s) of images of one lesion kept in one group" in n for n in cli.notes(proc))
    splits = pd.read_csv(out).set_index("image_id")
    assert splits.loc["ISIC_0024306", "lesion_id"] == splits.loc["ISIC_0024330", "lesion_id"]
    assert splits.loc["ISIC_0024306", "fold"] == splits.loc["ISIC_0024330", "fold"]


# --- a user's own schema: the reader's rules come from the schema, messages in the user's words ------------


def _clinic(tmp_path: Path):
    from conftest import write_tiny_clinic

    from multimodal_lesion.data.schema_file import load_schema

    root = write_tiny_clinic(tmp_path / "clinic")
    return root, load_schema(root / "schema.toml")


def test_an_image_column_set_to_another_column_names_the_user_s_column_and_key(tmp_path: Path) -> None:
    """The user has no 'image_id': a repeated id is named by their column and the key that chose it."""
    root, schema = _clinic(tmp_path)
    with pytest.raises(DataError) as info:
        read_dataset(root, dataclasses.replace(schema, image_column="diagnosis"))
    message = str(info.value)
    assert message.startswith(f"{root / 'cases.csv'}: column 'diagnosis' (the image column, schema key ")
    assert "'dataset.image_column'): 3 duplicated id(s): naevus, melanoma, keratosis (rows 1, 2, 3, 4, 5, ...)" in (
        message
    )
    assert "image_id" not in message


def test_a_patient_grouped_split_speaks_of_patients(tmp_path: Path) -> None:
    root, schema = _clinic(tmp_path)
    meta = read_dataset(root, schema).metadata.iloc[:4]  # 2 patients of 2 classes: too few for 3 splits
    with pytest.raises(DataError, match=r"^split: 2 patient\(s\) cannot fill 3 non-empty splits/folds$"):
        split_lesions(meta, group_label="rarest")
    with pytest.warns(UserWarning) as caught:
        split_lesions(read_dataset(root, schema).metadata.iloc[:12], folds=3, test_size=0.2, group_label="rarest")
    assert any("class(es) with fewer patients than the 4 splits/folds" in str(w.message) for w in caught)
    assert all(w.category.__name__ == "Note" for w in caught)  # printed as 'note:' lines by the CLI


def test_masks_are_found_by_the_schema_s_suffix(tiny_ham: Path) -> None:
    for mask in (tiny_ham / "HAM10000_segmentations_lesion_tschandl").iterdir():
        mask.rename(mask.with_name(mask.name.replace("_segmentation.png", "_lesion.png")))
    schema = dataclasses.replace(preset("ham10000"), mask_suffix="_lesion.png")
    meta = read_dataset(tiny_ham, schema).metadata
    assert meta["mask_path"].map(lambda p: p.endswith("_lesion.png") and Path(p).is_file()).all()
    with pytest.warns(UserWarning, match=r"image\(s\) found but not listed .*: ISIC_0024306_lesion"):
        plain = read_dataset(tiny_ham, preset("ham10000")).metadata  # another suffix: no masks, extra images
    assert (plain["mask_path"] == "").all()


def test_a_release_layout_and_plain_ids_are_schema_keys(tmp_path: Path) -> None:
    """HAM10000's rules (fixed columns, plain ids) are keys any schema may set, read by the one reader."""
    root, schema = _clinic(tmp_path)
    layout = ("patient", "image", "diagnosis", "sex", "location", "elevation")
    fixed = dataclasses.replace(schema, columns=layout, plain_ids=("patient", "image"))
    meta = read_dataset(root, fixed).metadata
    in_layout = ["patient_id", "image_id", "dx", "sex", "location", "elevation"]  # canonical names, file order
    assert list(meta.columns) == [*in_layout, "lesion_id", "path", "mask_path"]
    raw = pd.read_csv(root / "cases.csv", dtype=str, keep_default_na=False)
    raw.loc[3, "image"] = "photos/case001_1"
    raw.to_csv(root / "cases.csv", index=False)
    with pytest.raises(DataError, match=r"row 4 \(line 5\), column 'image': 'photos/case001_1' is not a plain id"):
        read_dataset(root, fixed)
    raw.drop(columns="sex").to_csv(root / "cases.csv", index=False)
    with pytest.raises(DataError, match=r"not CLINIC-shaped: missing column\(s\) 'sex'; expected the columns"):
        read_dataset(root, fixed)
