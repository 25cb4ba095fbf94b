"""Everything downstream of the reader follows the run's schema: a real tiny run with a non-HAM class list.

The dataset is the tiny HAM10000-layout one relabelled as a binary task (benign vs malignant, key class
malignant) under a schema built by hand, trained and evaluated through the library's one training path.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from multimodal_lesion.config import load_config
from multimodal_lesion.data.dataset import LesionDataset
from multimodal_lesion.data.reader import read_dataset
from multimodal_lesion.data.schema import preset
from multimodal_lesion.report.figures import save_evaluation_figures
from multimodal_lesion.runs import Predictor, RunFolder, make_splits, predict_image, prepare_inputs
from multimodal_lesion.training.runner import evaluate, train_model

pytestmark = pytest.mark.usefixtures("single_thread")

MALIGNANT = ("mel", "bcc", "akiec")


@pytest.fixture(scope="module")
def binary_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_run_settings: list[str], tiny_ham_factory: Callable[..., Path]
) -> dict:
    """A run trained on benign vs malignant; returns its folder, metrics, data and schema."""
    os.environ["MMLESION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    root = tiny_ham_factory(tmp_path_factory.mktemp("data") / "dataset", n_lesions=42)
    schema = dataclasses.replace(
        preset("ham10000"),
        name="tiny_binary",
        classes=("benign", "malignant"),
        class_names=("Benign lesion", "Malignant lesion"),
        key_class="malignant",
        binary=True,
    )
    dataset = read_dataset(root)
    table = dataset.metadata.assign(dx=np.where(dataset.metadata.dx.isin(MALIGNANT), "malignant", "benign"))
    data = LesionDataset(dataset.root, table, dataset.notes, schema)
    cfg = load_config(None, [*tiny_run_settings, f'data.root="{root}"'])
    folder = RunFolder(tmp_path_factory.mktemp("runs") / "binary")
    folder.begin_training(cfg)
    inputs = prepare_inputs(cfg, data, make_splits(cfg, data))
    folder.write_inputs(cfg, inputs.splits, inputs.encoder, schema=schema)
    train_model(inputs, folder, show=False)
    evaluation = evaluate(inputs, folder, show=False)
    folder.write_metrics(evaluation.metrics)
    figures = save_evaluation_figures(evaluation)
    return {"folder": folder.path, "metrics": evaluation.metrics, "data": data, "figures": figures, "root": root}


def test_the_model_head_and_the_metrics_have_the_schema_s_classes(binary_run: dict) -> None:
    metrics = binary_run["metrics"]
    assert metrics["key_class"] == "malignant" and set(metrics["balanced_bias"]) == {"benign", "malignant"}
    test = metrics["test"]["calibrated"]
    assert set(test["per_class"]) == {"benign", "malignant"} and len(test["confusion_matrix"]) == 2
    predictions = pd.read_csv(binary_run["folder"] / "predictions_test.csv")
    assert list(predictions.columns) == ["image_id", "target", "p_benign", "p_malignant"]
    is_key = (predictions.target == "malignant").to_numpy()
    assert test["key_auroc"] == pytest.approx(roc_auc_score(is_key, predictions.p_malignant))
    assert test["binary"]["auroc"] == pytest.approx(test["key_auroc"])
    decided = (predictions.p_malignant > predictions.p_benign).to_numpy()
    assert test["binary"]["sensitivity"] == pytest.approx(decided[is_key].mean())
    assert np.isnan(test["melanoma_auroc"])  # no 'mel' class: the HAM10000 name is not faked
    triage = metrics["test"]["uncertainty"]["key_triage"]
    assert triage["n_key_test"] == is_key.sum()


def test_the_run_reloads_with_its_schema_and_predicts_its_classes(binary_run: dict) -> None:
    folder = binary_run["folder"]
    assert RunFolder(folder).read_schema().classes == ("benign", "malignant")
    predictor = Predictor.load(folder)
    assert predictor.schema.classes == ("benign", "malignant") and predictor.run.balanced is not None
    image = binary_run["data"].metadata.path.iloc[0]
    probs = predict_image(folder, image, age=50, sex="male", localization="back")
    assert set(probs) == {"benign", "malignant"} and sum(probs.values()) == pytest.approx(1, abs=1e-5)
    out = json.loads((folder / "metrics.json").read_text())
    assert out["test"]["calibrated"]["n_images"] == len(pd.read_csv(folder / "predictions_test.csv"))


def test_figures_are_drawn_for_the_schema_s_classes(binary_run: dict) -> None:
    names = {p.name for p in binary_run["figures"]}
    assert {"confusion_test.png", "roc_test.png", "confusion_val.png"} <= names
    assert all(p.stat().st_size > 1000 for p in binary_run["figures"])
