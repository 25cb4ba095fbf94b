"""The HAM10000 reader and image/mask decoding, on real files: the tiny fixture and corrupt copies of it."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multimodal_lesion.data.constants import CLASSES, MASK_DIR, MASK_SUFFIX, METADATA_COLUMNS, METADATA_FILE
from multimodal_lesion.data.dataset import LesionDataset
from multimodal_lesion.data.ham10000 import read_ham10000
from multimodal_lesion.data.images import load_mask, load_rgb
from multimodal_lesion.data.reader import read_dataset
from multimodal_lesion.data.schema import preset
from multimodal_lesion.errors import DataError


def _csv(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / METADATA_FILE, dtype=str, keep_default_na=False)


def _write(root: Path, df: pd.DataFrame) -> None:
    df.to_csv(root / METADATA_FILE, index=False)


def _image(root: Path, image_id: str) -> Path:
    return next(p for p in root.rglob(f"{image_id}.jpg"))


def _error(root: Path, **kwargs: object) -> str:
    """Read ``root`` expecting a DataError; return its (one-line) message."""
    with pytest.raises(DataError) as info:
        read_ham10000(root, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- reading a good folder ------------------------------------------------------------------------


def test_reads_official_layout(tiny_ham: Path) -> None:
    dataset = read_ham10000(tiny_ham)
    meta = dataset.metadata
    assert isinstance(dataset, LesionDataset) and dataset.root == tiny_ham.resolve() and dataset.notes == []
    assert list(meta.columns) == [*METADATA_COLUMNS, "path", "mask_path"]
    assert isinstance(meta.index, pd.RangeIndex) and len(meta) == len(_csv(tiny_ham))
    assert list(meta.image_id) == list(_csv(tiny_ham).image_id)  # CSV order kept
    assert set(meta.dx) <= set(CLASSES) and (meta.dx_type == "histo").all()
    assert all(
        Path(p).is_absolute() and Path(p).is_file() and Path(p).stem == i
        for p, i in zip(meta.path, meta.image_id, strict=True)
    )
    assert all(Path(m).name == f"{i}{MASK_SUFFIX}" for m, i in zip(meta.mask_path, meta.image_id, strict=True))
    assert meta.age.dtype == float and meta.age.isna().any()  # missing ages kept as NaN
    assert {"unknown"} <= set(meta.sex) and {"unknown"} <= set(meta.localization)


def test_reads_flat_folder_without_masks(tiny_ham: Path) -> None:
    for path in list(tiny_ham.rglob("*.jpg")):
        path.rename(tiny_ham / path.name)
    shutil.rmtree(tiny_ham / MASK_DIR)
    meta = read_ham10000(tiny_ham).metadata
    assert all(Path(p).parent == tiny_ham.resolve() for p in meta.path)
    assert (meta.mask_path == "").all()


def test_missing_values_are_kept(tiny_ham: Path) -> None:
    df = _csv(tiny_ham)
    df.loc[0, ["age", "sex", "localization"]] = ["", "", ""]
    df.loc[1, ["sex", "localization"]] = [" Male ", "Lower Extremity"]
    _write(tiny_ham, df)
    meta = read_ham10000(tiny_ham).metadata
    assert np.isnan(meta.age[0]) and meta.sex[0] == "unknown" and meta.localization[0] == "unknown"
    assert meta.sex[1] == "male" and meta.localization[1] == "lower extremity"


def test_fingerprint_tracks_csv_and_files(tiny_ham: Path) -> None:
    dataset = read_ham10000(tiny_ham)
    first = dataset.fingerprint
    assert first == dataset.fingerprint == read_ham10000(tiny_ham).fingerprint
    assert len(first) == 64 and int(first, 16) >= 0
    with open(dataset.metadata.path[3], "ab") as fh:  # an image changes on disk
        fh.write(b"\0")
    assert dataset.fingerprint != first
    second = dataset.fingerprint
    df = _csv(tiny_ham)
    df.loc[0, "age"] = "33.0"
    _write(tiny_ham, df)
    assert read_ham10000(tiny_ham).fingerprint != second


# --- bad CSVs: each names the file and the row / column ---------------------------------------------


def test_missing_folder_or_csv(tmp_path: Path) -> None:
    assert "not a folder" in _error(tmp_path / "nowhere")
    assert METADATA_FILE in _error(tmp_path) and "not found" in _error(tmp_path)


def test_empty_csv(tiny_ham: Path) -> None:
    (tiny_ham / METADATA_FILE).write_text("")
    message = _error(tiny_ham)
    assert METADATA_FILE in message and "empty" in message


def test_header_only_csv(tiny_ham: Path) -> None:
    (tiny_ham / METADATA_FILE).write_text(",".join(METADATA_COLUMNS) + "\n")
    message = _error(tiny_ham)
    assert METADATA_FILE in message and "no rows" in message


def test_ragged_csv(tiny_ham: Path) -> None:
    with open(tiny_ham / METADATA_FILE, "a") as fh:
        fh.write("HAM_1,ISIC_1,nv,histo,40,male,back,extra,fields\n")
    message = _error(tiny_ham)
    assert METADATA_FILE in message and "not a readable CSV" in message


def test_missing_column(tiny_ham: Path) -> None:
    _write(tiny_ham, _csv(tiny_ham).drop(columns="localization"))
    message = _error(tiny_ham)
    assert METADATA_FILE in message and "missing column(s) 'localization'" in message


def test_renamed_column(tiny_ham: Path) -> None:
    _write(tiny_ham, _csv(tiny_ham).rename(columns={"dx": "diagnosis"}))
    message = _error(tiny_ham)
    assert "missing column(s) 'dx'" in message and "unexpected column(s) 'diagnosis'" in message


def test_extra_column(tiny_ham: Path) -> None:
    _write(tiny_ham, _csv(tiny_ham).assign(dataset="vidir"))
    data = read_ham10000(tiny_ham)  # newer HAM10000 metadata carries a `dataset` column: read, noted, dropped
    assert any("ignored column(s) not used by the package: 'dataset'" in n for n in data.notes)
    assert "dataset" not in data.metadata.columns


def test_unknown_dx(tiny_ham: Path) -> None:
    df = _csv(tiny_ham)
    df.loc[2, "dx"] = "melanoma"
    _write(tiny_ham, df)
    message = _error(tiny_ham)
    assert METADATA_FILE in message and "row 3 (line 4), column 'dx'" in message and "'melanoma'" in message


def test_duplicate_image_id(tiny_ham: Path) -> None:
    df = _csv(tiny_ham)
    df.loc[5, "image_id"] = df.loc[4, "image_id"]
    _write(tiny_ham, df)
    message = _error(tiny_ham)
    assert "column 'image_id'" in message and df.loc[4, "image_id"] in message and "rows 5, 6" in message


@pytest.mark.parametrize(
    "bad_id",
    [
        "../ISIC_0024306",
        "part/ISIC_0024306",
        "a\\b",
        "..",
        "ISIC..1",
        "<script>alert(1)</script>",
        '"><img src=x onerror=alert(1)>',
        "ISIC'1",
        "",
        "with space",
        "/etc/passwd",
    ],
)
def test_image_id_must_be_a_plain_stem(tiny_ham: Path, bad_id: str) -> None:
    df = _csv(tiny_ham)
    df.loc[6, "image_id"] = bad_id
    _write(tiny_ham, df)
    message = _error(tiny_ham)
    assert "row 7 (line 8), column 'image_id'" in message and "not a plain id" in message


def test_lesion_id_must_be_plain(tiny_ham: Path) -> None:
    df = _csv(tiny_ham)
    df.loc[0, "lesion_id"] = "<b>HAM</b>"
    _write(tiny_ham, df)
    assert "row 1 (line 2), column 'lesion_id'" in _error(tiny_ham)


@pytest.mark.parametrize("bad_age", ["-5", "121", "abc", "inf", "40 years"])
def test_bad_age(tiny_ham: Path, bad_age: str) -> None:
    df = _csv(tiny_ham)
    df.loc[8, "age"] = bad_age
    _write(tiny_ham, df)
    message = _error(tiny_ham)
    assert "row 9 (line 10), column 'age'" in message and repr(bad_age) in message


def test_unknown_sex_and_localization_become_unknown_and_are_reported(tiny_ham: Path) -> None:
    df = _csv(tiny_ham)
    df.loc[3, "sex"] = "other"
    df.loc[4, "localization"] = "<script>"
    _write(tiny_ham, df)
    dataset = read_ham10000(tiny_ham)
    assert dataset.metadata.sex[3] == "unknown" and dataset.metadata.localization[4] == "unknown"
    sex_note = next(n for n in dataset.notes if "'sex'" in n)
    loc_note = next(n for n in dataset.notes if "'localization'" in n)
    assert "'other'" in sex_note and "rows 4" in sex_note
    assert "'<script>'" in loc_note and "rows 5" in loc_note


# --- files: missing, unlisted, duplicated, empty, outside the root ----------------------------------


def test_listed_image_missing(tiny_ham: Path) -> None:
    ids = list(_csv(tiny_ham).image_id[:3])
    for image_id in ids:
        _image(tiny_ham, image_id).unlink()
    message = _error(tiny_ham)
    assert "3 image(s) listed" in message and all(i in message for i in ids) and "drop" in message


def test_drop_missing_drops_and_reports(tiny_ham: Path) -> None:
    n_rows = len(_csv(tiny_ham))
    gone = _csv(tiny_ham).image_id[10]
    _image(tiny_ham, gone).unlink()
    dataset = read_ham10000(tiny_ham, drop_missing=True)
    assert len(dataset.metadata) == n_rows - 1 and gone not in set(dataset.metadata.image_id)
    assert isinstance(dataset.metadata.index, pd.RangeIndex)
    assert any("dropped 1 image(s)" in n and gone in n for n in dataset.notes)


def test_unlisted_image_is_reported_not_fatal(tiny_ham: Path) -> None:
    shutil.copy(_image(tiny_ham, _csv(tiny_ham).image_id[0]), tiny_ham / "ISIC_9999999.jpg")
    dataset = read_ham10000(tiny_ham)
    assert "ISIC_9999999" not in set(dataset.metadata.image_id)
    assert any("not listed" in n and "ISIC_9999999" in n for n in dataset.notes)


def test_a_lesion_with_images_of_two_diagnoses_is_noted_in_ham10000_s_words(tiny_ham: Path) -> None:
    df = _csv(tiny_ham)
    lesion = df.lesion_id[0]  # lesion 0 has two images (conftest)
    df.loc[1, "dx"] = "nv" if df.dx[0] != "nv" else "mel"
    _write(tiny_ham, df)
    notes = read_ham10000(tiny_ham).notes
    assert notes == [
        f"HAM10000_metadata.csv: 1 lesion(s) with images of different 'dx': {lesion} "
        "(splits use each lesion's most frequent dx)"
    ]


def test_only_the_release_s_own_unknown_spelling_is_silent(tiny_ham: Path) -> None:
    """HAM10000 writes 'unknown'; a 'nan' left by a spreadsheet is read as unknown too, and said (as always)."""
    df = _csv(tiny_ham)
    df.loc[2, "sex"], df.loc[3, "sex"] = "nan", "unknown"
    _write(tiny_ham, df)
    dataset = read_dataset(tiny_ham, preset("ham10000"))
    assert list(dataset.metadata.sex[2:4]) == ["unknown", "unknown"]
    assert dataset.notes == [
        "HAM10000_metadata.csv: column 'sex': 1 row(s) with unrecognised value(s) 'nan' read as 'unknown' (rows 3)"
    ]


def test_image_found_twice(tiny_ham: Path) -> None:
    image_id = _csv(tiny_ham).image_id[0]
    (tiny_ham / "copy").mkdir()
    shutil.copy(_image(tiny_ham, image_id), tiny_ham / "copy" / f"{image_id}.jpg")
    message = _error(tiny_ham)
    assert f"'{image_id}' found twice" in message


def test_empty_image_file(tiny_ham: Path) -> None:
    path = _image(tiny_ham, _csv(tiny_ham).image_id[1])
    path.write_bytes(b"")
    message = _error(tiny_ham)
    assert str(path.resolve()) in message and "0 bytes" in message


def test_link_outside_root_is_refused(tiny_ham: Path, tmp_path: Path) -> None:
    path = _image(tiny_ham, _csv(tiny_ham).image_id[2])
    outside = tmp_path / "outside.jpg"
    path.rename(outside)
    path.symlink_to(outside)
    message = _error(tiny_ham)
    assert path.name in message and "outside the data root" in message


def test_linked_folder_is_not_followed(tiny_ham: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    (tiny_ham / "HAM10000_images_part_2").rename(elsewhere)
    (tiny_ham / "HAM10000_images_part_2").symlink_to(elsewhere)
    message = _error(tiny_ham)
    assert "listed" in message and "not found" in message


# --- decoding images --------------------------------------------------------------------------------


def _save(path: Path, img: Image.Image, **kwargs: object) -> Path:
    img.save(path, **kwargs)
    return path


@pytest.mark.parametrize(
    "mode,ext", [("L", "png"), ("LA", "png"), ("RGBA", "png"), ("P", "png"), ("1", "png"), ("CMYK", "jpg")]
)
def test_load_rgb_converts_8bit_modes(tmp_path: Path, mode: str, ext: str) -> None:
    base = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8))
    path = _save(tmp_path / f"x.{ext}", base.convert(mode))
    with Image.open(path) as check:
        assert check.mode == mode  # the file really is in that mode
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (40, 30) and np.asarray(out).dtype == np.uint8


@pytest.mark.parametrize(
    "array,ext,expected",
    [
        (np.full((30, 40), 65535, np.uint16), "png", 255),  # 16-bit PNG opens as I;16
        (np.full((30, 40), 32768, np.uint16), "png", 128),
        (np.full((30, 40), 32768, np.int32), "tiff", 128),  # 32-bit integer (I)
        (np.full((30, 40), 0.5, np.float32), "tiff", 128),  # float (F), full scale 1.0
    ],
)
def test_load_rgb_scales_wide_modes(tmp_path: Path, array: np.ndarray, ext: str, expected: int) -> None:
    path = _save(tmp_path / f"x.{ext}", Image.fromarray(array))
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (40, 30)
    assert np.asarray(out).dtype == np.uint8 and (np.asarray(out) == expected).all()  # scaled, not clipped


def test_load_rgb_reads_fixture_jpeg(tiny_ham: Path) -> None:
    img = load_rgb(read_ham10000(tiny_ham).metadata.path[0])
    assert img.mode == "RGB" and img.size == (200, 150)


def test_truncated_jpeg(tiny_ham: Path) -> None:
    path = _image(tiny_ham, _csv(tiny_ham).image_id[0])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        load_rgb(path)
    assert str(path) in str(info.value)


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(os.urandom(2000))
    with pytest.raises(DataError, match=re.escape("junk.jpg: cannot decode")):
        load_rgb(junk)
    with pytest.raises(DataError, match=re.escape("nope.jpg: image file not found")):
        load_rgb(tmp_path / "nope.jpg")


def _png_claiming(path: Path, width: int, height: int) -> Path:
    """A tiny PNG whose header claims ``width`` x ``height``: what a decompression bomb looks like unopened."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("width,height", [(8000, 7000), (10000, 10000), (30000, 30000)])
def test_decompression_bomb(tmp_path: Path, width: int, height: int) -> None:
    path = _png_claiming(tmp_path / "bomb.png", width, height)
    with pytest.raises(DataError, match="decompression bomb") as info:
        load_rgb(path)
    assert str(path) in str(info.value)


def test_pixel_limit_is_a_parameter(tiny_ham: Path) -> None:
    path = _image(tiny_ham, _csv(tiny_ham).image_id[0])
    with pytest.raises(DataError, match="200x150 pixels"):
        load_rgb(path, max_pixels=1000)


# --- masks ------------------------------------------------------------------------------------------


def test_load_mask_thresholds_at_128(tmp_path: Path) -> None:
    arr = np.array([[0, 127, 128, 255]], np.uint8).repeat(2, axis=0)
    mask = load_mask(_save(tmp_path / f"m{MASK_SUFFIX}", Image.fromarray(arr)))
    assert mask.dtype == bool and mask.tolist() == [[False, False, True, True]] * 2


def test_load_mask_of_fixture(tiny_ham: Path) -> None:
    meta = read_ham10000(tiny_ham).metadata
    mask = load_mask(meta.mask_path[0], expected_size=(200, 150))
    assert mask.shape == (150, 200) and mask[50:100, 70:130].all() and mask.sum() == 50 * 60
    small = load_mask(meta.mask_path[0], size=(100, 75))
    assert small.shape == (75, 100) and small.sum() == 25 * 30


def test_mask_of_wrong_size(tiny_ham: Path) -> None:
    path = Path(read_ham10000(tiny_ham).metadata.mask_path[0])
    Image.new("L", (64, 64)).save(path)
    with pytest.raises(DataError, match="mask is 64x64 but its image is 200x150") as info:
        load_mask(path, expected_size=(200, 150))
    assert str(path) in str(info.value)
    assert load_mask(path, size=(200, 150)).shape == (150, 200)  # resizing was asked for


# --- the real data ----------------------------------------------------------------------------------


@pytest.mark.real_data
def test_reads_real_ham10000(real_data_root: Path) -> None:
    dataset = read_ham10000(real_data_root)
    meta = dataset.metadata
    assert dataset.notes == []
    assert len(meta) == 10015 and meta.lesion_id.nunique() == 7470
    assert meta.dx.value_counts().to_dict() == {
        "nv": 6705,
        "mel": 1113,
        "bkl": 1099,
        "bcc": 514,
        "akiec": 327,
        "vasc": 142,
        "df": 115,
    }
    assert meta.age.isna().sum() == 57 and (meta.sex == "unknown").sum() == 57
    assert (meta.localization == "unknown").sum() == 234 and (meta.mask_path != "").all()
    img = load_rgb(meta.path[0])
    mask = load_mask(meta.mask_path[0], expected_size=img.size)
    assert img.size == (200, 150) and 0 < mask.mean() < 1
    assert len(dataset.fingerprint) == 64


#: sha256 of the real HAM10000's table as the dedicated HAM10000 reader read it (commit 57cbeb9, before the
#: generic reader took over through the preset): rows, order, values, dtypes (paths relative to the root).
REAL_TABLE_SHA256 = "88243d0abd8908dbad099127ea07e773cbeffe0574c6239a15467d7b737578d0"


def _table_digest(meta: pd.DataFrame, root: Path) -> str:
    relative = meta.assign(**{c: meta[c].str.removeprefix(f"{root}/") for c in ("path", "mask_path")})
    text = relative.to_csv(index=False, na_rep="NaN", float_format="%.17g")
    text += "\n" + ",".join(f"{c}:{t}" for c, t in relative.dtypes.items())
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.real_data
def test_the_generic_reader_reads_real_ham10000_as_the_dedicated_reader_did(real_data_root: Path) -> None:
    """HAM10000's rules live in its preset now; the table every result rests on must not move."""
    dataset = read_dataset(real_data_root, preset("ham10000"))
    meta = dataset.metadata
    assert list(meta.columns) == [*METADATA_COLUMNS, "path", "mask_path"] and dataset.notes == []
    assert meta.age.dtype == np.float64 and all(
        str(meta[c].dtype) in ("str", "string", "object") for c in meta if c != "age"
    )
    assert (meta.dx_type == "follow_up").sum() == 3704  # the leak column stays in the table (the data report)
    assert _table_digest(meta, dataset.root) == REAL_TABLE_SHA256
    pd.testing.assert_frame_equal(meta, read_ham10000(real_data_root).metadata)
