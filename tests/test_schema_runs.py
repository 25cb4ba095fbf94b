"""``mmlesion train`` end to end on each schema preset's tiny dataset: the commands the README gives for
the real ISIC 2019, ISIC 2020 and PAD-UFES-20 data, run for real (a tiny timm network, 2 epochs)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from multimodal_lesion.data.schema import preset
from multimodal_lesion.runs.folder import RunFolder

TINY = tuple(
    arg
    for pair in (
        'model.backbone="test_resnet"',
        'model.weights="none"',
        "data.image_size=[48, 64]",
        "train.epochs=2",
        "train.batch_size=8",
        'train.device="cpu"',
        "train.threads=1",
        "data.test_size=0.25",
        "data.val_size=0.25",
    )
    for arg in ("--set", pair)
)


def _check_run(folder: Path, name: str) -> pd.DataFrame:
    """The run stored its schema, split whole groups and predicted the schema's classes; returns the split."""
    run = RunFolder(folder)
    schema = preset(name)
    assert run.read_schema() == schema
    assert list(run.read_encoder().feature_groups_) == list(schema.features.names)
    splits = run.read_splits()
    assert (splits.groupby("lesion_id")["split"].nunique() == 1).all()
    predictions = pd.read_csv(folder / "predictions_test.csv")
    assert [c for c in predictions.columns if c.startswith("p_")] == [f"p_{c}" for c in schema.classes]
    assert set(predictions["target"]) <= set(schema.classes)
    return splits


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_train_isic2019_csvs_over_images_elsewhere(cli, tiny_isic2019: tuple[Path, Path], tmp_path: Path) -> None:
    root, images = tiny_isic2019
    out = tmp_path / "run"
    proc = cli.ok(
        cli("train", "--data", root, "--images", images, "--schema", "isic2019", "--drop-missing", *TINY, "--out", out)
    )
    assert any("(40 of 72 found)" in n for n in cli.notes(proc))
    splits = _check_run(out, "isic2019")
    assert len(splits) == 40


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_train_isic2020_binary_split_by_patient(cli, tiny_isic2020: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = cli.ok(cli("train", "--data", tiny_isic2020, "--schema", "isic2020", "--drop-missing", *TINY, "--out", out))
    splits = _check_run(out, "isic2020")
    # the headline counts what the split groups are: patients here, not lesions
    test_patients = splits.loc[splits["split"] == "test", "lesion_id"].nunique()
    assert f"images, {test_patients} patients)" in proc.stdout and " lesions)" not in proc.stdout
    assert RunFolder(out).read_metrics()["groups"] == "patients"
    table = pd.read_csv(tiny_isic2020 / "ISIC_2020_Training_GroundTruth.csv").set_index("image_name")
    patients = splits.assign(patient=table.loc[splits["image_id"], "patient_id"].to_numpy())
    crossing = patients.groupby("patient")["split"].nunique()
    # only the two patients the duplicates file joins may share a split boundary
    assert set(crossing.index[crossing > 1]) <= {"IP_0000000", "IP_0000001"}


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_pad_ufes_20_without_images_trains_metadata_only(cli, tiny_pad: Path, tmp_path: Path) -> None:
    refused = cli(
        "train", "--data", tiny_pad, "--schema", "pad_ufes_20", "--images", "none", *TINY, "--out", tmp_path / "a"
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    lines = [line for line in cli.own_lines(refused.stderr) if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("mmlesion train: error: model.name: 'concat' reads images")
    assert "metadata_only" in lines[0] and not (tmp_path / "a" / "best.pt").exists()
    out = tmp_path / "run"
    settings = (*TINY, "--set", 'model.name="metadata_only"')
    cli.ok(cli("train", "--data", tiny_pad, "--schema", "pad_ufes_20", "--images", "none", *settings, "--out", out))
    _check_run(out, "pad_ufes_20")
