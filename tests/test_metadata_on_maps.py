"""Explanations of models that fuse the metadata into the feature maps: exact SHAP and modality split
through ``from_image_state`` (checked against coalitions enumerated by hand), the late models' values
unchanged, and what the patient's metadata does to the Grad-CAM map (rank correlation 1 for image_only,
activations untouched in a late model, a moved map in a map model whose metadata provably matters)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from math import factorial

import numpy as np
import pandas as pd
import pytest
import torch
from torch import Tensor, nn

from multimodal_lesion.config import ModelConfig
from multimodal_lesion.data.encoder import MetadataEncoder
from multimodal_lesion.explain import GradCamExplainer, GroupShapExplainer, integrated_gradients, modality_shapley
from multimodal_lesion.explain.gradcam import layer_geometry, resolve_target_layer
from multimodal_lesion.explain.metadata_effect import fusion_kind, map_rank_correlation, metadata_effect
from multimodal_lesion.explain.randomisation import CamSetup, cascading_randomisation, randomisation_stages
from multimodal_lesion.explain.shap_groups import group_columns
from multimodal_lesion.explain.whatif import cams_across_ages
from multimodal_lesion.models import LesionModel, MetaLayout, create_model
from multimodal_lesion.models.fusion import LinearImageHead
from multimodal_lesion.models.image_branch import ImageBranch
from multimodal_lesion.models.metadata_branch import MetadataBranch

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 96  # layer3 maps 6x6 (the image state), layer4 maps 3x3 (the CAM layer)
SmallModel = Callable[..., LesionModel]
Patients = Callable[[int, int], pd.DataFrame]


class FilmOnMaps(LesionModel):
    """A test model that fuses on the maps: the encoded metadata scales and shifts each channel of a
    resnet18's layer3 maps (FiLM), layer4 runs on the result (the CAM layer, after the fusion)."""

    fuses_on_maps = True  # type: ignore[assignment]

    def __init__(self, meta_dim: int, num_classes: int = 7, seed: int = 0) -> None:
        torch.manual_seed(seed)
        branch = ImageBranch("resnet18", "none")
        meta = MetadataBranch(meta_dim, 8, 0.0)
        super().__init__(LinearImageHead(branch.num_features, 8, num_classes, 32, 0.0), branch, meta)
        self.film = nn.Linear(meta_dim, 2 * 256)

    def image_state(self, images: Tensor) -> Tensor:
        m = self.image_branch.model
        return m.layer3(m.layer2(m.layer1(m.maxpool(m.act1(m.bn1(m.conv1(images)))))))

    def from_image_state(self, state: Tensor | None, meta: Tensor | None) -> Tensor:
        gamma, beta = self.film(meta).chunk(2, dim=1)
        maps = self.image_branch.model.layer4(state * (1 + gamma[..., None, None]) + beta[..., None, None])
        return self.head(self.image_branch.pool(maps), None)

    def cam_layer(self) -> nn.Module:
        return self.image_branch.model.layer4

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.from_image_state(self.image_state(batch["image"]), batch["meta"])


@pytest.fixture(scope="module")
def encoded(patients: Patients) -> dict:
    """A fitted encoder, 5 background rows, 3 cases (a man, a woman, an unknown sex) and their images."""
    train = patients(60, 0)
    cases = pd.DataFrame({"age": [35.0, 70.0, np.nan], "sex": ["male", "female", "unknown"], "localization": "back"})
    encoder = MetadataEncoder().fit(train)
    g = torch.Generator().manual_seed(0)
    return {
        "encoder": encoder,
        "groups": encoder.feature_groups_,
        "background": encoder.transform(train.iloc[:5]).astype(np.float32),
        "meta": encoder.transform(cases).astype(np.float32),
        "raw": cases,
        "dim": len(encoder.get_feature_names_out()),
        "images": torch.randn(3, 3, SIZE, SIZE, generator=g),
        "background_images": torch.randn(5, 3, SIZE, SIZE, generator=g),
    }


@pytest.fixture(scope="module")
def map_model(encoded: dict) -> FilmOnMaps:
    """The map model with a strong random FiLM generator, so every patient feature moves the maps."""
    model = FilmOnMaps(encoded["dim"]).eval()
    with torch.no_grad():
        model.film.weight.normal_(0, 0.8, generator=torch.Generator().manual_seed(1))
    return model


REGISTERED_SIZE = (48, 64)  # test_resnet's image size in the registered map models' tests
TINY = ModelConfig(backbone="test_resnet", weights="none", meta_hidden=8, head_hidden=16, dropout=0.0)


def registered(name: str, encoder: MetadataEncoder, seed: int = 1) -> LesionModel:
    """A registered model on timm's tiny test_resnet, every weight outside the backbone moved off its
    initialisation (FiLM generators start at zero), so the metadata path does something."""
    layout = MetaLayout(
        tuple(tuple(c) for c in encoder.feature_groups_.values()), tuple(float(v) for v in encoder.missing_row())
    )
    torch.manual_seed(seed)
    dim = len(encoder.get_feature_names_out())
    model = create_model(name, meta_dim=dim, num_classes=7, cfg=TINY, meta_layout=layout)
    with torch.no_grad():
        for path, p in model.named_parameters():
            if not path.startswith("image_branch."):
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def tiny_images(n: int, seed: int) -> Tensor:
    return torch.randn(n, 3, *REGISTERED_SIZE, generator=torch.Generator().manual_seed(seed))


def states(model: LesionModel, images: Tensor) -> Tensor:
    with torch.no_grad():
        return model.image_state(images)


def value(model: LesionModel, state: Tensor, meta: np.ndarray, target: int) -> float:
    """Mean probability of ``target`` over paired (state, metadata) rows, through ``from_image_state`` alone;
    one state (C, h, w) is shared by every metadata row."""
    meta_t = torch.as_tensor(np.atleast_2d(meta), dtype=torch.float32)
    state = state.expand(len(meta_t), *state.shape[-3:]) if state.ndim == 3 else state
    with torch.no_grad():
        logits = model.from_image_state(state, meta_t)
    return float(torch.softmax(logits.double(), -1)[:, target].mean())


def brute_force(players: int, v: Callable[[frozenset[int]], float]) -> np.ndarray:
    """Shapley values by the textbook sum over every coalition without each player (each v(S) once)."""
    v = functools.cache(v)
    phi = np.zeros(players)
    for i in range(players):
        others = [p for p in range(players) if p != i]
        for k in range(players):
            for s in itertools.combinations(others, k):
                weight = factorial(k) * factorial(players - k - 1) / factorial(players)
                phi[i] += weight * (v(frozenset(s) | {i}) - v(frozenset(s)))
    return phi


def test_grouped_shap_of_a_map_model_is_exact_against_coalitions_by_hand(map_model: FilmOnMaps, encoded: dict) -> None:
    own = states(map_model, encoded["images"])
    explainer = GroupShapExplainer(map_model, encoded["background"], encoded["groups"])
    exp = explainer.explain(own, encoded["meta"], raw=encoded["raw"])
    probs = explainer.predict_proba(own, encoded["meta"])
    owns = group_columns(encoded["groups"], encoded["dim"])
    for b in range(len(own)):
        target = int(probs[b].argmax())

        def v(present: frozenset[int], b: int = b, target: int = target) -> float:
            cols = owns[list(present)].any(0) if present else np.zeros(encoded["dim"], bool)
            rows = np.where(cols, encoded["meta"][b], encoded["background"])
            return value(map_model, own[b], rows, target)

        np.testing.assert_allclose(exp.values[b], brute_force(3, v), atol=1e-6)
        np.testing.assert_allclose(exp.base_values[b] + exp.values[b].sum(), probs[b, target], atol=1e-6)
    assert np.abs(exp.values).max() > 1e-3  # the metadata matters: the check above is not about zeros


def test_modality_split_of_a_map_model_is_exact_with_background_maps(map_model: FilmOnMaps, encoded: dict) -> None:
    own, background = states(map_model, encoded["images"]), states(map_model, encoded["background_images"])
    split = modality_shapley(map_model, own, encoded["meta"], background, encoded["background"], encoded["groups"])
    owns = group_columns(encoded["groups"], encoded["dim"])
    for b in range(len(own)):
        target = int(split.targets[b])

        def v(present: frozenset[int], b: int = b, target: int = target) -> float:
            features = [p - 1 for p in present if p > 0]
            cols = owns[features].any(0) if features else np.zeros(encoded["dim"], bool)
            rows = np.where(cols, encoded["meta"][b], encoded["background"])
            image = own[b].expand_as(background) if 0 in present else background
            return value(map_model, image, rows, target)

        np.testing.assert_allclose(split.values[b], brute_force(4, v), atol=1e-6)
        assert split.base_values[b] + split.values[b].sum() == pytest.approx(split.outputs[b], abs=1e-6)
    assert split.players[0] == "image" and np.abs(split.values[:, 0]).max() > 1e-3


@pytest.mark.parametrize("name", ["concat", "gated", "film"])
def test_late_models_give_the_values_of_the_head_on_embeddings(
    name: str, encoded: dict, small_model: SmallModel
) -> None:
    """The late models' SHAP and modality values are the head's game on the embedding, as before the
    image-state generalisation: the same numbers as coalitions enumerated with ``forward_head``."""
    model = small_model(name, meta_dim=encoded["dim"]).eval()
    own = states(model, encoded["images"][:2])
    assert torch.equal(own, model.image_branch.embed(encoded["images"][:2]).detach())
    mean_embedding = states(model, encoded["background_images"]).mean(0, keepdim=True)
    exp = GroupShapExplainer(model, encoded["background"], encoded["groups"]).explain(own, encoded["meta"][:2])
    split = modality_shapley(model, own, encoded["meta"][:2], mean_embedding, encoded["background"], encoded["groups"])
    owns = group_columns(encoded["groups"], encoded["dim"])

    def head(e: Tensor, rows: np.ndarray, target: int) -> float:
        with torch.no_grad():
            logits = model.forward_head(e.expand(len(rows), -1), torch.as_tensor(rows, dtype=torch.float32))
        return float(torch.softmax(logits.double(), -1)[:, target].mean())

    for b in range(2):
        t_shap, t_split = int(split.targets[b]), int(split.targets[b])

        def v_shap(present: frozenset[int], b: int = b, t: int = t_shap) -> float:
            cols = owns[list(present)].any(0) if present else np.zeros(encoded["dim"], bool)
            return head(own[b : b + 1], np.where(cols, encoded["meta"][b], encoded["background"]), t)

        def v_split(present: frozenset[int], b: int = b, t: int = t_split) -> float:
            features = [p - 1 for p in present if p > 0]
            cols = owns[features].any(0) if features else np.zeros(encoded["dim"], bool)
            image = own[b : b + 1] if 0 in present else mean_embedding
            return head(image, np.where(cols, encoded["meta"][b], encoded["background"]), t)

        np.testing.assert_allclose(exp.values[b], brute_force(3, v_shap), atol=1e-6)
        np.testing.assert_allclose(split.values[b], brute_force(4, v_split), atol=1e-6)


def test_integrated_gradients_sum_over_a_map_state(map_model: FilmOnMaps, encoded: dict) -> None:
    own = states(map_model, encoded["images"][:1])
    base = states(map_model, encoded["background_images"]).mean(0, keepdim=True)
    ig = integrated_gradients(
        map_model,
        own,
        encoded["meta"][:1],
        0,
        baseline_embedding=base,
        baseline_meta=encoded["background"][:1],
        groups=encoded["groups"],
        n_steps=32,
    )
    assert ig.embedding is not None and ig.embedding.shape == tuple(own.shape)
    assert ig.values.shape == (1, 4)
    np.testing.assert_allclose(ig.values.sum(1), ig.embedding.sum() + ig.meta.sum(), rtol=1e-6, atol=1e-9)


def test_cam_layer_is_the_default_and_the_geometry_follows_the_fusion(map_model: FilmOnMaps, encoded: dict) -> None:
    layer4 = map_model.image_branch.model.layer4
    assert resolve_target_layer(map_model, None) is layer4
    assert resolve_target_layer(map_model, "film") is map_model.film  # a module outside the backbone, by path
    assert resolve_target_layer(map_model, "layer3") is map_model.image_branch.model.layer3
    geometry = layer_geometry(map_model, None, (SIZE, SIZE), torch.as_tensor(encoded["meta"][:1]))
    assert (geometry.name, geometry.stride, geometry.grid) == ("layer4", 32, (3, 3))


def layer_activations(explainer: GradCamExplainer, images: Tensor, meta: Tensor, targets: list[int]) -> Tensor:
    """The CAM layer's output during the explainer's own pass."""
    seen: list[Tensor] = []
    handle = explainer.layer.register_forward_hook(lambda _m, _i, out: seen.append(out.detach().clone()))
    try:
        explainer.explain(images, meta, targets)
    finally:
        handle.remove()
    return seen[0]


def test_image_only_map_is_the_same_without_metadata(encoded: dict, small_model: SmallModel) -> None:
    model = small_model("image_only", meta_dim=encoded["dim"]).eval()
    meta = torch.as_tensor(encoded["meta"])
    with GradCamExplainer(model) as cam:
        effect = metadata_effect(cam, encoded["images"], meta, encoded["encoder"].missing_row(), [0, 1, 2])
    assert effect.kind == "image only" == fusion_kind(model)
    assert np.array_equal(effect.with_metadata, effect.without_metadata)
    assert (effect.spearman == 1.0).all() and not effect.difference.any()


@pytest.mark.parametrize("name", ["concat", "film"])
def test_late_model_metadata_moves_only_the_weights(
    name: str, encoded: dict, small_model: SmallModel, confident: Callable[[LesionModel], LesionModel]
) -> None:
    model = confident(small_model(name, meta_dim=encoded["dim"])).eval()
    if name == "film":  # the generator starts at zero: give it weights, so the metadata scales the channels
        with torch.no_grad():
            model.head.film.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    meta = torch.as_tensor(encoded["meta"])
    missing = torch.as_tensor(encoded["encoder"].missing_row()).expand(len(meta), -1)
    with GradCamExplainer(model) as cam:
        acts_with = layer_activations(cam, encoded["images"], meta, [0, 1, 2])
        acts_without = layer_activations(cam, encoded["images"], missing, [0, 1, 2])
        effect = metadata_effect(cam, encoded["images"], meta, missing[0], [0, 1, 2])
    assert effect.kind == "late"
    assert torch.equal(acts_with, acts_without)
    assert not np.array_equal(effect.with_metadata, effect.without_metadata)  # the weights moved
    assert np.isfinite(effect.spearman).all() and (effect.spearman <= 1.0).all()


def test_map_model_whose_metadata_silences_channels_moves_the_map(encoded: dict) -> None:
    """The FiLM generator is set by hand: a man's encoding switches off the first half of the layer3
    channels (gamma = -1), the missing row leaves them on; so the CAM layer's activations, and the map,
    provably differ for the man and not for the patient with an unknown sex."""
    model = FilmOnMaps(encoded["dim"]).eval()
    names = list(encoded["encoder"].get_feature_names_out())
    male = names.index("sex=male")
    with torch.no_grad():
        model.film.weight.zero_()
        model.film.bias.zero_()
        model.film.weight[:128, male] = -1.0
    meta = torch.as_tensor(encoded["meta"])
    missing = encoded["encoder"].missing_row()
    with GradCamExplainer(model) as cam:
        acts_with = layer_activations(cam, encoded["images"], meta, [0, 0, 0])
        acts_without = layer_activations(cam, encoded["images"], torch.as_tensor(missing).expand(3, -1), [0, 0, 0])
        effect = metadata_effect(cam, encoded["images"], meta, missing, [0, 0, 0])
    assert effect.kind == "maps"
    assert not torch.equal(acts_with[0], acts_without[0]) and torch.equal(acts_with[2], acts_without[2])
    assert effect.spearman[0] < 0.99 and effect.spearman[2] == 1.0  # case 2: unknown sex = the missing row
    assert map_rank_correlation(effect.with_metadata[0], effect.with_metadata[0]) == 1.0


def test_map_at_a_few_ages_moves_with_age_in_a_map_model(map_model: FilmOnMaps, encoded: dict) -> None:
    with GradCamExplainer(map_model) as cam:
        maps = cams_across_ages(cam, encoded["encoder"], encoded["raw"].iloc[[0]], encoded["images"][:1], 0)
    assert list(maps) == ["20", "40", "60", "80"]
    assert all(m.shape == (SIZE, SIZE) for m in maps.values())
    assert not np.allclose(maps["20"], maps["80"])


def test_randomisation_of_a_map_model_starts_with_its_fusion(map_model: FilmOnMaps, encoded: dict) -> None:
    meta = torch.as_tensor(encoded["meta"][:2])
    setup = CamSetup()
    cams = setup.maps(map_model, encoded["images"][:2], meta, [0, 1])
    film_before = map_model.film.weight.clone()
    stages = cascading_randomisation(map_model, encoded["images"][:2], meta, [0, 1], cams, setup)
    assert stages[0].stage == "head" and stages[1].stage == "layer4"
    assert torch.equal(map_model.film.weight, film_before)  # the model itself is untouched
    head = randomisation_stages(map_model)[0][1]
    assert any(m is map_model.film for m in head)  # the fusion outside the backbone is randomised first
    assert all(len(s.cases) == 2 for s in stages) and len(stages) == len(randomisation_stages(map_model))


def test_registered_map_models_shap_and_modality_split_are_exact(map_fusion_model: str, encoded: dict) -> None:
    """Each registered map-fusion model: grouped SHAP and the modality split equal the Shapley values of
    coalitions enumerated by hand through ``from_image_state`` (state = the maps at the fusion point)."""
    model = registered(map_fusion_model, encoded["encoder"])
    assert model.fuses_on_maps and fusion_kind(model) == "maps"
    own, background = states(model, tiny_images(1, 0)), states(model, tiny_images(5, 1))
    assert own.ndim == 4  # maps, not an embedding
    meta = encoded["meta"][:1]
    exp = GroupShapExplainer(model, encoded["background"], encoded["groups"]).explain(own, meta)
    split = modality_shapley(model, own, meta, background, encoded["background"], encoded["groups"])
    owns = group_columns(encoded["groups"], encoded["dim"])
    target = int(split.targets[0])

    def rows(features: list[int]) -> np.ndarray:
        cols = owns[features].any(0) if features else np.zeros(encoded["dim"], bool)
        return np.where(cols, meta[0], encoded["background"])

    def v_shap(present: frozenset[int]) -> float:
        return value(model, own[0], rows(list(present)), target)

    def v_split(present: frozenset[int]) -> float:
        meta_rows = rows([p - 1 for p in present if p > 0])
        image = own[0].expand_as(background) if 0 in present else background
        return value(model, image, meta_rows, target)

    np.testing.assert_allclose(exp.values[0], brute_force(3, v_shap), atol=1e-6)
    np.testing.assert_allclose(split.values[0], brute_force(4, v_split), atol=1e-6)
    assert np.abs(exp.values).max() > 1e-4  # the metadata matters to this model


def test_registered_map_models_cam_follows_the_metadata(map_fusion_model: str, encoded: dict) -> None:
    """The default CAM layer of a registered map model is after the fusion: its activations change when
    the metadata is taken away, and the map's geometry is read through a metadata-conditioned pass."""
    model = registered(map_fusion_model, encoded["encoder"])
    images, meta = tiny_images(2, 2), torch.as_tensor(encoded["meta"][:2])
    missing = torch.as_tensor(encoded["encoder"].missing_row()).expand(2, -1)
    with GradCamExplainer(model) as cam:
        assert cam.layer is model.cam_layer()
        acts_with = layer_activations(cam, images, meta, [0, 1])
        acts_without = layer_activations(cam, images, missing, [0, 1])
        effect = metadata_effect(cam, images, meta, missing[0], [0, 1])
    assert not torch.equal(acts_with, acts_without)
    assert effect.kind == "maps" and effect.with_metadata.shape == (2, *REGISTERED_SIZE)
    geometry = layer_geometry(model, None, REGISTERED_SIZE, meta[:1])
    assert geometry.grid == tuple(acts_with.shape[-2:])
