"""The synthetic default dataset: official layout, determinism, and the planted structure."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from multimodal_lesion.data import synthetic
from multimodal_lesion.data.constants import (
    LOCALIZATIONS,
    MASK_DIR,
    MASK_SUFFIX,
    METADATA_COLUMNS,
    METADATA_FILE,
    SEXES,
    UNKNOWN,
)
from multimodal_lesion.data.ham10000 import read_ham10000
from multimodal_lesion.data.synthetic import PLANTED, make_synthetic
from multimodal_lesion.errors import ConfigError


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default-size dataset, written once for this module (~10 s)."""
    return make_synthetic(tmp_path_factory.mktemp("synth") / "dataset", n=1000, seed=0)


@pytest.fixture(scope="module")
def meta(synth: Path) -> pd.DataFrame:
    return pd.read_csv(synth / METADATA_FILE)


def _image_paths(root: Path) -> dict[str, Path]:
    return {p.stem: p for p in root.glob("HAM10000_images_part_*/*.jpg")}


def _pixels(root: Path) -> dict[str, bytes]:
    """Decoded pixels of every image and mask, hashed, keyed by file name."""
    files = sorted(root.glob("*/*.jpg")) + sorted(root.glob(f"{MASK_DIR}/*.png"))
    return {p.name: hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest() for p in files}


def test_official_layout_and_columns(synth: Path, meta: pd.DataFrame) -> None:
    assert list(meta.columns) == list(METADATA_COLUMNS)
    assert len(meta) == 1000 and meta.image_id.is_unique
    assert meta.image_id.str.fullmatch(r"ISIC_\d{7}").all()
    assert meta.lesion_id.str.fullmatch(r"HAM_\d{7}").all()
    images = _image_paths(synth)
    assert set(images) == set(meta.image_id)
    assert {p.parent.name for p in images.values()} == {"HAM10000_images_part_1", "HAM10000_images_part_2"}
    masks = {p.name for p in (synth / MASK_DIR).iterdir()}
    assert masks == {f"{i}{MASK_SUFFIX}" for i in meta.image_id}
    assert not list(synth.parent.glob(".dataset.*")), "temporary folders left behind"


def test_the_data_layer_reads_it_without_complaint(synth: Path) -> None:
    dataset = read_ham10000(synth)
    assert dataset.notes == []
    assert len(dataset.metadata) == 1000 and (dataset.metadata.mask_path != "").all()


def test_metadata_values_follow_the_ham10000_vocabulary(meta: pd.DataFrame) -> None:
    ages = meta.age.dropna()
    assert ((ages % 5 == 0) & ages.between(0, 85)).all()
    assert set(meta.sex) <= {*SEXES, UNKNOWN}
    assert set(meta.localization) <= {*LOCALIZATIONS, UNKNOWN}
    assert meta.age.isna().any() and (meta.localization == UNKNOWN).any()
    for dx, table in synthetic.DX_TYPE_COUNTS.items():
        assert set(meta.loc[meta.dx == dx, "dx_type"]) <= set(table)


def test_images_are_200x150_rgb_and_masks_match(synth: Path, meta: pd.DataFrame) -> None:
    images = _image_paths(synth)
    areas = []
    for image_id in meta.image_id[::25]:
        img = Image.open(images[image_id])
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (200, 150))
        mask = Image.open(synth / MASK_DIR / f"{image_id}{MASK_SUFFIX}")
        assert (mask.mode, mask.size) == ("L", (200, 150))
        values = np.asarray(mask)
        assert set(np.unique(values)) == {0, 255}
        areas.append((values == 255).mean())
    # lesions sized like the real masks (median 24% of the image), none filling the frame
    assert min(areas) > 0.04 and max(areas) < 0.75 and 0.15 < np.median(areas) < 0.35, areas


def test_every_class_present_with_flattened_real_imbalance(meta: pd.DataFrame) -> None:
    counts = meta.dx.value_counts()
    assert counts.to_dict() == synthetic.class_image_counts(1000)
    assert counts.idxmax() == "nv" and counts.min() >= 15
    assert all(sum(synthetic.class_image_counts(n).values()) == n for n in (1, 7, 50, 999))
    assert min(synthetic.class_image_counts(7).values()) == 1


def test_multi_image_lesions_share_metadata_and_blob(synth: Path, meta: pd.DataFrame) -> None:
    per_lesion = meta.groupby("lesion_id").size()
    assert 0.15 < (per_lesion > 1).mean() < 0.45
    patient = meta.groupby("lesion_id")[["dx", "dx_type", "age", "sex", "localization"]].nunique(dropna=False)
    assert (patient == 1).all().all()
    lesion = per_lesion[per_lesion > 1].index[0]
    ids = meta.loc[meta.lesion_id == lesion, "image_id"].tolist()
    masks = [np.asarray(Image.open(synth / MASK_DIR / f"{i}{MASK_SUFFIX}")) > 127 for i in ids]
    area = [m.sum() for m in masks]
    assert max(area) / min(area) < 1.35, "views of one lesion are the same blob, slightly jittered"
    assert not all(np.array_equal(masks[0], m) for m in masks[1:]), "views differ by a small jitter"


def test_deterministic_by_seed(tmp_path: Path) -> None:
    a = make_synthetic(tmp_path / "a", n=40, seed=3)
    b = make_synthetic(tmp_path / "b", n=40, seed=3)
    c = make_synthetic(tmp_path / "c", n=40, seed=4)
    assert (a / METADATA_FILE).read_bytes() == (b / METADATA_FILE).read_bytes()
    assert _pixels(a) == _pixels(b)
    assert (a / METADATA_FILE).read_bytes() != (c / METADATA_FILE).read_bytes()
    first = sorted((a / "HAM10000_images_part_1").iterdir())[0]
    other = sorted((c / "HAM10000_images_part_1").iterdir())[0]
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(other)))


def test_reuses_an_identical_dataset_and_replaces_another(tmp_path: Path) -> None:
    out = make_synthetic(tmp_path / "dataset", n=12, seed=0)
    stamp = (out / METADATA_FILE).stat().st_mtime_ns
    assert make_synthetic(out, n=12, seed=0) == out
    assert (out / METADATA_FILE).stat().st_mtime_ns == stamp
    make_synthetic(out, n=15, seed=1)
    assert len(pd.read_csv(out / METADATA_FILE)) == 15
    assert len(list(out.glob("*/*.jpg"))) == 15
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset"], "no temporary folders left"


def test_refuses_a_foreign_folder_and_a_bad_n(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not a synthetic dataset"):
        make_synthetic(foreign, n=5)
    assert (foreign / "notes.txt").read_text() == "keep me"
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="positive integer"):
            make_synthetic(tmp_path / "x", n=bad)


def _age_auroc(ages: pd.Series, older: pd.Series) -> float:
    known = ages.notna()
    return roc_auc_score(older[known], ages[known])


def test_planted_age_separates_the_ambiguous_pairs(meta: pd.DataFrame) -> None:
    """Within each pair the age AUROC is far above the real data's (computed from the real tables)."""
    assert PLANTED["informative_feature"] == "age"
    for older, younger in (("mel", "nv"), ("akiec", "bkl")):
        assert {older, younger} in [set(p) for p in PLANTED["ambiguous_pairs"]]
        pair = meta[meta.dx.isin([older, younger])]
        planted = _age_auroc(pair.age, pair.dx == older)
        grid = np.array(synthetic.AGE_GRID * 2, float)
        weights = np.r_[synthetic.AGE_COUNTS[older], synthetic.AGE_COUNTS[younger]]
        label = np.r_[np.ones(len(synthetic.AGE_GRID)), np.zeros(len(synthetic.AGE_GRID))]
        real = roc_auc_score(label, grid, sample_weight=weights)
        assert planted > 0.9 > real + 0.1, (older, younger, planted, real)


def _mask_colour_stats(root: Path, meta: pd.DataFrame) -> np.ndarray:
    """Mean and standard deviation of R, G, B inside each image's mask."""
    images = _image_paths(root)
    rows = []
    for image_id in meta.image_id:
        img = np.asarray(Image.open(images[image_id]), np.float32)
        mask = np.asarray(Image.open(root / MASK_DIR / f"{image_id}{MASK_SUFFIX}")) > 127
        rows.append(np.r_[img[mask].mean(0), img[mask].std(0)])
    return np.array(rows)


def test_colour_inside_the_mask_separates_looks_but_not_the_pairs(synth: Path, meta: pd.DataFrame) -> None:
    """Nearest-centroid on the blob's colour statistics, fitted on half the lesions, finds the look."""
    stats = _mask_colour_stats(synth, meta)
    z = (stats - stats.mean(0)) / stats.std(0)
    group = meta.dx.map(synthetic.VISUAL_GROUP).to_numpy()
    train = meta.lesion_id.map(lambda s: int(s[4:]) % 2 == 0).to_numpy()
    looks = sorted(set(group))
    centroids = np.stack([z[train & (group == g)].mean(0) for g in looks])
    nearest = np.array(looks)[np.argmin(((z[~train, None, :] - centroids) ** 2).sum(-1), axis=1)]
    assert (nearest == group[~train]).mean() > 0.95
    pigmented = meta.dx.isin(["mel", "nv"]).to_numpy()
    for column in range(stats.shape[1]):
        auroc = roc_auc_score(meta.dx[pigmented] == "mel", stats[pigmented, column])
        assert abs(auroc - 0.5) < 0.15, "mel and nv must look alike"
