"""Near-duplicate search on synthetic data with planted copies, and its outputs (CSV, duplicates file, page)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multimodal_lesion.data.constants import METADATA_FILE
from multimodal_lesion.data.synthetic import make_synthetic
from multimodal_lesion.runs.duplicates import (
    CHANCE_INLIERS,
    HALF_EVIDENCE,
    DuplicateSettings,
    PatientMatch,
    Side,
    candidate_pairs,
    nearest_neighbours,
    pair_score,
)

#: How each planted copy is made from its source image (a new image id and a new lesion id).
EDITS = {
    "resized": lambda im: im.resize((140, 105)).resize((200, 150)),
    "recompressed": lambda im: im,  # saved at JPEG quality 40 below
    "flipped": lambda im: im.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "rotated": lambda im: im.rotate(8, resample=Image.Resampling.BILINEAR, fillcolor=(200, 160, 140)),
    "flipped_rotated": lambda im: im.transpose(Image.Transpose.FLIP_TOP_BOTTOM).rotate(-6, fillcolor=(200, 160, 140)),
}

#: The embedding pass of a small real run: ImageNet EfficientNet-Lite0 (shipped offline) on small images.
SETTINGS = ["data.image_size=[96, 128]", "train.threads=1", "train.embed_batch=16"]


def plant_duplicates(root: Path) -> dict[str, str]:
    """Add one edited copy per entry of :data:`EDITS` of distinct single-image lesions; returns copy -> source."""
    meta = pd.read_csv(root / METADATA_FILE, dtype=str, keep_default_na=False)
    singles = meta[meta.groupby("lesion_id")["image_id"].transform("size") == 1]
    planted, rows = {}, []
    for k, (name, edit) in enumerate(EDITS.items()):
        source = singles.iloc[3 * k]
        path = next(root.glob(f"HAM10000_images_part_*/{source['image_id']}.jpg"))
        copy_id = f"ISIC_99{k:05d}"
        edit(Image.open(path).convert("RGB")).save(
            path.parent / f"{copy_id}.jpg", quality=40 if name == "recompressed" else 90
        )
        rows.append({**source.to_dict(), "image_id": copy_id, "lesion_id": f"HAM_99{k:05d}"})
        planted[copy_id] = source["image_id"]
    pd.concat([meta, pd.DataFrame(rows)]).to_csv(root / METADATA_FILE, index=False)
    return planted


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = make_synthetic(tmp_path_factory.mktemp("dup") / "synthetic", n=80, seed=3)
    (root / "synthetic.json").unlink()  # an edited copy: no longer the generator's own dataset
    return root, plant_duplicates(root)


@pytest.fixture(scope="module")
def searched(cli, planted, tmp_path_factory) -> Path:
    """``mmlesion duplicates`` run on the planted data: its output folder."""
    root, _ = planted
    out = tmp_path_factory.mktemp("dup-out") / "found"
    cli.ok(cli("duplicates", "--data", root, "--out", out, *[a for s in SETTINGS for a in ("--set", s)]))
    return out


def pairs_of(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "pairs.csv", dtype={"image_id_1": str, "image_id_2": str})


def test_every_planted_copy_is_its_sources_first_candidate(searched, planted) -> None:
    pairs = pairs_of(searched)
    _, copies = planted
    for copy, source in copies.items():
        mine = pairs[(pairs["image_id_1"] == copy) | (pairs["image_id_2"] == copy)]
        best = mine.sort_values("score", ascending=False).iloc[0]
        assert {best["image_id_1"], best["image_id_2"]} == {copy, source}, mine.head(3)
        place = best["rank_1"] if best["image_id_1"] == copy else best["rank_2"]
        assert place == 1


def test_only_the_planted_pairs_are_merged_and_split_reads_the_file(searched, planted, cli, tmp_path) -> None:
    root, copies = planted
    written = pd.read_csv(searched / "duplicates.csv", dtype=str)
    assert list(written.columns) == ["from_img", "to_img"]  # the columns HAM10000's --duplicates file has
    assert {frozenset(p) for p in written.itertuples(index=False)} == {frozenset(p) for p in copies.items()}
    pairs = pairs_of(searched)
    assert (pairs["group_1"] != pairs["group_2"]).all()  # pairs within one lesion are no news
    split = cli.ok(
        cli("split", "--data", root, "--out", tmp_path / "s.csv", "--duplicates", searched / "duplicates.csv")
    )
    assert f"{len(copies)} pair(s) of images of one lesion kept in one group" in split.stderr


def test_nearest_neighbours_skips_self_and_own_group() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    groups = np.arange(50) // 2
    idx, sims = nearest_neighbours(x, x, 3, query_groups=groups, pool_groups=groups, skip_self=True, block=7)
    assert (idx != np.arange(50)[:, None]).all() and (groups[idx] != groups[:, None]).all()
    brute = x @ x.T
    brute[groups[:, None] == groups[None, :]] = -np.inf
    assert np.allclose(sims, -np.sort(-brute, axis=1)[:, :3], atol=1e-6)


@pytest.mark.browser
def test_review_page_renders_in_chromium(searched, planted, chromium_page) -> None:
    _, copies = planted
    pairs = pairs_of(searched)
    page = chromium_page.page
    chromium_page.open(searched / "review.html")
    assert page.title().startswith("Near-duplicate review")
    rows = page.evaluate("Array.from(document.querySelectorAll('#pair-table tr.pair')).map(r => r.dataset.rank)")
    assert [int(r) for r in rows] == pairs["rank"].head(200).tolist()  # sorted by score, best first
    thumbnails = page.evaluate("Array.from(document.querySelectorAll('#pair-table img')).map(i => i.naturalWidth)")
    assert len(thumbnails) == 2 * len(rows) and min(thumbnails) > 0  # every thumbnail decoded
    marked = page.evaluate("document.querySelectorAll('#pair-table .label-differs').length")
    assert marked == int(pairs["labels_differ"].head(200).sum())
    assert page.evaluate("document.querySelectorAll('#pair-table .above').length") == len(copies)
    assert page.evaluate("document.querySelectorAll('#merge-table tbody tr').length") >= 5
    assert chromium_page.errors == [] and chromium_page.dialogs == []
    assert all(u.startswith(("file:", "data:")) for u in chromium_page.requests)


@pytest.mark.slow
def test_external_evaluation_counts_near_duplicates_of_the_training_images(cli, planted, tmp_path) -> None:
    root, copies = planted
    run = tmp_path / "run"
    sets = [*SETTINGS, "train.epochs=2", 'train.device="cpu"']
    cli.ok(cli("train", "--data", root, "--out", run, *[a for s in sets for a in ("--set", s)]))
    splits = pd.read_csv(run / "splits.csv").set_index("image_id")["split"]
    splits = splits.drop([*copies, *copies.values()])  # a planted copy and its source may sit on two sides
    meta = pd.read_csv(root / METADATA_FILE, dtype=str, keep_default_na=False)
    picked = [*splits.index[splits == "train"][:3], *splits.index[splits == "test"][:3]]
    chosen = meta[meta["image_id"].isin(picked)]
    other = tmp_path / "clinic"
    (other / "images").mkdir(parents=True)
    for k, image_id in enumerate(chosen["image_id"]):  # re-encoded copies under new ids
        with Image.open(next(root.glob(f"HAM10000_images_part_*/{image_id}.jpg"))) as im:
            im.convert("RGB").resize((180, 135)).save(other / "images" / f"ISIC_8{k:06d}.jpg", quality=70)
    renamed = {image_id: f"ISIC_8{k:06d}" for k, image_id in enumerate(chosen["image_id"])}
    chosen.assign(image_id=chosen["image_id"].map(renamed), lesion_id="HAM_8" + chosen["lesion_id"]).to_csv(
        other / METADATA_FILE, index=False
    )
    proc = cli.ok(cli("evaluate", "--run", run, "--data", other))
    metrics = json.loads((run / "external" / "clinic" / "metrics.json").read_text())
    near = metrics["near_duplicates_of_training"]
    expected = sorted(renamed[i] for i in chosen["image_id"] if splits[i] == "train")
    assert near["images"] == expected and near["n_images"] == 3
    assert near["without_them"]["calibrated"]["n_images"] == len(chosen) - 3
    assert "3 image(s) of" in proc.stdout and "near-duplicates of the run's training images" in proc.stdout
    again = cli.ok(cli("evaluate", "--run", run, "--data", other, "--key-vs-rest"))
    assert "the search made before" in again.stdout and "3 image(s) of" in again.stdout  # from the cache
    kvr = json.loads((run / "external" / "clinic-mel_vs_rest" / "metrics.json").read_text())
    assert kvr["near_duplicates_of_training"]["images"] == expected


def test_patient_match_needs_equal_or_unknown_features_and_close_ages() -> None:
    first = pd.DataFrame({"sex": ["male", "unknown", "female"], "age": [40, np.nan, 60]})
    second = pd.DataFrame({"sex": ["male", "female"], "age": [44, 50]})
    match = PatientMatch(first, second, ("unknown",))
    assert match(0, 3).tolist() == [[True, False], [True, True], [False, False]]  # 60 vs 50: ten years apart
    assert match.pairs(np.array([0, 2]), np.array([0, 1])).tolist() == [True, False]
    assert not PatientMatch(pd.DataFrame(index=range(2)), pd.DataFrame(index=range(3)), ()).informative


def test_chance_inliers_add_nothing_to_the_score_and_more_count_up_to_one() -> None:
    inliers = np.array([0, CHANCE_INLIERS, CHANCE_INLIERS + HALF_EVIDENCE, 1000])
    score = pair_score(np.full(4, 0.5), inliers, np.array([False, False, False, True]))
    assert score[0] == score[1] == 0.5  # up to the chance inliers of skin texture: no evidence
    assert score[2] == pytest.approx(1.0)  # HALF_EVIDENCE inliers beyond chance: half of it
    assert 1.7 < score[3] < 1.75  # nearly all of it, plus the same-patient bonus


def test_the_patient_candidate_set_reaches_past_the_overall_neighbours() -> None:
    """Images 0 and 39 are the only two of one patient, and each has 3 images closer to it than the other
    is: only the patient set (1 neighbour) makes the pair a candidate; the overall set (3) does not."""
    rng = np.random.default_rng(0)
    base, other = rng.normal(size=16), rng.normal(size=16)
    x = rng.normal(size=(40, 16)) * 2.0
    x[0:4] = base + rng.normal(size=(4, 16)) * 0.2  # image 0 and its 3 look-alikes
    x[36:40] = 0.5 * base + other + rng.normal(size=(4, 16)) * 0.2  # image 39 and its 3
    patient = pd.DataFrame({"sex": ["female"] + ["male"] * 38 + ["female"]})
    side = Side(x.astype(np.float32), np.zeros((40, 8, 8, 3), np.uint8), np.arange(40), patient)
    settings = DuplicateSettings(neighbours=3, patient_neighbours=1, top=10, threads=1)
    found = candidate_pairs(side, None, settings)
    pair = found[(found["i"] == 0) & (found["j"] == 39)]
    assert len(pair) == 1 and bool(pair["same_patient"].iloc[0])
    alone = candidate_pairs(dataclasses.replace(side, patient=None), None, settings)
    assert not ((alone["i"] == 0) & (alone["j"] == 39)).any()  # 39 is not among 0's 3 nearest
