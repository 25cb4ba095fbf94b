"""EDA: figures, missing values and summary, on the real HAM10000 and on small synthetic tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from multimodal_lesion.data.constants import CLASSES
from multimodal_lesion.data.ham10000 import read_ham10000
from multimodal_lesion.errors import DataError
from multimodal_lesion.io import read_json
from multimodal_lesion.report.eda import run_eda

#: HAM10000's figures: the original five, and the missing values.
FIGURES = (
    "class_counts.png",
    "class_pie.png",
    "age_by_class.png",
    "sex_by_class.png",
    "localization_by_class.png",
    "missing_values.png",
)
OUTPUTS = (*FIGURES, "missing_values.csv", "summary.json")


def _check_outputs(out: Path, summary: dict) -> None:
    """Every file exists, PNGs decode at a readable size, the CSV and JSON agree with the summary."""
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS), "no temporary files left"
    for name in FIGURES:
        with Image.open(out / name) as img:
            img.verify()
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width >= 800 and img.height >= 200
            assert np.asarray(img.convert("L")).std() > 10, f"{name} looks blank"
    assert read_json(out / "summary.json") == summary
    missing = pd.read_csv(out / "missing_values.csv")
    assert list(missing.columns) == ["column", "count"]
    assert dict(zip(missing["column"], missing["count"], strict=True)) == summary["missing"]


@pytest.mark.real_data
def test_eda_on_real_ham10000(real_data_root: Path, tmp_path: Path) -> None:
    metadata = read_ham10000(real_data_root).metadata
    summary = run_eda(metadata, tmp_path / "eda")
    assert summary["n_images"] == 10015 and summary["n_lesions"] == 7470
    assert summary["class_counts"] == {
        "akiec": 327,
        "bcc": 514,
        "bkl": 1099,
        "df": 115,
        "mel": 1113,
        "nv": 6705,
        "vasc": 142,
    }
    assert list(summary["class_counts"]) == list(CLASSES)
    assert summary["n_lesions_with_several_images"] == 1956
    assert {k: summary["missing"][k] for k in ("age", "sex", "localization")} == {
        "age": 57,
        "sex": 57,
        "localization": 234,
    }
    _check_outputs(tmp_path / "eda", summary)


def _table(n_lesions: int = 30) -> pd.DataFrame:
    """A small HAM10000-shaped table with missing values and some multi-image lesions."""
    rows = []
    for i in range(n_lesions):
        for view in range(1 + (i % 4 == 0)):
            rows.append(
                dict(
                    lesion_id=f"HAM_{i:07d}",
                    image_id=f"ISIC_{i:05d}{view:02d}",
                    dx=CLASSES[i % 6],
                    dx_type="histo",
                    age=np.nan if i % 10 == 3 else float(20 + 5 * (i % 12)),
                    sex=("male", "female", "unknown")[i % 3],
                    localization=("back", "face", "unknown", "trunk")[i % 4],
                )
            )
    return pd.DataFrame(rows)


def test_eda_counts_a_small_table_and_keeps_absent_classes(tmp_path: Path) -> None:
    table = _table()
    summary = run_eda(table, tmp_path / "eda")
    assert summary["n_images"] == len(table) == 38 and summary["n_lesions"] == 30
    assert summary["n_lesions_with_several_images"] == 8
    assert summary["class_counts"]["vasc"] == 0, "a class with no images is still listed"
    assert sum(summary["class_counts"].values()) == 38
    assert summary["missing"]["age"] == int(table.age.isna().sum())
    assert summary["missing"]["sex"] == int((table.sex == "unknown").sum())
    assert summary["missing"]["localization"] == int((table.localization == "unknown").sum())
    _check_outputs(tmp_path / "eda", summary)


def test_eda_reruns_over_its_own_output(tmp_path: Path) -> None:
    first = run_eda(_table(), tmp_path)
    assert run_eda(_table(), tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(OUTPUTS)


def test_eda_names_a_missing_column_and_an_unknown_class(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="localization"):
        run_eda(_table().drop(columns="localization"), tmp_path)
    bad = _table()
    bad.loc[3, "dx"] = "melanoma"
    with pytest.raises(DataError, match="melanoma"):
        run_eda(bad, tmp_path)
