"""Feature-map fusion: the metadata changes the maps (and Grad-CAM's layer), late fusion does not; the
image-state split, the missing token, the frozen-mode refusal and a real partial run of each model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from multimodal_lesion.config import ModelConfig
from multimodal_lesion.errors import ConfigError
from multimodal_lesion.models import ImageBranch, LesionModel, MetaLayout, create_model, fuses_on_maps, list_models

META_DIM = 6
BATCH = 4
IMAGE_SHAPE = (3, 48, 64)
CFG = ModelConfig(backbone="test_resnet", weights="none", meta_hidden=8, head_hidden=16, dropout=0.0)
#: feature groups of a 6-column encoding: age (z, missing flag), sex (2 one-hot), site (2 one-hot)
LAYOUT = MetaLayout(((0, 1), (2, 3), (4, 5)), (0.0, 1.0, 0.0, 1.0, 0.0, 1.0))

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def branch() -> ImageBranch:
    """One random-init tiny backbone shared by every model of a test (tail: its last stage, layer4)."""
    torch.manual_seed(0)
    return ImageBranch(CFG.backbone, weights="none")


def build(name: str, branch: ImageBranch, seed: int = 1) -> LesionModel:
    """A model whose metadata path has moved off its initialisation, as after training.

    FiLM generators start at zero (identity); random steps of every weight outside the backbone
    stand in for the training that would move them, so the test sees what the architecture lets
    the metadata do.
    """
    torch.manual_seed(seed)
    model = create_model(name, meta_dim=META_DIM, cfg=CFG, image_branch=branch, meta_layout=LAYOUT)
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if not name_.startswith("image_branch."):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    meta = torch.randn(BATCH, META_DIM, generator=g)
    return {"image": torch.randn(BATCH, *IMAGE_SHAPE, generator=g), "meta": meta}


def cam_activations(model: LesionModel, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the output of ``model.cam_layer()``) of one forward pass."""
    seen: list[torch.Tensor] = []
    handle = model.cam_layer().register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            logits = model(b)
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].ndim == 4
    return logits, seen[0]


def test_the_registry_marks_the_map_models(model_inputs: dict[str, frozenset[str]]) -> None:
    maps = {name for name in list_models() if fuses_on_maps(name)}
    assert maps == {"metanet", "metablock", "film_maps", "cross_attention"}
    assert maps == {name for name, reads in model_inputs.items() if "maps" in reads}


def test_metadata_changes_the_output_and_the_post_fusion_map(map_fusion_model: str, branch: ImageBranch) -> None:
    model = build(map_fusion_model, branch)
    assert model.fuses_on_maps and model.uses_meta
    b = batch()
    logits, maps = cam_activations(model, b)
    other_logits, other_maps = cam_activations(model, {**b, "meta": b["meta"].flip(0)})
    assert not torch.allclose(maps, other_maps, atol=1e-5), "the metadata does not reach the last map"
    assert not torch.allclose(logits, other_logits, atol=1e-5), "the output ignores the metadata"
    _, image_maps = cam_activations(model, {**b, "image": b["image"].flip(0)})
    assert not torch.allclose(maps, image_maps, atol=1e-5), "the last map ignores the image"


def test_late_fusion_leaves_the_cam_layer_unchanged(fusion_model: str, branch: ImageBranch) -> None:
    model = build(fusion_model, branch)
    assert not model.fuses_on_maps
    assert model.cam_layer() is branch.default_target_layer()
    b = batch()
    logits, maps = cam_activations(model, b)
    other_logits, other_maps = cam_activations(model, {**b, "meta": b["meta"].flip(0)})
    torch.testing.assert_close(maps, other_maps)  # late fusion never changes what the network looks at
    assert not torch.allclose(logits, other_logits, atol=1e-5)


def test_gradients_reach_the_metadata(map_fusion_model: str, branch: ImageBranch) -> None:
    model = build(map_fusion_model, branch).train()
    b = batch()
    meta = b["meta"].clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model({**b, "meta": meta}), torch.arange(BATCH) % 7).backward()
    assert meta.grad is not None and float(meta.grad.abs().sum()) > 0
    assert model.map_fusion is not None
    grads = [p.grad for p in model.map_fusion.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0


@pytest.mark.parametrize("name", ["metanet", "metablock", "film_maps", "cross_attention", "concat"])
def test_tail_blocks_zero_fuses_on_the_last_block_and_splits_at_the_image_state(name: str) -> None:
    """EfficientNet, tail_blocks=0 (the cheap recipe): the state is the last block's maps, the conv head the tail."""
    torch.manual_seed(0)
    cfg = ModelConfig(backbone="tf_efficientnet_lite0", weights="none", head_hidden=16, tail_blocks=0)
    model = create_model(name, meta_dim=META_DIM, cfg=cfg, meta_layout=LAYOUT).eval()
    b = batch()
    with torch.no_grad():
        state = model.image_state(b["image"])
        whole = model(b)
        split = model.from_image_state(state, b["meta"])
        maps = model.image_branch.forward_maps(b["image"])  # what partial mode caches, for every model
        views = model({"maps": torch.stack([maps, maps], dim=1), "meta": b["meta"]})
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(views, whole, rtol=1e-5, atol=1e-5)  # TTA over cached views: the mean
    branch = model.image_branch
    assert branch is not None and branch.trainable_tail() == []
    if model.fuses_on_maps:
        assert state.shape[1] == 320  # blocks.6, the last block's output
        assert model.image_state(b["image"]).shape == branch.forward_maps(b["image"]).shape
    with pytest.raises(ConfigError, match="no convolution after the fusion point"):  # ResNets have no conv head
        create_model(
            "metanet", meta_dim=META_DIM, cfg=ModelConfig(backbone="test_resnet", weights="none", tail_blocks=0)
        )


def test_cross_attention_reads_a_missing_feature_as_its_missing_token(branch: ImageBranch) -> None:
    model = build("cross_attention", branch)
    b = batch()
    missing = b["meta"].clone()
    missing[:, 2:4] = torch.tensor([0.0, 1.0])  # sex = the encoder's "missing" encoding
    with torch.no_grad():
        before = model(dict(b, meta=missing))
        assert model.map_fusion is not None
        model.map_fusion.tokens.embed[1].weight.mul_(5)  # the sex embedding no longer matters...
        after = model(dict(b, meta=missing))
        changed = model(b)  # ...except where sex is given
        model.map_fusion.tokens.embed[1].weight.div_(5)
        restored = model(b)
    torch.testing.assert_close(before, after)
    assert not torch.allclose(changed, restored, atol=1e-5)


def test_late_models_have_no_head_path_for_map_models(branch: ImageBranch) -> None:
    model = build("metanet", branch)
    with pytest.raises(ConfigError, match="feature maps"):
        model.forward_head(torch.zeros(2, branch.num_features), torch.zeros(2, META_DIM))
    with pytest.raises(ConfigError, match="multiscale"):
        create_model(
            "film_maps", meta_dim=META_DIM, cfg=ModelConfig(backbone="test_resnet", weights="none", multiscale=True)
        )


def test_frozen_mode_refuses_map_models_in_one_line(cli, cli_ham: Path, tmp_path: Path) -> None:
    proc = cli("train", "--data", cli_ham, "--out", tmp_path / "run", "--set", 'model.name="metablock"')
    line = cli.error(proc, "train", "metablock", "partial")
    assert "frozen" in line and not (tmp_path / "run").exists()
    from multimodal_lesion.ablation import run_ablation
    from multimodal_lesion.config import load_config

    cfg = load_config(None, ['ablation.models=["image_only", "metanet"]', 'ablation.mode="frozen"'])
    with pytest.raises(ConfigError, match=r"metanet.*partial"):  # before any data is read or written
        run_ablation(cfg, tmp_path / "ablation", show=False)
    assert not (tmp_path / "ablation").exists()


#: A tiny partial run: the test backbone's last stage (layer4) is the tail the metadata conditions.
PARTIAL_RUN = [
    "--set", 'train.mode="partial"', "--set", "train.tta=true", "--set", "train.epochs=1",
    "--set", "train.meta_dropout=0.3",
]  # fmt: skip


@pytest.fixture(scope="module")
def partial_runs(
    cli, cli_ham: Path, tmp_path_factory: pytest.TempPathFactory, tiny_run_settings: list[str]
) -> Callable[[str], Path]:
    """One trained partial run per map model, made on first use and shared by the tests of this module."""
    made: dict[str, Path] = {}
    settings = [arg for s in tiny_run_settings for arg in ("--set", s)]

    def run(name: str) -> Path:
        if name not in made:
            out = tmp_path_factory.mktemp("partial") / name
            cli.ok(
                cli("train", "--data", cli_ham, "--out", out, *settings, *PARTIAL_RUN, "--set", f'model.name="{name}"')
            )
            made[name] = out
        return made[name]

    return run


def check_partial_run(cli, run: Path, cli_ham: Path, external: Path | None) -> None:
    """The run trained, calibrated, scored conformal sets and missing metadata, evaluates (own data, and
    ``external`` when given) and predicts from its folder."""
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["mode"] == "partial" and metrics["tta"] is True and metrics["balanced_bias"]
    test = metrics["test"]
    assert {"full", "none/unknown", "none/marginalise"} <= set(test["missing_metadata"])
    assert test["uncertainty"]
    image = next((cli_ham / "HAM10000_images_part_1").glob("*.jpg"))
    shown = json.loads(cli.ok(cli("predict", "--run", run, "--image", image, "--age", "50", "--sex", "male")).stdout)
    assert shown["prediction_sets"] and shown["tta_spread"] is not None  # conformal sets; spread over the 4 flips
    assert abs(sum(shown["probabilities"].values()) - 1) < 1e-3
    cli.ok(cli("evaluate", "--run", run))
    if external is not None:
        cli.ok(cli("evaluate", "--run", run, "--data", external, "--schema", "isic2020", "--key-vs-rest"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["metanet", "metablock", "film_maps", "cross_attention"])
def test_a_partial_run_of_each_map_model_trains_evaluates_and_predicts(
    name: str, cli, partial_runs, cli_ham: Path, tiny_isic2020: Path
) -> None:
    # External data goes through the same MapFusion path for every map model: one of them scores it (the suite's time)
    check_partial_run(cli, partial_runs(name), cli_ham, tiny_isic2020 if name == "cross_attention" else None)


def test_a_tiny_partial_map_model_run_scores_missing_metadata_and_predicts(
    tmp_path: Path, tiny_ham_factory: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast one of the subject: a partial cross_attention run in process, then a prediction from its folder."""
    from multimodal_lesion.config import load_config
    from multimodal_lesion.runs import Case, predict_case
    from multimodal_lesion.workflows import train_run

    monkeypatch.setenv("MMLESION_CACHE", str(tmp_path / "cache"))
    root = tiny_ham_factory(tmp_path / "dataset", n_lesions=14)
    settings = [
        'model.name="cross_attention"', 'model.backbone="test_resnet"', 'model.weights="none"',
        "data.image_size=[32, 32]", 'train.mode="partial"', "train.epochs=1", "train.batch_size=8", "train.tta=true",
        "data.test_size=0.3", "data.val_size=0.3", f'data.root="{root}"', "uncertainty.bootstrap=20",
    ]  # fmt: skip
    metrics = train_run(load_config(None, settings), tmp_path / "run", show=False)
    assert metrics["mode"] == "partial"
    missing = metrics["test"]["missing_metadata"]
    assert {"full", "no_age/unknown", "none/unknown", "none/marginalise"} <= set(missing)
    image = next((root / "HAM10000_images_part_1").glob("*.jpg"))
    prediction = predict_case(tmp_path / "run", Case(image, {"age": 40}))
    assert prediction.view_probs.shape == (4, 7) and abs(sum(prediction.probs.values()) - 1) < 1e-3


@pytest.mark.slow
def test_metadata_changes_the_trained_metanets_maps_on_real_images(partial_runs) -> None:
    """After training on the synthetic data, two patients give two different last maps of one image."""
    from multimodal_lesion.runs import load_run

    run = load_run(partial_runs("metanet"), show=False)
    inputs, model = run.inputs, run.inputs.model.eval()
    rows = inputs.indices("test")[:4]
    images = inputs.normalized_images(rows)
    meta = torch.from_numpy(inputs.meta[rows])
    blank = torch.from_numpy(np.repeat(inputs.encoder.missing_row()[None], len(rows), 0).astype(np.float32))
    _, given = cam_activations(model, {"image": images, "meta": meta})
    _, unknown = cam_activations(model, {"image": images, "meta": blank})
    assert not torch.allclose(given, unknown, atol=1e-6)


def test_the_summary_pairs_map_models_with_the_best_late_model_and_tables_missing_metadata() -> None:
    from multimodal_lesion.ablation.summary import best_late_model, map_fusion_comparison, missing_metadata_frame

    rng = np.random.default_rng(0)
    level = {"image_only": 0.60, "concat": 0.62, "film": 0.65, "metanet": 0.70, "cross_attention": 0.64}
    records = [
        {
            "model": model,
            "fold": fold,
            "seed": 0,
            "balanced_accuracy": ba + rng.normal(0, 0.005),
            "missing_metadata": {
                "full": {"balanced_accuracy": ba, "macro_auroc": 0.9},
                "none/unknown": {"balanced_accuracy": ba - 0.05, "macro_auroc": 0.85},
            }
            if model != "image_only"
            else {},
        }
        for model, ba in level.items()
        for fold in range(5)
    ]
    results = pd.DataFrame([{k: r[k] for k in ("model", "fold", "seed", "balanced_accuracy")} for r in records])
    assert best_late_model(results) == "film"  # not image_only, not a map model
    compared = map_fusion_comparison(results, n_folds=5, n_boot=200).set_index("model")
    assert sorted(compared.index) == ["cross_attention", "metanet"] and set(compared.baseline) == {"film"}
    assert compared.loc["metanet", "mean_diff"] == pytest.approx(0.05, abs=0.01)
    assert compared.loc["metanet", "ci_low"] > 0 > compared.loc["cross_attention", "ci_high"]
    missing = missing_metadata_frame(records).set_index(["model", "variant"])
    assert "image_only" not in missing.index.get_level_values(0)
    assert missing.loc[("metanet", "none"), "balanced_accuracy_mean"] == pytest.approx(0.65)
    assert (missing["n_cells"] == 5).all()
