"""The training engine and run folders, on real (tiny) data with real timm backbones."""

from __future__ import annotations

import csv
import itertools
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
import torch

from multimodal_lesion.config import ExperimentConfig, TrainConfig, load_config, to_toml
from multimodal_lesion.data.constants import CLASSES, METADATA_FILE
from multimodal_lesion.errors import CheckpointError, ConfigError
from multimodal_lesion.models import create_model, embed_images
from multimodal_lesion.runs import load_checkpoint, load_run, predict_image, predict_logits, seed_everything
from multimodal_lesion.runs.inputs import with_concrete_backend
from multimodal_lesion.training.engine import (
    WeightAverage,
    WeightedSmoothedCrossEntropy,
    build_loss,
    build_scheduler,
    class_weights,
)
from multimodal_lesion.training.stats import grouped_balanced_accuracy_ci
from multimodal_lesion.workflows import evaluate_run, train_run

TINY = [
    'model.backbone="resnet18"',
    'model.weights="none"',
    "data.image_size=[48, 64]",
    "train.epochs=3",
    "train.batch_size=16",
    "train.warmup_epochs=1",
    "data.test_size=0.25",
    "data.val_size=0.25",
]
METRIC_KEYS = {
    "accuracy",
    "balanced_accuracy",
    "macro_f1",
    "macro_auroc",
    "per_class",
    "melanoma_sensitivity_at_specificity_0.80",
    "ece",
    "nll",
    "brier",
    "confusion_matrix",
    "n_images",
    "n_lesions",
}


def tiny_cfg(root: Path, *extra: str) -> ExperimentConfig:
    return load_config(None, [*TINY, f'data.root="{root}"', *extra])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory, tiny_ham_factory: Callable[..., Path]) -> Path:
    os.environ["MMLESION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return tiny_ham_factory(tmp_path_factory.mktemp("data") / "dataset", n_lesions=42)


@pytest.fixture(scope="module")
def frozen_run(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "concat"
    return out, train_run(tiny_cfg(data_root, 'model.name="concat"'), out, show=False)


def test_run_folder_is_complete(frozen_run: tuple[Path, dict]) -> None:
    out, metrics = frozen_run
    for name in (
        "config.toml",
        "splits.csv",
        "encoder.json",
        "best.pt",
        "last.pt",
        "history.csv",
        "metrics.json",
        "versions.json",
        "figures/confusion_test.png",
        "figures/roc_test.png",
        "figures/reliability_test.png",
        "figures/risk_coverage_test.png",
    ):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.tmp")), "a temp file was left behind"
    with open(out / "history.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 3
    on_disk = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        for variant in ("uncalibrated", "calibrated", "balanced"):
            assert set(on_disk[split][variant]) >= METRIC_KEYS
    assert on_disk["temperature"] > 0 and on_disk["balanced_temperature"] > 0
    assert list(on_disk["balanced_bias"]) == list(CLASSES)
    assert sum(on_disk["balanced_bias"].values()) == pytest.approx(0.0, abs=1e-3)
    assert set(metrics["n_lesions"]) == {"train", "val", "test"}
    versions = json.loads((out / "versions.json").read_text())
    assert versions["torch"] == torch.__version__.split("+")[0] or versions["torch"].startswith(torch.__version__[:4])


def test_balanced_accuracies_carry_the_lesion_bootstrap_interval_of_their_predictions(
    frozen_run: tuple[Path, dict], data_root: Path
) -> None:
    out, _ = frozen_run
    on_disk = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        for variant in ("calibrated", "balanced"):
            m = on_disk[split][variant]
            ci = m["balanced_accuracy_ci"]
            assert ci["n_groups"] == m["n_lesions"] and ci["n_boot"] == 2000 and ci["ci"] == 0.95
            assert 0 <= ci["ci_low"] < ci["ci_high"] <= 1
    # the test interval is that of the written predictions' arg-max, resampling the split's lesions
    scored = pd.read_csv(out / "predictions_test.csv")
    lesions = pd.read_csv(data_root / METADATA_FILE).set_index("image_id").loc[scored.image_id, "lesion_id"]
    probs = scored[[f"p_{c}" for c in CLASSES]].to_numpy()
    y = scored.target.map(CLASSES.index).to_numpy()
    again = grouped_balanced_accuracy_ci(y, probs.argmax(1), lesions.to_numpy())
    assert again == pytest.approx(on_disk["test"]["calibrated"]["balanced_accuracy_ci"])


def test_resolved_config_is_written(frozen_run: tuple[Path, dict], data_root: Path) -> None:
    out, _ = frozen_run
    written = load_config(out / "config.toml")
    assert written == with_concrete_backend(tiny_cfg(data_root, 'model.name="concat"'))
    assert written.train.embed_backend in {"torch", "onnxruntime", "openvino"}  # the backend that ran, never auto


def test_frozen_cache_gives_the_same_predictions_as_the_live_backbone(frozen_run: tuple[Path, dict]) -> None:
    run = load_run(frozen_run[0])
    prep = run.inputs
    rows = prep.indices("test")
    cached, _, ids = predict_logits(prep.model, prep.batches("test", train=False, show=False), prep.device)
    pixels = torch.from_numpy(np.array(prep.images()[rows])).permute(0, 3, 1, 2)
    x = torch.stack([prep.normalize(p) for p in pixels])
    with torch.no_grad():
        emb = embed_images(prep.model.image_branch, x, prep.cfg.train.flip_average)
        live = prep.model.forward_head(emb, torch.from_numpy(prep.meta[rows])).numpy()
    assert ids == [prep.image_ids[i] for i in rows]
    np.testing.assert_allclose(cached, live, rtol=1e-4, atol=1e-4)


def test_evaluate_writes_metrics_and_figures(frozen_run: tuple[Path, dict]) -> None:
    metrics, path = evaluate_run(frozen_run[0], "test", show=False)
    assert path.is_file() and set(metrics["test"]["calibrated"]) >= METRIC_KEYS
    assert (path.parent / "figures" / "roc_test.png").is_file()
    # evaluation reproduces what training reported
    trained = json.loads((frozen_run[0] / "metrics.json").read_text())
    assert metrics["test"]["calibrated"]["balanced_accuracy"] == pytest.approx(
        trained["test"]["calibrated"]["balanced_accuracy"]
    )


def test_predict_with_and_without_patient_fields(frozen_run: tuple[Path, dict], data_root: Path) -> None:
    image = next(data_root.rglob("*.jpg"))
    full = predict_image(frozen_run[0], image, age=45, sex="male", localization="back")
    bare = predict_image(frozen_run[0], image)
    for probs in (full, bare):
        assert list(probs) == list(CLASSES)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert full != bare  # the concat model looks at the metadata


def test_predict_balanced_applies_the_run_s_temperature_and_biases(
    frozen_run: tuple[Path, dict], data_root: Path, tmp_path: Path
) -> None:
    """softmax(z / T_b + b), z = T * log p being the calibrated probabilities' logits (up to a constant).
    T_b and b are set by hand in a copy of the run, so the check does not hang on what a tiny run fits."""
    run = tmp_path / "run"
    shutil.copytree(frozen_run[0], run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["balanced_bias"]) == set(CLASSES) and metrics["balanced_temperature"] > 0  # written by train
    bias = np.array([2.0, -1.0, 0.5, 0.0, -0.5, 0.0, -1.0])
    metrics.update(balanced_temperature=0.5, balanced_bias=dict(zip(CLASSES, bias.tolist(), strict=True)))
    (run / "metrics.json").write_text(json.dumps(metrics))
    image = next(data_root.rglob("*.jpg"))
    calibrated = np.array(list(predict_image(run, image, age=45).values()))
    balanced = np.array(list(predict_image(run, image, age=45, balanced=True).values()))
    expected = np.exp(metrics["temperature"] * np.log(calibrated) / 0.5 + bias)
    assert np.allclose(balanced, expected / expected.sum(), atol=1e-4)
    assert balanced.argmax() == 0 and balanced.sum() == pytest.approx(1.0, abs=1e-5)
    (run / "metrics.json").unlink()
    with pytest.raises(CheckpointError, match="no balanced decision"):
        predict_image(run, image, balanced=True)


@pytest.mark.slow
def test_end_to_end_training_with_augmentation_and_tta(data_root: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(
        data_root,
        'train.mode="end2end"',
        'train.augment="strong"',
        "train.tta=true",
        'train.balance="sampler"',
        'model.name="film"',
        "train.epochs=2",
    )
    metrics = train_run(cfg, tmp_path / "e2e", show=False)
    assert metrics["tta"] is True and set(metrics["test"]["calibrated"]) >= METRIC_KEYS
    trained = load_run(tmp_path / "e2e").inputs.model
    seed_everything(cfg.train.seed)  # the initial weights, as prepare() builds them
    initial = create_model("film", meta_dim=trained.meta_branch.in_dim, cfg=cfg.model)
    # end-to-end training changed the backbone, and the saved checkpoint holds the fine-tuned one
    assert not torch.equal(initial.image_branch.model.conv1.weight, trained.image_branch.model.conv1.weight)


def test_class_weights_and_schedule() -> None:
    w = class_weights(np.array([0, 0, 0, 1]), 3)
    assert w[2] == 0 and w[1] > w[0] and float(w[w > 0].mean()) == pytest.approx(1.0)
    cfg = load_config(None, ["train.epochs=10", "train.warmup_epochs=2"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, cfg.train, steps_per_epoch=5)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and max(lrs) == pytest.approx(1.0) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:])) and lrs[-1] < 0.01


@pytest.mark.slow
def test_smoothed_loss_matches_pytorch_where_pytorch_is_right() -> None:
    """No class weights, or no smoothing: the loss is exactly torch's cross-entropy."""
    gen = torch.Generator().manual_seed(0)
    logits, target = torch.randn(32, 7, generator=gen), torch.randint(0, 7, (32,), generator=gen)
    weights = class_weights(np.array([0] * 50 + [1] * 5 + [2, 3, 4, 5, 6] * 3), 7)
    assert torch.allclose(
        WeightedSmoothedCrossEntropy(None, 0.1)(logits, target),
        torch.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, target),
    )
    assert torch.allclose(
        WeightedSmoothedCrossEntropy(weights, 0.0)(logits, target),
        torch.nn.CrossEntropyLoss(weight=weights)(logits, target),
    )


def _minimiser(loss_fn: torch.nn.Module, target: int, classes: int = 7) -> torch.Tensor:
    """Softmax of the logits that minimise ``loss_fn`` for one image of class ``target``."""
    logits = torch.zeros(1, classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [logits], max_iter=500, tolerance_grad=1e-10, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(logits, torch.tensor([target]))
        loss.backward()
        return loss

    opt.step(closure)
    return torch.softmax(logits.detach(), 1)[0]


def test_class_weights_do_not_move_the_smoothed_target() -> None:
    """With inverse-frequency weights the best answer for a common-class image is still the smoothed
    label (1 - e + e/K, and e/K for every other class); torch's weighted smoothing instead pushes it
    towards the rare classes (pytorch/pytorch#104776), which is what flattened rare-class AUROC."""
    weights = class_weights(
        np.array([0] * 670 + [1] * 110 + [2] * 110 + [3] * 50 + [4] * 30 + [5] * 14 + [6] * 11), 7
    ).double()
    e, k = 0.1, 7
    ours = _minimiser(build_loss(TrainConfig(label_smoothing=e), weights, torch.device("cpu")), target=0)
    expected = torch.full((k,), e / k)
    expected[0] += 1 - e
    assert torch.allclose(ours, expected.double(), atol=1e-6)
    torchs = _minimiser(torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=e), target=0)
    assert torchs[6] > 5 * expected[6]  # the rarest class gets several times its share


@pytest.mark.slow
def test_distributed_data_parallel_on_cpu_with_two_processes(data_root: Path, tmp_path: Path) -> None:
    config = tmp_path / "ddp.toml"
    config.write_text(to_toml(tiny_cfg(data_root, 'train.mode="end2end"', 'train.device="cpu"', "train.epochs=2")))
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "multimodal_lesion.cli",
            "train",
            "--config",
            str(config),
            "--out",
            str(tmp_path / "ddp"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert set(metrics["test"]["calibrated"]) >= METRIC_KEYS


def test_weight_average_follows_its_formula_and_copies_integer_buffers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    ema = WeightAverage(model, decay=0.9)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked += 5
    ema.update(model)  # first update: decay ramps to min(0.9, 2 / 11)
    keep = 2 / 11
    expected = keep * start["0.weight"] + (1 - keep) * model[0].weight.detach()
    assert torch.allclose(ema.state["0.weight"], expected)
    assert ema.state["1.num_batches_tracked"] == 5
    for _ in range(200):
        ema.update(model)
    assert torch.allclose(ema.state["0.weight"], model[0].weight.detach(), atol=1e-6)
    with pytest.raises(ConfigError, match=re.escape("train.ema_decay")):
        WeightAverage(model, decay=1.5)


@pytest.mark.slow
def test_run_with_weight_averaging_keeps_the_average(data_root: Path, tmp_path: Path) -> None:
    # one epoch, so the kept (best) epoch is known: its weights must be the average, not the live ones
    cfg = tiny_cfg(data_root, 'model.name="concat"', "train.ema_decay=0.9", "train.epochs=1")
    train_run(cfg, tmp_path / "ema", show=False)
    last = load_checkpoint(tmp_path / "ema" / "last.pt")
    best = load_checkpoint(tmp_path / "ema" / "best.pt")["model"]
    assert last["ema_updates"] > 0 and last["state"]["best_epoch"] == 1
    heads = [k for k, v in best.items() if v.is_floating_point() and k.startswith("head")]
    assert heads and all(torch.equal(best[k], last["ema"][k]) for k in heads)
    assert any(not torch.equal(best[k], last["model"][k]) for k in heads)
