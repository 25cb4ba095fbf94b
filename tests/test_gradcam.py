"""Grad-CAM on real (small, random-weight) registered models: maps, binding, hooks, state, a planted case."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from multimodal_lesion.errors import ConfigError
from multimodal_lesion.explain import CAM_METHODS, GradCamExplainer, energy_inside, pointing_game
from multimodal_lesion.models import LesionModel, list_models

H, W, D = 64, 48, 6  # image height and width; D: the metadata width of conftest's small models

pytestmark = pytest.mark.usefixtures("single_thread")


def hooks_of(layer: nn.Module) -> int:
    return len(layer._forward_hooks) + len(layer._backward_hooks) + len(layer._forward_pre_hooks)


@pytest.fixture(scope="module")
def gated(small_model: Callable[..., LesionModel]) -> LesionModel:
    return small_model("gated", meta_dim=D)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, H, W, generator=g), torch.randn(3, D, generator=g) * 2


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "hirescam"])
def test_maps_shape_range_and_state_restored(gated: LesionModel, batch, method: str) -> None:
    images, meta = batch
    gated.train()
    gated.meta_branch.eval()  # a mixed state must come back as it was
    gated.image_branch.requires_grad_(False)  # frozen-path backbone
    marker = torch.full_like(gated.head.classifier[-1].weight, 0.5)
    gated.head.classifier[-1].weight.grad = marker.clone()
    layer = gated.image_branch.default_target_layer()
    with GradCamExplainer(gated, method) as explainer:
        assert hooks_of(layer) > 0
        maps = explainer.explain(images, meta)
    assert maps.shape == (3, H, W) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1 and maps.max() > 0.99
    assert hooks_of(layer) == 0
    assert gated.training and gated.head.training and not gated.meta_branch.training
    assert not any(p.requires_grad for p in gated.image_branch.parameters())
    assert all(p.requires_grad for p in gated.head.parameters())
    assert torch.equal(gated.head.classifier[-1].weight.grad, marker)  # caller's grads untouched
    gated.requires_grad_(True).eval()


def test_each_case_uses_its_own_metadata(gated: LesionModel, batch) -> None:
    images, meta = batch
    targets = [2, 4, 5]
    explainer = GradCamExplainer(gated)
    together = explainer.explain(images, meta, targets)
    alone = np.concatenate(
        [explainer.explain(images[i : i + 1], meta[i : i + 1], targets[i : i + 1]) for i in range(3)]
    )
    np.testing.assert_allclose(together, alone, atol=1e-5)
    swapped = explainer.explain(images[:1], meta[1:2], targets[:1])
    assert np.abs(swapped[0] - together[0]).max() > 1e-3  # the gate sees the metadata


def test_default_target_is_the_predicted_class(gated: LesionModel, batch) -> None:
    images, meta = batch
    with torch.no_grad():
        predicted = gated.eval()({"image": images, "meta": meta}).argmax(1).tolist()
    with GradCamExplainer(gated, "gradcam") as explainer:
        np.testing.assert_allclose(explainer.explain(images, meta), explainer.explain(images, meta, predicted))
        assert not np.allclose(
            explainer.explain(images, meta, [(p + 1) % 7 for p in predicted]),
            explainer.explain(images, meta, predicted),
        )


def test_works_under_no_grad_and_with_a_frozen_backbone(gated: LesionModel, batch) -> None:
    images, meta = batch
    free = GradCamExplainer(gated).explain(images, meta)
    gated.image_branch.requires_grad_(False)
    try:
        with torch.no_grad():
            frozen = GradCamExplainer(gated).explain(images, meta)
    finally:
        gated.requires_grad_(True)
    np.testing.assert_allclose(frozen, free, atol=1e-6)


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model(name: str, batch, small_model: Callable[..., LesionModel]) -> None:
    model = small_model(name, meta_dim=D)
    images, meta = batch
    if not model.uses_image:
        with pytest.raises(ConfigError, match="image"):
            GradCamExplainer(model)
        return
    maps = GradCamExplainer(model).explain(images, meta if model.uses_meta else None, [0, 1, 2])
    assert maps.shape == (3, H, W) and maps.min() >= 0 and maps.max() <= 1


def test_scorecam_binds_each_cases_metadata(gated: LesionModel, batch) -> None:
    images, meta = batch
    explainer = GradCamExplainer(gated, "scorecam", target_layer="layer1")  # 64 channels: 64 masked copies
    together = explainer.explain(images[:2], meta[:2], [1, 3])
    second = explainer.explain(images[1:2], meta[1:2], [3])
    assert together.shape == (2, H, W)
    np.testing.assert_allclose(together[1], second[0], atol=1e-5)


def test_target_layer_by_dotted_path_and_errors(gated: LesionModel, batch) -> None:
    images, meta = batch
    layer3 = gated.image_branch.model.layer3
    with GradCamExplainer(gated, "gradcam", target_layer="layer3") as explainer:
        assert explainer.layer is layer3 and hooks_of(layer3) > 0
        assert explainer.explain(images[:1], meta[:1]).shape == (1, H, W)
    assert hooks_of(layer3) == 0
    with pytest.raises(ConfigError, match="layer9"):
        GradCamExplainer(gated, target_layer="layer9")
    with pytest.raises(ConfigError, match="gradcam"):
        GradCamExplainer(gated, method="nope")
    with pytest.raises(ConfigError, match="out of range"):
        GradCamExplainer(gated).explain(images[:1], meta[:1], [7])


def test_exceptions_propagate_and_hooks_are_released(gated: LesionModel) -> None:
    layer = gated.image_branch.default_target_layer()
    gated.train()
    for error in (RuntimeError, IndexError):  # the library's own __exit__ would swallow IndexError
        with pytest.raises(error), GradCamExplainer(gated):
            raise error("boom")
        assert hooks_of(layer) == 0 and gated.training
    gated.eval()


# --- a planted case (conftest's ``planted``): the class is decided by a bright square in a fixed corner ---


def test_planted_square_gets_the_cam_energy(planted) -> None:
    with torch.no_grad():
        probs = torch.softmax(planted.model({"image": planted.images, "meta": planted.meta}), -1)
    assert (probs[:, 1] > 0.5).all()  # the model did learn the square
    maps = GradCamExplainer(planted.model).explain(planted.images, planted.meta, [1] * 4)
    area = planted.mask.mean()  # ~10% of the image
    height, width = planted.size
    quadrant = np.zeros(planted.size, dtype=bool)
    quadrant[: height // 2, : width // 2] = True
    for cam in maps:
        assert energy_inside(cam, planted.mask) > 2.5 * area
        assert energy_inside(cam, quadrant) > 0.5
        assert pointing_game(cam, planted.mask)


def test_cam_methods_registry() -> None:
    assert set(CAM_METHODS) == {"gradcam", "gradcam++", "hirescam", "scorecam"}


# --- the CAM explains the shown prediction: same flips, same temperature ---------------------------


def test_cam_explains_the_displayed_flip_averaged_calibrated_probability(gated: LesionModel, batch) -> None:
    """The shown probability averages the embedding over 4 flips and is temperature-scaled; the old CAM
    explained one unflipped view through an uncalibrated softmax (0.107 apart on the demo)."""
    from multimodal_lesion.models import embed_images

    images, meta = batch
    targets, temperature = [1, 2, 3], 1.7
    with torch.no_grad():
        shown = torch.softmax(
            gated.eval().forward_head(embed_images(gated.image_branch, images, True), meta) / temperature, -1
        )
    shown_p = shown[torch.arange(3), targets].double().numpy()
    scored = GradCamExplainer(gated, flip_average=True, temperature=temperature).explain_scored(images, meta, targets)
    np.testing.assert_allclose(scored.probabilities, shown_p, atol=1e-5)
    plain = GradCamExplainer(gated).explain_scored(images, meta, targets)
    assert np.abs(plain.probabilities - shown_p).max() > 1e-3  # the old target differs
    flipped = GradCamExplainer(gated, flip_average=True).explain(images.flip(3), meta, targets)
    np.testing.assert_allclose(flipped[..., ::-1], scored.maps, atol=1e-4)  # one map of a flip-invariant output


def test_layer_geometry_names_stride_and_grid(gated: LesionModel) -> None:
    from multimodal_lesion.explain import layer_geometry

    assert str(layer_geometry(gated, None, (64, 48))) == "layer4 (stride 32, 2x2 grid)"
    assert layer_geometry(gated, "layer3", (64, 48)).stride == 16


def test_the_demo_layer_has_the_stride_its_config_says() -> None:
    """demo.toml's comment once called blocks.5 stride 16; at 168x224 it is stride 32 (blocks.4 is 16)."""
    import dataclasses
    import re
    from importlib.resources import as_file, files

    from multimodal_lesion.config import load_config
    from multimodal_lesion.explain import layer_geometry
    from multimodal_lesion.models import create_model

    with as_file(files("multimodal_lesion").joinpath("demo.toml")) as path:
        cfg, text = load_config(path), path.read_text()
    claimed = re.search(rf"{re.escape(cfg.explain.target_layer)}: stride (\d+)", text)
    assert claimed, "demo.toml must say the stride of its target layer"
    model = create_model("image_only", meta_dim=1, cfg=dataclasses.replace(cfg.model, weights="none"))
    geometry = layer_geometry(model, cfg.explain.target_layer, cfg.data.image_size)
    assert geometry.stride == int(claimed.group(1)), geometry
    assert layer_geometry(model, "blocks.4", cfg.data.image_size).stride == 16
