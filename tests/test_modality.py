"""Image versus metadata: exact 4-player Shapley values, captum cross-check, Integrated Gradients."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import shap
import torch
from captum.attr import ShapleyValues

from multimodal_lesion.data.encoder import MetadataEncoder
from multimodal_lesion.errors import ConfigError
from multimodal_lesion.explain import GroupShapExplainer, integrated_gradients, modality_shapley
from multimodal_lesion.explain.gradcam import state_logits
from multimodal_lesion.models import LesionModel, list_models

pytestmark = pytest.mark.usefixtures("single_thread")

matplotlib.use("Agg")
PLAYERS = ["image", "age", "sex", "localization"]
ModelFor = Callable[[str], LesionModel]  # the ``model_for`` fixture: registered name -> small confident model


@pytest.fixture(scope="module")
def data(patients: Callable[[int, int], pd.DataFrame]) -> dict:
    """Encoded metadata of 20 background 'training' rows and 5 cases, plus random embeddings."""
    train, cases = patients(80, 0), patients(5, 1)
    encoder = MetadataEncoder().fit(train)
    rng = np.random.default_rng(3)
    return {
        "groups": encoder.feature_groups_,
        "dim": len(encoder.get_feature_names_out()),
        "bg_meta": encoder.transform(train.iloc[:20]),
        "meta": encoder.transform(cases),
        "bg_emb": rng.normal(size=(20, 512)).astype(np.float32),
        "emb": (rng.normal(size=(5, 512)) * 1.5).astype(np.float32),
    }


def states_of(model: LesionModel, data: dict) -> tuple[np.ndarray, np.ndarray]:
    """The cases' and background's image states: ``data``'s random embeddings for a late model, the maps
    of seeded random images for a model that fuses on the maps (its state is (C, h, w))."""
    if not model.fuses_on_maps:
        return data["emb"], data["bg_emb"]
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        maps = model.eval().image_state(torch.randn(25, 3, 64, 64, generator=g) * 1.5)
    return maps[:5].numpy(), maps[5:].numpy()


def in_float64(model: LesionModel) -> LesionModel:
    """The model in float64, except a map model: its ``from_image_state`` runs the tail in float32."""
    return model if model.fuses_on_maps else model.double()


def tolerance(model: LesionModel, float64: float) -> float:
    """``float64`` for a model in float64; float32's rounding (1e-5) for a map model."""
    return 1e-5 if model.fuses_on_maps else float64


@pytest.fixture(scope="module")
def model_for(
    data: dict, small_model: Callable[..., LesionModel], confident: Callable[[LesionModel], LesionModel]
) -> ModelFor:
    """Registered model ``name``, small, with confident heads, sized for ``data``'s metadata."""

    def build(name: str) -> LesionModel:
        return confident(small_model(name, meta_dim=data["dim"]))

    return build


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("paired", [True, False], ids=["paired-embeddings", "mean-embedding"])
def test_efficiency_and_dummy_players(name: str, paired: bool, data: dict, model_for: ModelFor) -> None:
    model = model_for(name)
    emb, bg_emb = states_of(model, data)
    bg_emb = bg_emb if paired else bg_emb.mean(0, keepdims=True)
    res = modality_shapley(model, emb, data["meta"], bg_emb, data["bg_meta"], data["groups"])
    assert res.players == PLAYERS and res.values.shape == (5, 4)
    np.testing.assert_allclose(res.base_values + res.values.sum(1), res.outputs, atol=1e-12)
    with torch.no_grad():
        state = torch.as_tensor(emb) if model.uses_image else None
        logits = state_logits(model.eval(), state, torch.as_tensor(data["meta"]))
    np.testing.assert_allclose(res.outputs, torch.softmax(logits.double(), -1).max(1).values.numpy(), atol=1e-6)
    if not model.uses_meta:
        assert (res.values[:, 1:] == 0).all()  # image_only: the patient players get exactly 0
    if not model.uses_image:
        assert (res.values[:, 0] == 0).all()


@pytest.mark.parametrize("name", list_models())
def test_agrees_with_captum_shapley_values(name: str, data: dict, model_for: ModelFor) -> None:
    """With one background row the interventional game is captum's baseline game: exact agreement.

    Both run in float64; captum accumulates its attributions in float32, hence the 1e-6.
    """
    model = in_float64(model_for(name))
    emb, bg_states = states_of(model, data)
    bg_emb, bg_meta = bg_states[:1], data["bg_meta"][:1]
    res = modality_shapley(model, emb, data["meta"], bg_emb, bg_meta, data["groups"])
    player_of_column = np.zeros(data["dim"], dtype=np.int64)
    for k, cols in enumerate(data["groups"].values(), start=1):
        player_of_column[cols] = k
    mask = (torch.zeros(1, *emb.shape[1:], dtype=torch.long), torch.as_tensor(player_of_column)[None])
    model.eval()
    dtype = next(model.parameters()).dtype
    attr = ShapleyValues(lambda e, m: torch.softmax(state_logits(model, e, m), -1)).attribute(
        (torch.as_tensor(emb).to(dtype), torch.as_tensor(data["meta"]).to(dtype)),
        baselines=(torch.as_tensor(bg_emb).to(dtype), torch.as_tensor(bg_meta).to(dtype)),
        target=res.targets.tolist(),
        feature_mask=mask,
    )
    first_column = [data["groups"][g][0] for g in PLAYERS[1:]]
    captum_values = torch.cat([attr[0].flatten(1)[:, :1], attr[1][:, first_column]], 1).double().numpy()
    assert np.abs(res.values).max() > 0.01
    np.testing.assert_allclose(res.values, captum_values, atol=tolerance(model, 1e-6))


def test_patient_players_match_grouped_shap_when_the_image_is_ignored(
    metadata_only_model: str, data: dict, model_for: ModelFor
) -> None:
    """Same output space: for a model that ignores the image, the 4-player values are the 3-group SHAP values."""
    model = model_for(metadata_only_model)
    res = modality_shapley(model, None, data["meta"], None, data["bg_meta"], data["groups"])
    exp = GroupShapExplainer(model, data["bg_meta"], data["groups"]).explain(None, data["meta"])
    np.testing.assert_allclose(res.values[:, 1:], exp.values, atol=1e-12)
    np.testing.assert_allclose(res.base_values, exp.base_values, atol=1e-12)


def test_to_explanation_plots(data: dict, model_for: ModelFor) -> None:
    model = model_for("gated")
    res = modality_shapley(model, data["emb"], data["meta"], data["bg_emb"], data["bg_meta"], data["groups"])
    exp = res.to_explanation()
    assert list(exp.feature_names) == PLAYERS
    shap.plots.bar(exp, show=False)
    shap.plots.waterfall(exp[0], show=False)
    plt.close("all")


def test_background_checks(data: dict, model_for: ModelFor) -> None:
    model = model_for("concat")
    with pytest.raises(ConfigError, match="background_states has 3 rows"):
        modality_shapley(model, data["emb"], data["meta"], data["bg_emb"][:3], data["bg_meta"], data["groups"])
    with pytest.raises(ConfigError, match="image states"):
        modality_shapley(model, None, data["meta"], None, data["bg_meta"], data["groups"])


@pytest.mark.parametrize("name", list_models())
def test_integrated_gradients_completeness(name: str, data: dict, model_for: ModelFor) -> None:
    model = in_float64(model_for(name))
    emb, bg_emb = states_of(model, data)
    base_emb, base_meta = bg_emb.mean(0), data["bg_meta"].mean(0)
    res = modality_shapley(model, emb, data["meta"], bg_emb, data["bg_meta"], data["groups"])
    ig = integrated_gradients(
        model,
        emb,
        data["meta"],
        res.targets.tolist(),
        baseline_embedding=base_emb,
        baseline_meta=base_meta,
        groups=data["groups"],
        n_steps=128,
    )
    assert ig.players == PLAYERS and ig.values.shape == (5, 4)

    @torch.no_grad()
    def prob(e: np.ndarray, m: np.ndarray) -> np.ndarray:
        dtype = next(model.parameters()).dtype
        state = torch.as_tensor(e).to(dtype) if model.uses_image else None
        logits = state_logits(model.eval(), state, torch.as_tensor(m).to(dtype)).double()
        return torch.softmax(logits, -1)[torch.arange(len(logits)), torch.as_tensor(res.targets)].numpy()

    change = prob(emb, data["meta"]) - prob(np.repeat(base_emb[None], 5, 0), np.repeat(base_meta[None], 5, 0))
    np.testing.assert_allclose(ig.values.sum(1) - ig.delta, change, atol=tolerance(model, 1e-9))  # delta = the gap
    assert np.abs(ig.delta).max() < 5e-3  # and the Riemann error is small (ReLU kinks)
    if not model.uses_meta:
        assert (ig.values[:, 1:] == 0).all()
    if not model.uses_image:
        assert (ig.values[:, 0] == 0).all()
