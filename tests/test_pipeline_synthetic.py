"""End to end on the synthetic default with the real offline ImageNet backbone: the planted signal
is found (fusion beats image-only, SHAP ranks age first, Grad-CAM falls on the lesion), and the
ablation / explanation outputs are complete and consistent. The embedding pass runs on the exported
OpenVINO graph (the test extra installs it; tests/test_embedding_pass.py holds it to eager torch)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from multimodal_lesion.ablation import run_ablation
from multimodal_lesion.config import ModelConfig, load_config
from multimodal_lesion.data.constants import CLASSES
from multimodal_lesion.models import fuses_on_maps, list_models
from multimodal_lesion.workflows import explain_run, train_run

pytestmark = pytest.mark.slow
#: every registered model that trains on frozen embeddings (the map-fusion models need the maps)
FROZEN_MODELS = [name for name in list_models() if not fuses_on_maps(name)]
SETTINGS = [
    "data.synthetic_n=600",
    "data.image_size=[120, 160]",
    "train.batch_size=128",
    "train.epochs=40",
    "train.patience=8",
    "ablation.folds=3",
    "ablation.seeds=[0]",
    "ablation.bootstrap=500",
    f"ablation.models={json.dumps(FROZEN_MODELS)}",
    "explain.n_cases=14",  # every registered model
    "explain.faithfulness_cases=6",
    "explain.randomisation_cases=3",
    "explain.steps=6",
    "explain.road_percentiles=[50]",  # one ROAD level: the curves were two thirds of this module's time
    'explain.target_layer="blocks.5"',  # the demo's layer (stride 32, before the last block and the conv head)
    'train.embed_backend="openvino"',  # the [fast] extra's exported graph (equal to 2e-5): 52 s -> 10 s here
]
FUSION = ModelConfig().name  # the default model (a fusion model: checked below) is trained and explained
GBM = "gbm_metadata"  # the ablation's gradient-boosting floor on the patient features


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict:
    os.environ["MMLESION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    out = tmp_path_factory.mktemp("synthetic")
    cfg = load_config(None, SETTINGS)
    paths = run_ablation(cfg, out / "ablation", show=False)
    train_run(load_config(None, [*SETTINGS, f"model.name={json.dumps(FUSION)}"]), out / "run", show=False)
    index = explain_run(out / "run", out / "report", show=False)
    return {"out": out, "paths": paths, "index": index, "cfg": cfg}


def test_fusion_beats_image_only_by_a_clear_margin(work: dict, model_inputs: dict[str, frozenset[str]]) -> None:
    baseline = work["cfg"].ablation.baseline
    assert model_inputs[FUSION] == {"image", "meta"} and model_inputs[baseline] == {"image"}
    comparison = pd.read_csv(work["paths"]["comparison"]).set_index("model")
    assert comparison.loc[FUSION, "mean_diff"] > 0.10, comparison
    results = pd.read_csv(work["paths"]["results"])
    ba = results.groupby("model")["balanced_accuracy"].mean()
    single = [name for name, reads in model_inputs.items() if len(reads) == 1]  # image only or metadata only
    assert baseline in single and any(model_inputs[name] == {"meta"} for name in single)
    assert all(ba[FUSION] > ba[name] for name in single), ba
    assert ba[GBM] < ba[FUSION]


def test_ablation_outputs_are_complete(work: dict) -> None:
    cfg, paths = work["cfg"], work["paths"]
    results = pd.read_csv(paths["results"])
    assert cfg.ablation.models == tuple(FROZEN_MODELS) and cfg.ablation.gbm
    assert len(results) == (len(cfg.ablation.models) + 1) * cfg.ablation.folds * len(cfg.ablation.seeds)  # + GBM
    # every lesion is tested exactly once per seed
    assert results.groupby(["model", "seed"])["n_images"].sum().nunique() == 1
    summary = pd.read_csv(paths["summary"])
    assert {"mean", "std", "ci_low", "ci_high"} <= set(summary.columns)
    row = summary[(summary.model == FUSION) & (summary.metric == "balanced_accuracy")].iloc[0]
    assert row.ci_low <= row["mean"] <= row.ci_high
    text = Path(paths["summary_md"]).read_text()
    assert "lesions" in text and "where metadata helps and where it hurts" in text
    subgroups = pd.read_csv(paths["subgroups"])
    assert set(subgroups.attribute) == {"sex", "age_band", "localization"}
    assert {"<30", "30-50", "50-70", ">=70"} & set(subgroups.value)
    assert subgroups["too_small"].any() and "n_lesions" in subgroups
    for key in ("plot_balanced_accuracy", "plot_macro_auroc", "plot_per_class"):
        assert Path(paths[key]).stat().st_size > 5000


def test_ablation_resume_keeps_finished_cells(work: dict) -> None:
    cells = sorted((work["out"] / "ablation" / "cells").glob("*.json"))
    stamp = {p: p.stat().st_mtime_ns for p in cells}
    victim = cells[0]
    victim.unlink()
    run_ablation(work["cfg"], work["out"] / "ablation", show=False)
    assert victim.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items() if p != victim)


def test_shap_ranks_the_planted_feature_first(work: dict) -> None:
    cases = json.loads((work["out"] / "report" / "explanations.json").read_text())["cases"]
    mean_abs = pd.DataFrame([c["shap"] for c in cases]).abs().mean()
    assert mean_abs.idxmax() == "age", mean_abs
    for c in cases:  # additivity, as written to disk
        assert c["shap_base_value"] + sum(c["shap"].values()) == pytest.approx(c["model_output"], abs=1e-5)
        assert c["modality_base_value"] + sum(c["modality"].values()) == pytest.approx(c["model_output"], abs=1e-5)
        assert c["target_class"] in CLASSES and set(c["probabilities"]) == set(CLASSES)


def test_gradcam_falls_on_the_planted_lesion(work: dict) -> None:
    """Most of the CAM's energy falls inside the planted lesion (a median ~24% of the image, as in
    the real masks), far more than for the smooth random map (~ the area share), and its maximum
    usually falls inside; every case explains the probability it displays."""
    report = json.loads((work["out"] / "report" / "explanations.json").read_text())
    cases = report["cases"]
    faith = pd.DataFrame([c["faithfulness"] for c in cases if c["faithfulness"]])
    assert faith["energy_inside"].mean() > 0.5, faith.describe()
    assert faith["energy_inside"].mean() > 2 * faith["energy_inside_smooth_random"].mean(), faith.describe()
    assert faith["pointing_game"].mean() >= 0.5
    verdicts = {(c["metric"], c["baseline"]): c["verdict"] for c in report["comparisons"]}
    assert verdicts[("energy_inside", "smooth_random")] == "better", verdicts
    for c in cases:
        assert c["explained_probability"] == pytest.approx(c["probabilities"][c["target_class"]], abs=1e-5)
    cam = np.load(work["out"] / "report" / cases[0]["cam"])
    assert cam.shape == tuple(work["cfg"].data.image_size) and cam.min() >= 0 and cam.max() <= 1


def test_report_pages_exist_for_every_case(work: dict) -> None:
    index = work["index"]
    html = index.read_text()
    cases = json.loads((work["out"] / "report" / "explanations.json").read_text())["cases"]
    assert len(list((index.parent / "cases").glob("*.html"))) == len(cases)
    assert "http://" not in html and "https://" not in html
    assert all(c["image_id"] in html for c in cases)
