"""External validation, batch prediction and loading a GPU run on the CPU, on a real tiny run (issue 12).

One tiny frozen run is trained on a tiny HAM10000-layout dataset; "other" datasets are written with
image ids the run never saw, in square images (another aspect ratio than the run's 48x64 input).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from multimodal_lesion.config import load_config
from multimodal_lesion.data.constants import METADATA_FILE
from multimodal_lesion.data.schema import preset
from multimodal_lesion.errors import CheckpointError
from multimodal_lesion.runs import Case, Predictor, fit_image, load_model, predict_case, predict_image, predict_table
from multimodal_lesion.training.external import patient_columns, scored_targets
from multimodal_lesion.workflows import train_run

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def run(
    tmp_path_factory: pytest.TempPathFactory, tiny_run_settings: list[str], tiny_ham_factory: Callable[..., Path]
) -> tuple[Path, Path]:
    """(a finished tiny frozen concat run, its data root)."""
    os.environ["MMLESION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    root = tiny_ham_factory(tmp_path_factory.mktemp("data") / "dataset", n_lesions=42)
    out = tmp_path_factory.mktemp("runs") / "concat"
    train_run(load_config(None, [*tiny_run_settings, f'data.root="{root}"']), out, show=False)
    return out, root


def write_other(source: Path, dest: Path, side: int = 120, first: int = 9_000_000) -> Path:
    """``source`` (HAM10000 layout) as a dataset the run never saw: new image and lesion ids, square images."""
    df = pd.read_csv(source / METADATA_FILE)
    new_ids = {old: f"ISIC_{first + k:07d}" for k, old in enumerate(df.image_id)}
    (dest / "images").mkdir(parents=True)
    for old, new in new_ids.items():
        with Image.open(next(source.rglob(f"{old}.jpg"))) as im:
            im.convert("RGB").resize((side, side)).save(dest / "images" / f"{new}.jpg", quality=90)
    df["image_id"] = df.image_id.map(new_ids)
    df["lesion_id"] = df.lesion_id.str.replace("HAM_", "HAM_9", regex=False)
    df.to_csv(dest / METADATA_FILE, index=False)
    return dest


@pytest.fixture(scope="module")
def other(run: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_other(run[1], tmp_path_factory.mktemp("other") / "clinic_b")


# --- external evaluation ----------------------------------------------------------------------------


@pytest.mark.slow
def test_new_data_is_scored_externally_with_the_run_s_calibration(cli, run: tuple[Path, Path], other: Path) -> None:
    folder, _ = run
    own_eval = sorted(p.name for p in (folder / "eval").rglob("*")) if (folder / "eval").exists() else []
    proc = cli.ok(cli("evaluate", "--run", folder, "--data", other))
    result = folder / "external" / "clinic_b"
    metrics = json.loads((result / "metrics.json").read_text())
    n = len(pd.read_csv(other / METADATA_FILE))
    assert metrics["external"]["calibrated"]["n_images"] == n and metrics["n_seen_left_out"] == 0
    assert metrics["temperature"] == json.loads((folder / "metrics.json").read_text())["temperature"]
    assert any("another aspect ratio" in note and "padded" in note for note in cli.notes(proc)), proc.stderr
    assert (result / "figures" / "confusion_external.png").is_file()
    assert (sorted(p.name for p in (folder / "eval").rglob("*")) if (folder / "eval").exists() else []) == own_eval
    # each balanced accuracy with its interval over the other data's lesions, printed as it is written
    ci = metrics["external"]["balanced"]["balanced_accuracy_ci"]
    assert ci["grouped_by"] == "lesion" and ci["n_groups"] == pd.read_csv(other / METADATA_FILE).lesion_id.nunique()
    line = next(line for line in proc.stdout.splitlines() if line.startswith("external: balanced accuracy"))
    assert f"[{ci['ci_low']:.3f}, {ci['ci_high']:.3f}] with the balanced decision" in line
    assert "[ ]: 95% intervals of the balanced accuracies, 2000 draws of whole lesions" in proc.stdout.splitlines()
    page = (result / "report.html").read_text()
    assert f"{ci['ci_low']:.3f}, {ci['ci_high']:.3f}] (95% CI over {ci['n_groups']} lesions)" in page
    # the probabilities are those of batch prediction of the same cases (same patient fields, same fit)
    scored = pd.read_csv(result / "predictions.csv").set_index("image_id")
    meta = pd.read_csv(other / METADATA_FILE)
    cases = meta.assign(image=[str(other / "images" / f"{i}.jpg") for i in meta.image_id])
    cases[["image", "age", "sex", "localization"]].to_csv(other.parent / "cases.csv", index=False)
    batch = predict_table(folder, table=other.parent / "cases.csv")
    batch.index = batch.image.map(lambda p: Path(p).stem)
    columns = [c for c in scored.columns if c.startswith(("p_", "balanced_p_"))]
    np.testing.assert_allclose(scored[columns].to_numpy(), batch.loc[scored.index, columns].to_numpy(), atol=1e-6)


@pytest.mark.slow
def test_a_multiclass_run_scored_as_key_class_vs_rest(cli, run: tuple[Path, Path], other: Path) -> None:
    folder, _ = run
    proc = cli.ok(cli("evaluate", "--run", folder, "--data", other, "--key-vs-rest"))
    assert "key class vs rest: AUROC" in proc.stdout
    result = folder / "external" / "clinic_b-mel_vs_rest"
    metrics = json.loads((result / "metrics.json").read_text())["external"]
    scored = pd.read_csv(result / "predictions.csv")
    is_mel = (scored.target == "mel").to_numpy()
    assert 0 < is_mel.sum() < len(scored)  # both classes present: the AUROC is defined
    kvr = metrics["key_vs_rest"]
    assert kvr["calibrated"]["auroc"] == pytest.approx(roc_auc_score(is_mel, scored.p_mel))
    assert metrics["calibrated"]["key_auroc"] == pytest.approx(roc_auc_score(is_mel, scored.p_mel))
    decided = (scored.balanced_decision == "mel").to_numpy()
    assert kvr["balanced"]["sensitivity"] == pytest.approx(decided[is_mel].mean())
    assert kvr["balanced"]["specificity"] == pytest.approx((~decided[~is_mel]).mean())
    ci = kvr["auroc_ci"]
    assert ci["grouped_by"] == "lesion" and ci["ci_low"] <= ci["auroc"] <= ci["ci_high"]
    assert ci["n_positive"] == is_mel.sum()


@pytest.mark.slow
def test_images_of_the_run_s_own_splits_are_refused(cli, run: tuple[Path, Path], other: Path, tmp_path: Path) -> None:
    folder, root = run
    mixed = shutil.copytree(other, tmp_path / "mixed")
    seen = pd.read_csv(root / METADATA_FILE).iloc[[0]]
    shutil.copy(next(root.rglob(f"{seen.image_id.iloc[0]}.jpg")), mixed / "images")
    table = pd.concat([pd.read_csv(other / METADATA_FILE), seen])
    table.to_csv(mixed / METADATA_FILE, index=False)
    line = cli.error(cli("evaluate", "--run", folder, "--data", mixed), "evaluate", "1 of", "run's own splits")
    assert seen.image_id.iloc[0] in line and not (folder / "external" / "mixed").exists()
    cli.ok(cli("evaluate", "--run", folder, "--data", mixed, "--exclude-seen"))
    metrics = json.loads((folder / "external" / "mixed" / "metrics.json").read_text())
    assert metrics["n_seen_left_out"] == 1 and metrics["external"]["calibrated"]["n_images"] == len(table) - 1


@pytest.mark.slow
def test_the_run_s_own_data_is_still_evaluated_on_its_split(cli, run: tuple[Path, Path], tmp_path: Path) -> None:
    folder, root = run
    moved = shutil.copytree(root, tmp_path / "moved")
    cli.ok(cli("evaluate", "--run", folder, "--data", moved))
    assert (folder / "eval" / "test" / "metrics.json").is_file()


def test_classes_are_mapped_and_unknown_ones_left_out_with_a_note() -> None:
    table = pd.DataFrame({"dx": ["mel", "ak", "scc", "nv", "scc"], "lesion_id": list("abcde")})
    dataset, isic2019 = preset("ham10000"), preset("isic2019")
    with pytest.warns(Warning) as caught:
        rows, y, record = scored_targets(table, isic2019, dataset, False, "isic2019/")
    assert rows.dx.tolist() == ["mel", "ak", "nv"]
    assert [dataset.classes[k] for k in y] == ["mel", "akiec", "nv"]
    assert record["left_out"] == {"scc": 2}
    assert any("scc (2 images)" in str(w.message) for w in caught)
    rows, y, _ = scored_targets(table, isic2019, dataset, True, "isic2019/")  # key vs rest keeps every image
    assert len(rows) == 5 and y.tolist() == [1, 0, 0, 0, 0]


def test_features_the_other_data_lacks_are_missing_and_said() -> None:
    table = pd.DataFrame({"age_approx": [40.0, None], "sex": ["male", "female"], "site": ["torso", "face"]})
    with pytest.warns(Warning) as caught:
        frame, found = patient_columns(table, preset("isic2020"), preset("ham10000"), "isic2020/")
    assert found == {"age": "age_approx", "sex": "sex", "localization": None}
    assert frame["age"].iloc[0] == 40.0 and frame["localization"].isna().all()
    assert any("localization" in str(w.message) and "missing for every image" in str(w.message) for w in caught)


# --- images of another shape ---------------------------------------------------------------------


def test_another_aspect_ratio_is_padded_or_cropped_never_stretched() -> None:
    white = Image.new("RGB", (100, 100), (255, 255, 255))
    padded = fit_image(white, (48, 64), "pad")  # a square in a 4:3 frame: 8 black columns each side
    assert padded.shape == (48, 64, 3)
    assert (padded[:, :8] == 0).all() and (padded[:, -8:] == 0).all() and (padded[:, 8:-8] == 255).all()
    cropped = fit_image(white, (48, 64), "crop")
    assert (cropped == 255).all()
    stripes = np.zeros((100, 100, 3), np.uint8)
    stripes[:50] = 255  # top half white: a centre crop of a square to 4:3 keeps the split in the middle
    crop = fit_image(Image.fromarray(stripes), (48, 64), "crop")
    assert (crop[:23] == 255).all() and (crop[25:] == 0).all()
    same = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    np.testing.assert_array_equal(fit_image(same, (48, 64), "pad"), fit_image(same, (48, 64), "stretch"))


# --- prediction at scale ------------------------------------------------------------------------------


@pytest.mark.slow
def test_batch_predict_equals_single_predict_per_image(cli, run: tuple[Path, Path], tmp_path: Path) -> None:
    folder, root = run
    images = sorted(root.rglob("ISIC_*.jpg"))[:5]
    csv = tmp_path / "cases.csv"
    rows = [{"image": str(p), "age": 45 + 5 * i, "sex": "male", "localization": "back"} for i, p in enumerate(images)]
    pd.DataFrame(rows).to_csv(csv, index=False)
    cli.ok(cli("predict", "--run", folder, "--csv", csv, "--out", tmp_path / "out.csv"))
    batch = pd.read_csv(tmp_path / "out.csv")
    assert len(batch) == len(images)
    for row, (_, got) in zip(rows, batch.iterrows(), strict=True):
        fields = {k: row[k] for k in ("age", "sex", "localization")}
        single = predict_image(folder, row["image"], **fields)
        balanced = predict_image(folder, row["image"], **fields, balanced=True)
        for c in single:
            assert got[f"p_{c}"] == pytest.approx(single[c], abs=2e-6)
            assert got[f"balanced_p_{c}"] == pytest.approx(balanced[c], abs=2e-6)
        assert got["balanced_decision"] == max(balanced, key=balanced.get)


@pytest.mark.slow
@pytest.mark.parametrize(("age", "shown"), [("-3", "'-3'"), ("400", "'400'"), ("forty", "'forty'")])
def test_a_bad_age_in_a_csv_of_cases_names_its_row(
    cli, run: tuple[Path, Path], tmp_path: Path, age: str, shown: str
) -> None:
    folder, root = run
    images = sorted(root.rglob("ISIC_*.jpg"))[:3]
    csv = tmp_path / "cases.csv"
    ages = ["50", "", age]  # rows 1 and 2 are fine (an empty age is unknown); row 3 is not an age
    frame = pd.DataFrame({"image": [str(p) for p in images], "age": ages, "sex": "male", "localization": "back"})
    frame.to_csv(csv, index=False)
    out = tmp_path / "out.csv"
    proc = cli("predict", "--run", folder, "--csv", csv, "--out", out)
    cli.error(proc, "predict", f"{csv}: row 3 (line 4), column 'age': {shown} is not an age")
    assert not out.exists()


def test_predict_balanced_loads_the_model_once(run: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import multimodal_lesion.runs.predict as predict_module
    from multimodal_lesion.workflows import predict

    folder, root = run
    loads = []
    real = predict_module.load_model
    monkeypatch.setattr(predict_module, "load_model", lambda *a, **k: loads.append(a) or real(*a, **k))
    image = next(root.rglob("ISIC_*.jpg"))
    out = predict(folder, Case(image, {"age": 50}), balanced=True)
    assert len(loads) == 1
    assert out["probabilities"] == pytest.approx(predict_image(folder, image, age=50, balanced=True), abs=1e-6)
    both = predict_case(folder, Case(image, {"age": 50}))
    assert both.balanced_probs == out["probabilities"] and both.probs != both.balanced_probs


@pytest.mark.slow
def test_a_folder_of_images_is_predicted_with_missing_patient_fields(cli, run: tuple[Path, Path], other: Path) -> None:
    folder, _ = run
    proc = cli.ok(cli("predict", "--run", folder, "--data", other / "images", "--out", other.parent / "p.csv"))
    table = pd.read_csv(other.parent / "p.csv")
    assert len(table) == len(list((other / "images").glob("*.jpg")))
    np.testing.assert_allclose(table.filter(regex="^p_").sum(1), 1, atol=1e-5)
    notes = cli.notes(proc)
    assert any("age, sex, localization" in n and "missing" in n for n in notes), notes


# --- a run trained on a GPU, used on a CPU-only machine ----------------------------------------------


def _tag_storages(checkpoint: Path, location: str) -> None:
    """Rewrite a torch zip checkpoint so that every tensor says it was saved on ``location`` (e.g. cuda:0).

    torch.save cannot write CUDA tensors without a GPU; the location is a string in the pickled
    persistent ids (``'cpu'`` as BINUNICODE), so it is replaced there, length prefix included.
    """
    old, new = b"cpu", location.encode()
    with zipfile.ZipFile(checkpoint) as zf:
        members = {info.filename: zf.read(info) for info in zf.infolist()}
    pkl = next(name for name in members if name.endswith("data.pkl"))
    tagged = members[pkl].replace(
        b"X" + len(old).to_bytes(4, "little") + old, b"X" + len(new).to_bytes(4, "little") + new
    )
    assert tagged != members[pkl]
    members[pkl] = tagged
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    checkpoint.write_bytes(buffer.getvalue())


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path: this machine has a GPU")
def test_a_checkpoint_of_cuda_tensors_loads_with_device_cpu(cli, run: tuple[Path, Path], tmp_path: Path) -> None:
    folder, root = run
    gpu_run = shutil.copytree(folder, tmp_path / "gpu_run", ignore=shutil.ignore_patterns("external", "eval"))
    _tag_storages(gpu_run / "best.pt", "cuda:0")
    with pytest.raises(RuntimeError, match="CUDA"):  # what loading without map_location does on this machine
        torch.load(gpu_run / "best.pt", weights_only=True)
    image = next(root.rglob("ISIC_*.jpg"))
    loaded = load_model(gpu_run, device="cpu")
    assert loaded.device.type == "cpu" and all(p.device.type == "cpu" for p in loaded.model.parameters())
    assert predict_image(gpu_run, image, age=30) == pytest.approx(predict_image(folder, image, age=30), abs=1e-6)
    out = json.loads(cli.ok(cli("predict", "--run", gpu_run, "--image", image, "--device", "cpu")).stdout)
    assert set(out["probabilities"]) == set(preset("ham10000").classes)
    line = cli.error(cli("predict", "--run", gpu_run, "--image", image, "--device", "cuda"), "predict", "--device cuda")
    assert "Traceback" not in line


def test_a_run_without_a_balanced_decision_is_a_clear_error(run: tuple[Path, Path], tmp_path: Path) -> None:
    folder, root = run
    old = shutil.copytree(folder, tmp_path / "old", ignore=shutil.ignore_patterns("external", "eval"))
    metrics = json.loads((old / "metrics.json").read_text())
    metrics.pop("balanced_bias")
    (old / "metrics.json").write_text(json.dumps(metrics))
    image = next(root.rglob("ISIC_*.jpg"))
    assert Predictor.load(old).run.balanced is None
    with pytest.raises(CheckpointError, match="no balanced decision"):
        predict_image(old, image, balanced=True)


# --- a dataset in another format: ISIC 2020 (binary, patients, partial download) ----------------------


@pytest.mark.slow
def test_a_ham_run_scored_on_isic2020_as_melanoma_vs_rest(cli, run: tuple[Path, Path], tiny_isic2020: Path) -> None:
    folder, _ = run
    proc = cli.ok(cli("evaluate", "--run", folder, "--data", tiny_isic2020, "--schema", "isic2020", "--key-vs-rest"))
    result = folder / "external" / "isic2020-mel_vs_rest"
    metrics = json.loads((result / "metrics.json").read_text())
    table = pd.read_csv(tiny_isic2020 / "ISIC_2020_Training_GroundTruth.csv", dtype=str)
    present = table[[(tiny_isic2020 / "images" / f"{i}.jpg").is_file() for i in table.image_name]]
    scored = pd.read_csv(result / "predictions.csv")
    assert sorted(scored.image_id) == sorted(present.image_name)  # every downloaded image, no other
    ext = metrics["external"]
    assert ext["calibrated"]["n_images"] == len(present) and ext["n_patients"] == present.patient_id.nunique()
    is_mel = scored.target.eq("mel").to_numpy()
    truth = present.set_index("image_name").target.reindex(scored.image_id).eq("1").to_numpy()
    np.testing.assert_array_equal(is_mel, truth)
    ci = ext["key_vs_rest"]["auroc_ci"]
    assert ci["grouped_by"] == "patient" and ci["auroc"] == pytest.approx(roc_auc_score(is_mel, scored.p_mel))
    assert metrics["classes"]["features"] == {"age": "age_approx", "sex": "sex", "localization": None}
    notes = cli.notes(proc)
    assert any("localization" in n and "missing for every image" in n for n in notes), notes
    assert any("another aspect ratio" in n for n in notes), notes
    # a binary dataset is scored as key class vs rest without being asked, into the same folder
    plain = cli.ok(cli("evaluate", "--run", folder, "--data", tiny_isic2020, "--schema", "isic2020"))
    assert "key class vs rest: AUROC" in plain.stdout and f"wrote {result / 'metrics.json'}" in plain.stdout


@pytest.mark.slow
def test_isic2019_images_of_the_run_are_refused(cli, run: tuple[Path, Path], tiny_isic2019: tuple[Path, Path]) -> None:
    folder, _ = run
    csvs, images = tiny_isic2019  # the same ISIC ids as the tiny HAM10000 the run was trained on
    proc = cli("evaluate", "--run", folder, "--data", csvs, "--images", images, "--schema", "isic2019")
    cli.error(proc, "evaluate", "run's own splits", "--exclude-seen")
