"""The experiment scripts behind the README's real-data figures, run on a tiny real-format dataset."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    'model.backbone="resnet18"',
    'model.weights="none"',
    "data.image_size=[48, 64]",
    "train.epochs=1",
    "train.patience=1",
    "train.batch_size=16",
    "data.test_size=0.25",
    "data.val_size=0.25",
    "train.channels_last=false",
    "train.threads=1",
    "train.tta=false",
]


@pytest.mark.slow
def test_recipe_sweep_trains_each_variant_in_parallel_and_tabulates_val_and_test(
    tiny_ham: Path, tmp_path: Path
) -> None:
    data = tiny_ham
    out = tmp_path / "sweep"
    args = [
        sys.executable,
        str(REPO / "experiments" / "real_sweep.py"),
        "--data",
        str(data),
        "--out",
        str(out),
        "--parallel",
        "2",
        "--only",
        "e8_sampler",
        "e8_weighted",
    ]
    for item in TINY:
        args += ["--set", item]
    env = {**os.environ, "MMLESION_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(out / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["variant"] for r in rows] == ["e8_sampler", "e8_weighted"]
    for row in rows:
        assert 0.0 <= float(row["test_ba_balanced"]) <= 1.0 and 0.0 <= float(row["val_auroc"]) <= 1.0
        assert int(row["test_images"]) > 0 and int(row["test_lesions"]) <= int(row["test_images"])
        assert (out / row["variant"] / "metrics.json").is_file()
    configs = {name: (out / name / "config.toml").read_text() for name in ("e8_sampler", "e8_weighted")}
    assert 'balance = "sampler"' in configs["e8_sampler"] and 'balance = "weighted_loss"' in configs["e8_weighted"]
    assert "e8_sampler" in proc.stdout and "test_ba_balanced" in proc.stdout


@pytest.mark.slow
def test_finetune_script_prints_both_balanced_accuracies_with_counts(tiny_ham: Path, tmp_path: Path) -> None:
    data = tiny_ham
    args = [
        sys.executable,
        str(REPO / "experiments" / "real_finetune.py"),
        "--data",
        str(data),
        "--config",
        "real_end2end_cpu",
        "--out",
        str(tmp_path / "runs"),
        "--models",
        "image_only",
    ]
    for item in TINY:
        args += ["--set", item]
    env = {**os.environ, "MMLESION_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("image_only:"))
    assert "with the balanced decision" in line and "lesions" in line
    assert '"balanced"' in (tmp_path / "runs" / "e2e_image_only" / "metrics.json").read_text()
    assert 'balance = "sampler"' in (tmp_path / "runs" / "e2e_image_only" / "config.toml").read_text()
