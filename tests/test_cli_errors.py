"""Every bad input of issue 7, through the real ``mmlesion`` CLI on real files.

Each case ends either in exit code 2 and one line on stderr naming the file / row / field (no
traceback), or in the documented handling (a ``note:`` line, a conversion) with exit code 0.
docs/bad_input.md is the table of these cases; keep the two in step.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multimodal_lesion.data.constants import MASK_DIR, MASK_SUFFIX, METADATA_FILE

#: Tiny, fast training settings (a ~0.4M-parameter timm test network, 48x64 images, CPU).
TINY = [
    "--set",
    'model.backbone="test_resnet"',
    "--set",
    'model.weights="none"',
    "--set",
    "data.image_size=[48, 64]",
    "--set",
    "train.epochs=2",
    "--set",
    "train.batch_size=16",
    "--set",
    'train.device="cpu"',
]


# --- helpers (conftest's ``cli`` runs mmlesion and checks how it ended) --------------------------------


def read_csv(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / METADATA_FILE, dtype=str, keep_default_na=False)


def write_csv(root: Path, df: pd.DataFrame) -> Path:
    path = root / METADATA_FILE
    df.to_csv(path, index=False)
    return path


def image_path(root: Path, image_id: str) -> Path:
    return next(root.rglob(f"{image_id}.*"))


def split(cli, root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return cli("split", "--data", root, "--out", out / "splits.csv", *extra)


def set_cell(root: Path, row: int, column: str, value: str) -> Path:
    df = read_csv(root)
    df.loc[row, column] = value
    return write_csv(root, df)


def jpeg_bytes(seed: int = 0) -> bytes:
    """A valid 200x150 noise JPEG."""
    buf = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


# --- the CSV -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["split", "eda"])
def test_empty_csv(cli, tiny_ham: Path, tmp_path: Path, command: str) -> None:
    csv = tiny_ham / METADATA_FILE
    csv.write_text("")
    proc = cli(command, "--data", tiny_ham, "--out", tmp_path / "out")
    cli.error(proc, command, str(csv), "empty")


def test_header_only_csv(cli, tiny_ham: Path, tmp_path: Path) -> None:
    csv = write_csv(tiny_ham, read_csv(tiny_ham).iloc[:0])
    cli.error(split(cli, tiny_ham, tmp_path), "split", str(csv), "no rows")


def test_missing_column(cli, tiny_ham: Path, tmp_path: Path) -> None:
    csv = write_csv(tiny_ham, read_csv(tiny_ham).drop(columns=["age"]))
    cli.error(split(cli, tiny_ham, tmp_path), "split", str(csv), "not HAM10000-shaped", "missing column(s) 'age'")


def test_renamed_column(cli, tiny_ham: Path, tmp_path: Path) -> None:
    csv = write_csv(tiny_ham, read_csv(tiny_ham).rename(columns={"dx": "diagnosis"}))
    cli.error(
        split(cli, tiny_ham, tmp_path), "split", str(csv), "missing column(s) 'dx'", "unexpected column(s) 'diagnosis'"
    )


def test_not_a_csv_at_all(cli, tiny_ham: Path, tmp_path: Path) -> None:
    csv = tiny_ham / METADATA_FILE
    csv.write_bytes(jpeg_bytes())
    cli.error(split(cli, tiny_ham, tmp_path), "split", str(csv), "not a readable CSV")


@pytest.mark.parametrize("command", ["split", "eda"])
def test_unknown_dx(cli, tiny_ham: Path, tmp_path: Path, command: str) -> None:
    csv = set_cell(tiny_ham, 3, "dx", "melanoma")
    proc = cli(command, "--data", tiny_ham, "--out", tmp_path / "out")
    cli.error(proc, command, str(csv), "row 4 (line 5), column 'dx'", "'melanoma'", "expected one of akiec")


def test_duplicate_image_id(cli, tiny_ham: Path, tmp_path: Path) -> None:
    df = read_csv(tiny_ham)
    df.loc[5, "image_id"] = df.loc[4, "image_id"]
    csv = write_csv(tiny_ham, df)
    cli.error(
        split(cli, tiny_ham, tmp_path),
        "split",
        str(csv),
        "column 'image_id'",
        "duplicated",
        df.loc[4, "image_id"],
        "rows 5, 6",
    )


@pytest.mark.parametrize("value", ["-5", "150", "forty", "inf", "1e9"])
def test_bad_age(cli, tiny_ham: Path, tmp_path: Path, value: str) -> None:
    csv = set_cell(tiny_ham, 7, "age", value)
    cli.error(split(cli, tiny_ham, tmp_path), "split", str(csv), "row 8 (line 9), column 'age'", repr(value))


@pytest.mark.parametrize("value", ["", "NA", "unknown", "nan"])
def test_missing_age_is_allowed(cli, tiny_ham: Path, tmp_path: Path, value: str) -> None:
    set_cell(tiny_ham, 7, "age", value)
    proc = split(cli, tiny_ham, tmp_path)
    cli.ok(proc)
    assert cli.notes(proc) == []

    from multimodal_lesion.data.ham10000 import read_ham10000

    assert np.isnan(read_ham10000(tiny_ham).metadata.loc[7, "age"])


@pytest.mark.parametrize("column, value", [("sex", "robot"), ("localization", "moon")])
def test_unknown_category_is_read_as_unknown_with_a_note(
    cli, tiny_ham: Path, tmp_path: Path, column: str, value: str
) -> None:
    set_cell(tiny_ham, 2, column, value)
    proc = split(cli, tiny_ham, tmp_path)
    cli.ok(proc)
    (note,) = cli.notes(proc)
    assert f"column '{column}'" in note and repr(value) in note and "'unknown'" in note and "rows 3" in note
    splits = pd.read_csv(tmp_path / "splits.csv", dtype=str)
    assert len(splits) == len(read_csv(tiny_ham))  # kept, not dropped

    from multimodal_lesion.data.ham10000 import read_ham10000

    assert read_ham10000(tiny_ham).metadata.loc[2, column] == "unknown"


@pytest.mark.parametrize(
    "bad_id",
    [
        "sub/ISIC_0024306",
        "../ISIC_0024306",
        "..\\ISIC_0024306",
        "ISIC..0024306",
        "<script>alert(1)</script>",
        '"><img src=x onerror=alert(1)>',
        "ISIC\n0024306",
        "/etc/passwd",
        "",
    ],
)
def test_image_id_that_is_a_path_or_markup(cli, tiny_ham: Path, tmp_path: Path, bad_id: str) -> None:
    csv = set_cell(tiny_ham, 6, "image_id", bad_id)
    cli.error(split(cli, tiny_ham, tmp_path), "split", str(csv), "row 7 (line 8), column 'image_id'", "not a plain id")


# --- the image files --------------------------------------------------------------------------------


def test_listed_image_missing(cli, tiny_ham: Path, tmp_path: Path) -> None:
    image_id = read_csv(tiny_ham).loc[9, "image_id"]
    image_path(tiny_ham, image_id).unlink()
    cli.error(split(cli, tiny_ham, tmp_path), "split", image_id, "not found", "--drop-missing")


def test_listed_image_missing_dropped_and_reported(cli, tiny_ham: Path, tmp_path: Path) -> None:
    image_id = read_csv(tiny_ham).loc[9, "image_id"]
    image_path(tiny_ham, image_id).unlink()
    proc = split(cli, tiny_ham, tmp_path, "--drop-missing")
    cli.ok(proc)
    (note,) = cli.notes(proc)
    assert note.startswith("note: dropped 1 image(s)") and image_id in note
    splits = pd.read_csv(tmp_path / "splits.csv", dtype=str)
    assert image_id not in set(splits.image_id) and len(splits) == len(read_csv(tiny_ham)) - 1


def test_image_present_but_unlisted(cli, tiny_ham: Path, tmp_path: Path) -> None:
    (tiny_ham / "HAM10000_images_part_1" / "ISIC_9999999.jpg").write_bytes(jpeg_bytes(1))
    proc = split(cli, tiny_ham, tmp_path)
    cli.ok(proc)
    (note,) = cli.notes(proc)
    assert "1 image(s) found but not listed" in note and "ISIC_9999999" in note and "ignored" in note
    assert "ISIC_9999999" not in set(pd.read_csv(tmp_path / "splits.csv", dtype=str).image_id)


def test_empty_image_file(cli, tiny_ham: Path, tmp_path: Path) -> None:
    path = image_path(tiny_ham, read_csv(tiny_ham).loc[1, "image_id"])
    path.write_bytes(b"")
    cli.error(split(cli, tiny_ham, tmp_path), "split", str(path), "empty")


def test_image_linking_outside_the_data_root(cli, tiny_ham: Path, tmp_path: Path) -> None:
    secret = tmp_path / "outside.jpg"
    secret.write_bytes(jpeg_bytes(2))
    path = image_path(tiny_ham, read_csv(tiny_ham).loc[0, "image_id"])
    path.unlink()
    path.symlink_to(secret)
    cli.error(split(cli, tiny_ham, tmp_path), "split", str(path), "outside the data root")


# --- decoding: one trained run with an image branch, asked to predict odd files ---------------------

ODD_MODES = ("grey", "rgba", "cmyk", "16-bit", "palette")


def write_odd_image(path_without_suffix: Path, mode: str, seed: int = 0) -> Path:
    """An image in an unusual but valid mode; returns its path (PNG where JPEG cannot hold the mode)."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)
    makers = {
        "grey": (lambda: Image.fromarray(rgb[..., 0]), ".jpg"),
        "rgba": (lambda: Image.fromarray(np.dstack([rgb, rgb[..., :1]])), ".png"),
        "cmyk": (lambda: Image.fromarray(rgb).convert("CMYK"), ".jpg"),
        "16-bit": (lambda: Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), ".png"),
        "palette": (lambda: Image.fromarray(rgb).convert("P"), ".png"),
    }
    make, suffix = makers[mode]
    path = path_without_suffix.with_suffix(suffix)
    make().save(path)
    return path


@pytest.fixture(scope="module")
def odd_ham(tmp_path_factory: pytest.TempPathFactory, tiny_ham_factory: Callable[..., Path]) -> Path:
    """The tiny dataset with five images replaced by grey / RGBA / CMYK / 16-bit / palette files."""
    root = tiny_ham_factory(tmp_path_factory.mktemp("odd") / "dataset")
    ids = read_csv(root).image_id
    for k, mode in enumerate(ODD_MODES):
        old = image_path(root, ids[k])
        old.unlink()
        new = write_odd_image(old.with_suffix(""), mode, seed=k)
        assert Image.open(new).mode in {"L", "RGBA", "CMYK", "I;16", "P"}
    return root


@pytest.fixture(scope="module")
def concat_run(cli, odd_ham: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny frozen concat run trained on the odd-mode dataset (so training itself converts them)."""
    out = tmp_path_factory.mktemp("runs") / "concat"
    proc = cli("train", "--data", odd_ham, "--out", out, *TINY, "--set", 'model.name="concat"')
    cli.ok(proc)
    return out


@pytest.fixture(scope="module")
def metadata_run(cli, odd_ham: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "metadata_only"
    cli.ok(cli("train", "--data", odd_ham, "--out", out, *TINY, "--set", 'model.name="metadata_only"'))
    return out


@pytest.mark.slow
def test_odd_image_modes_are_converted_in_training(concat_run: Path) -> None:
    metrics = json.loads((concat_run / "metrics.json").read_text())
    assert metrics["test"]["calibrated"]["n_images"] > 0


@pytest.mark.parametrize("mode", ODD_MODES)
def test_odd_image_mode_is_converted(tmp_path: Path, mode: str) -> None:
    """What the training run above decoded: 8-bit RGB with the right pixels (in-process, per mode)."""
    from multimodal_lesion.data.images import load_rgb

    path = write_odd_image(tmp_path / "case", mode, seed=3)
    rgb = np.asarray(load_rgb(path))
    assert rgb.dtype == np.uint8 and rgb.shape == (150, 200, 3)
    source = np.random.default_rng(3).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    expected = {
        "grey": lambda: np.asarray(Image.open(path).convert("L"))[..., None].repeat(3, 2),
        "rgba": lambda: source,
        "16-bit": lambda: source[..., :1].repeat(3, 2),
        "cmyk": lambda: source,
        "palette": lambda: np.asarray(Image.open(path).convert("RGB")),
    }[mode]()
    tolerance = 12 if mode == "cmyk" else 0  # CMYK JPEG is lossy; the others are exact
    assert np.abs(rgb.astype(int) - expected.astype(int)).mean() <= tolerance


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cmyk", "16-bit"])
def test_odd_image_mode_predicts(cli, concat_run: Path, tmp_path: Path, mode: str) -> None:
    image = write_odd_image(tmp_path / f"case_{mode.replace('-', '')}", mode, seed=10)
    proc = cli("predict", "--run", concat_run, "--image", image, "--age", 55, "--sex", "female")
    cli.ok(proc)
    probs = json.loads(proc.stdout)["probabilities"]
    assert len(probs) == 7 and abs(sum(probs.values()) - 1) < 1e-4 and all(np.isfinite(list(probs.values())))


def _truncated(path: Path) -> None:
    path.write_bytes(jpeg_bytes()[: len(jpeg_bytes()) // 2])


def _corrupt_stream(path: Path) -> None:
    data = bytearray(jpeg_bytes())
    for i in range(len(data) // 3, len(data) - 10, 7):
        data[i] = 0xFF if i % 2 else 0x00
    path.write_bytes(bytes(data))


def _not_an_image(path: Path) -> None:
    path.write_text("lesion_id,image_id\nthis is not a JPEG\n")


def _bomb(path: Path) -> None:
    Image.new("1", (10_000, 10_000)).save(path, "PNG")  # 1e8 pixels in ~12 kB


BAD_IMAGES = {
    "truncated": (_truncated, "truncated or corrupt"),
    "corrupt": (_corrupt_stream, "truncated or corrupt"),
    "not-an-image": (_not_an_image, "truncated or corrupt"),
    "bomb": (_bomb, "decompression bomb"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", BAD_IMAGES)
def test_bad_image_predict(cli, concat_run: Path, tmp_path: Path, kind: str) -> None:
    write, words = BAD_IMAGES[kind]
    image = tmp_path / ("bomb.png" if kind == "bomb" else f"{kind}.jpg")
    write(image)
    cli.error(cli("predict", "--run", concat_run, "--image", image), "predict", str(image), words)


@pytest.mark.slow
def test_truncated_jpeg_in_dataset_train(cli, tiny_ham: Path, tmp_path: Path) -> None:
    path = image_path(tiny_ham, read_csv(tiny_ham).loc[12, "image_id"])
    _truncated(path)
    proc = cli("train", "--data", tiny_ham, "--out", tmp_path / "run", *TINY, "--set", 'model.name="image_only"')
    cli.error(proc, "train", str(path), "truncated or corrupt")


# --- masks ------------------------------------------------------------------------------------------


def test_mask_of_wrong_size_is_refused_by_load_mask(tiny_ham: Path) -> None:
    """No CLI command reads masks yet except ``explain``; the reader's contract is checked directly."""
    from multimodal_lesion.data.ham10000 import read_ham10000
    from multimodal_lesion.data.images import load_mask
    from multimodal_lesion.errors import DataError

    row = read_ham10000(tiny_ham).metadata.iloc[0]
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(row.mask_path)
    with pytest.raises(DataError, match=re.escape(row.mask_path) + ".*50x40.*200x150"):
        load_mask(row.mask_path, expected_size=Image.open(row.path).size)


@pytest.mark.slow
def test_mask_of_wrong_size_explain(cli, concat_run: Path, odd_ham: Path, tmp_path: Path) -> None:
    pytest.importorskip("multimodal_lesion.explain.pipeline", reason="explain pipeline not written yet")
    data = shutil.copytree(odd_ham, tmp_path / "dataset")
    splits = pd.read_csv(concat_run / "splits.csv", dtype=str)
    image_id = splits.loc[splits.split == "test", "image_id"].iloc[0]
    mask = data / MASK_DIR / f"{image_id}{MASK_SUFFIX}"
    Image.fromarray(np.zeros((40, 50), np.uint8)).save(mask)
    proc = cli("explain", "--run", concat_run, "--data", data, "--cases", image_id, "--out", tmp_path / "explain")
    cli.error(proc, "explain", str(mask))


# --- configs ----------------------------------------------------------------------------------------


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "experiment.toml"
    path.write_text(text)
    return path


@pytest.mark.slow
def test_config_unknown_key(cli, tiny_ham: Path, tmp_path: Path) -> None:
    cfg = _toml(tmp_path, "[train]\nepoch = 3\n")
    proc = cli("train", "--config", cfg, "--data", tiny_ham, "--out", tmp_path / "run")
    cli.error(proc, "train", str(cfg), "unknown config key 'train.epoch'", "valid:", "epochs")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_config_unknown_section(cli, tiny_ham: Path, tmp_path: Path) -> None:
    cfg = _toml(tmp_path, "[training]\nepochs = 3\n")
    proc = cli("train", "--config", cfg, "--data", tiny_ham, "--out", tmp_path / "run")
    cli.error(proc, "train", str(cfg), "unknown config section 'training'", "valid:", "train")


@pytest.mark.slow
def test_config_wrong_type(cli, tiny_ham: Path, tmp_path: Path) -> None:
    cfg = _toml(tmp_path, '[train]\nepochs = "ten"\n')
    proc = cli("train", "--config", cfg, "--data", tiny_ham, "--out", tmp_path / "run")
    cli.error(proc, "train", str(cfg), "train.epochs", "expected an integer", "'ten'")


@pytest.mark.slow
def test_config_not_toml(cli, tiny_ham: Path, tmp_path: Path) -> None:
    cfg = _toml(tmp_path, "[train\nepochs = 3\n")
    proc = cli("train", "--config", cfg, "--data", tiny_ham, "--out", tmp_path / "run")
    cli.error(proc, "train", str(cfg), "not valid TOML")


@pytest.mark.slow
def test_config_unknown_model_lists_valid_names(cli, tiny_ham: Path, tmp_path: Path) -> None:
    from multimodal_lesion.models import list_models

    proc = cli("train", "--data", tiny_ham, "--out", tmp_path / "run", *TINY, "--set", 'model.name="transformer"')
    line = cli.error(proc, "train", "'transformer'", "valid:")
    assert all(name in line for name in list_models()), line


@pytest.mark.slow
@pytest.mark.parametrize("pair", ["train.epochs", "epochs=3", "train.lr=[1,"])
def test_malformed_set_pair(cli, tiny_ham: Path, tmp_path: Path, pair: str) -> None:
    proc = cli("train", "--data", tiny_ham, "--out", tmp_path / "run", "--set", pair)
    cli.error(proc, "train", "--set", repr(pair) if "[" not in pair else "train.lr")


# --- run folders and checkpoints --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("what", ["empty folder", "a file"])
def test_not_a_run_folder(cli, tmp_path: Path, what: str) -> None:
    run = tmp_path / "run"
    if what == "empty folder":
        run.mkdir()
    elif what == "a file":
        run.write_text("hello")
    proc = cli("evaluate", "--run", run)
    cli.error(proc, "evaluate", str(run), "not a run folder", "config.toml")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_checkpoint_of_another_model(
    cli, concat_run: Path, metadata_run: Path, odd_ham: Path, tmp_path: Path, command: str
) -> None:
    run = shutil.copytree(concat_run, tmp_path / "concat")
    shutil.copy(metadata_run / "best.pt", run / "best.pt")
    args = ["--image", image_path(odd_ham, read_csv(odd_ham).image_id[20])] if command == "predict" else []
    proc = cli(command, "--run", run, *args)
    cli.error(proc, command, str(run / "best.pt"), "does not fit this model")


@pytest.mark.slow
def test_truncated_checkpoint(cli, metadata_run: Path, odd_ham: Path, tmp_path: Path) -> None:
    run = shutil.copytree(metadata_run, tmp_path / "run")
    data = (run / "best.pt").read_bytes()
    (run / "best.pt").write_bytes(data[: len(data) // 2])
    proc = cli("predict", "--run", run, "--image", image_path(odd_ham, read_csv(odd_ham).image_id[20]))
    cli.error(proc, "predict", str(run / "best.pt"), "not a readable checkpoint")


@pytest.mark.slow
def test_resume_without_last_checkpoint(cli, tiny_ham: Path, tmp_path: Path) -> None:
    proc = cli("train", "--data", tiny_ham, "--out", tmp_path / "run", *TINY, "--resume")
    cli.error(proc, "train", str(tmp_path / "run"), "nothing to resume")


def test_output_piped_into_a_reader_that_leaves_early_is_no_traceback() -> None:
    """``mmlesion presets | head -1``: the closed pipe ends the command quietly, exit 0."""
    done = subprocess.run(
        f"{sys.executable} -m multimodal_lesion.cli presets | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert done.stdout.count("\n") == 1 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr
