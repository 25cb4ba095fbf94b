"""Grouped SHAP of the patient features: exactness, additivity, KernelExplainer agreement, plots, speed."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import shap
import torch

from multimodal_lesion.data.encoder import MetadataEncoder
from multimodal_lesion.errors import ConfigError
from multimodal_lesion.explain import GroupShapExplainer
from multimodal_lesion.explain.shap_groups import coalition_masks, group_columns
from multimodal_lesion.models import LesionModel, list_models

pytestmark = pytest.mark.usefixtures("single_thread")

matplotlib.use("Agg")

SmallModel = Callable[..., LesionModel]  # conftest's ``small_model``: (name, seed, meta_dim, num_classes) -> model
Patients = Callable[[int, int], pd.DataFrame]  # conftest's ``patients``: (n, seed) -> patient table
Confident = Callable[[LesionModel], LesionModel]  # conftest's ``confident``: scales a model's heads


@pytest.fixture(scope="module")
def encoded(patients: Patients) -> dict:
    """A fitted MetadataEncoder, 20 background rows from 'training', 6 cases with their raw values."""
    train, cases = patients(80, 0), patients(6, 1)
    encoder = MetadataEncoder().fit(train)
    return {
        "groups": encoder.feature_groups_,
        "background": encoder.transform(train.iloc[:20]),
        "meta": encoder.transform(cases),
        "raw": cases,
        "dim": len(encoder.get_feature_names_out()),
    }


def embeddings(model: LesionModel, n: int, seed: int = 0) -> np.ndarray | None:
    """Image states of ``n`` cases: random embeddings of a late model, the maps of random images of a
    model that fuses on the maps (``model.image_state``); None without an image branch."""
    if not model.uses_image:
        return None
    if model.fuses_on_maps:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            return model.eval().image_state(torch.randn(n, 3, 64, 64, generator=g)).numpy()
    return np.random.default_rng(seed).normal(size=(n, model.image_branch.num_features)).astype(np.float32)


def switch_game(
    model: LesionModel, emb: np.ndarray | None, meta: np.ndarray, background: np.ndarray, groups: dict, target: int
):
    """f(z) for z in {0,1}^3: group g from the case when z_g = 1, else from each background row (mean)."""
    owns = group_columns(groups, background.shape[1])

    def f(z: np.ndarray) -> np.ndarray:
        out = []
        for row in np.asarray(z, dtype=bool):
            x = np.where((row[:, None] & owns).any(0), meta, background).astype(np.float32)
            e = None if emb is None else torch.as_tensor(np.repeat(emb[None], len(x), 0))
            with torch.no_grad():
                p = torch.softmax(model.eval().forward_head(e, torch.as_tensor(x)).double(), -1)[:, target]
            out.append(p.mean().item())
        return np.array(out)

    return f


@pytest.mark.parametrize("name", list_models())
def test_additivity_for_every_model(name: str, encoded: dict, small_model: SmallModel) -> None:
    model = small_model(name, meta_dim=encoded["dim"])
    explainer = GroupShapExplainer(model, encoded["background"], encoded["groups"])
    emb = embeddings(model, 6)
    exp = explainer.explain(emb, encoded["meta"], raw=encoded["raw"])
    probs = explainer.predict_proba(emb, encoded["meta"])
    assert exp.values.shape == (6, 3) and exp.base_values.shape == (6,)
    assert list(exp.feature_names) == ["age", "sex", "localization"]
    np.testing.assert_allclose(exp.base_values + exp.values.sum(1), probs.max(1), atol=1e-5)
    if not model.uses_meta:
        assert (exp.values == 0).all()


def test_agrees_with_kernel_explainer(encoded: dict, small_model: SmallModel, confident: Confident) -> None:
    model = confident(small_model("gated", meta_dim=encoded["dim"]))
    emb, meta, bg = embeddings(model, 3), encoded["meta"][:3], encoded["background"]
    explainer = GroupShapExplainer(model, bg, encoded["groups"])
    targets = explainer.predict_proba(emb, meta).argmax(1)
    exp = explainer.explain(emb, meta)
    assert np.abs(exp.values).max() > 0.05
    for i, target in enumerate(targets):
        kernel = shap.KernelExplainer(
            switch_game(model, emb[i], meta[i], bg, encoded["groups"], target), np.zeros((1, 3))
        )
        values = kernel.shap_values(np.ones((1, 3)), silent=True, l1_reg=False)
        np.testing.assert_allclose(values[0], exp.values[i], atol=1e-4)
        assert abs(kernel.expected_value - exp.base_values[i]) < 1e-6


def test_explanation_plots_directly(encoded: dict, small_model: SmallModel) -> None:
    model = small_model("concat", meta_dim=encoded["dim"])
    explainer = GroupShapExplainer(model, encoded["background"], encoded["groups"])
    exp = explainer.explain(embeddings(model, 6), encoded["meta"], raw=encoded["raw"])
    assert exp.data[0, 1] == encoded["raw"].sex.iloc[0]
    for plot in (
        lambda: shap.plots.waterfall(exp[0], show=False),
        lambda: shap.plots.bar(exp, show=False),
        lambda: shap.plots.bar(exp[1], show=False),
        lambda: shap.plots.beeswarm(exp, show=False),
    ):
        plot()
        plt.close("all")
    bare = explainer.explain(embeddings(model, 6), encoded["meta"])
    shap.plots.waterfall(bare[0], show=False)
    plt.close("all")


def test_predicted_class_by_default_and_explicit_targets(encoded: dict, small_model: SmallModel) -> None:
    model = small_model("film", meta_dim=encoded["dim"])
    explainer = GroupShapExplainer(model, encoded["background"], encoded["groups"])
    emb = embeddings(model, 6)
    predicted = explainer.predict_proba(emb, encoded["meta"]).argmax(1)
    default = explainer.explain(emb, encoded["meta"])
    np.testing.assert_array_equal(default.values, explainer.explain(emb, encoded["meta"], predicted).values)
    other = explainer.explain(emb, encoded["meta"], (predicted + 1) % 7)
    assert not np.allclose(other.base_values, default.base_values)


def test_one_batched_head_call_and_no_backbone(encoded: dict, small_model: SmallModel) -> None:
    model = small_model("concat", meta_dim=encoded["dim"])
    calls = {"meta": 0, "backbone": 0}
    handles = [
        model.meta_branch.register_forward_hook(lambda *_: calls.__setitem__("meta", calls["meta"] + 1)),
        model.image_branch.register_forward_pre_hook(lambda *_: calls.__setitem__("backbone", calls["backbone"] + 1)),
    ]
    explainer = GroupShapExplainer(model, encoded["background"], encoded["groups"])
    explainer.explain(embeddings(model, 6), encoded["meta"])
    for h in handles:
        h.remove()
    assert calls == {"meta": 1, "backbone": 0}  # 6 cases x 8 coalitions x 20 background rows in one call


def test_late_heads_read_the_image_through_a_narrow_term(encoded: dict, small_model: SmallModel) -> None:
    """concat and image_only reduce the state to the head's linear image term (what the games move per row);
    from it the logits are those of the full head. Gating and FiLM mix image and metadata: no term."""
    meta = torch.as_tensor(encoded["meta"])
    for name in list_models():
        model = small_model(name, meta_dim=encoded["dim"]).eval()
        state = embeddings(model, 6)
        if state is None:
            continue
        state_t = torch.as_tensor(state)
        term = model.image_term(state_t)
        if name not in ("concat", "image_only"):
            assert term is None, name
            continue
        assert term is not None and term.shape[1] < state_t.shape[1], name
        with torch.no_grad():
            np.testing.assert_allclose(
                model.from_image_term(term, meta).numpy(), model.from_image_state(state_t, meta).numpy(), atol=1e-5
            )
        assert model.train().image_term(state_t) is None  # dropout: the term holds in eval mode only


def test_planted_feature_ranks_first(metadata_only_model: str, small_model: SmallModel, patients: Patients) -> None:
    """A metadata model trained to read only sex gives sex the largest |SHAP| on every case."""
    train = patients(200, 2)
    encoder = MetadataEncoder().fit(train)
    x = torch.as_tensor(encoder.transform(train))
    y = torch.as_tensor((train.sex == "male").to_numpy().astype(np.int64))
    model = small_model(metadata_only_model, meta_dim=x.shape[1], num_classes=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model.train()({"meta": x}), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    cases = train.iloc[-20:]
    exp = GroupShapExplainer(model, encoder.transform(train.iloc[:30]), encoder.feature_groups_).explain(
        None, encoder.transform(cases)
    )
    assert (np.abs(exp.values).argmax(1) == 1).all()


def test_groups_are_checked(encoded: dict, small_model: SmallModel) -> None:
    model = small_model("concat", meta_dim=encoded["dim"])
    groups = dict(encoded["groups"])
    with pytest.raises(ConfigError, match="column 2 is in groups"):
        GroupShapExplainer(model, encoded["background"], {**groups, "extra": [2]})
    with pytest.raises(ConfigError, match="belongs to no feature group"):
        GroupShapExplainer(model, encoded["background"], {k: v for k, v in groups.items() if k != "sex"})
    explainer = GroupShapExplainer(model, encoded["background"], groups)
    with pytest.raises(ConfigError, match="localization"):
        explainer.explain(embeddings(model, 6), encoded["meta"], raw=encoded["raw"][["age", "sex"]])
    with pytest.raises(ConfigError, match="image states"):
        explainer.explain(None, encoded["meta"])


def test_coalitions_enumerate_every_subset() -> None:
    masks = coalition_masks(3)
    assert masks.shape == (8, 3) and len({tuple(m) for m in masks}) == 8
    assert not masks[0].any() and masks[-1].all()


# --- many feature groups: permutation sampling against the exact values --------------------------------


def _many_groups(small_model: SmallModel, confident: Confident, n_groups: int) -> tuple[LesionModel, dict, dict]:
    """A metadata-only model over ``n_groups`` two-column groups, 12 background rows and 3 cases."""
    model = confident(small_model("metadata_only", meta_dim=2 * n_groups, seed=3)).eval()
    rng = np.random.default_rng(5)
    data = {
        "background": torch.as_tensor(rng.normal(size=(12, 2 * n_groups)), dtype=torch.float32),
        "meta": torch.as_tensor(rng.normal(size=(3, 2 * n_groups)) * 2, dtype=torch.float32),
    }
    groups = {f"f{g}": [2 * g, 2 * g + 1] for g in range(n_groups)}
    return model, data, groups


def _shapley(model: LesionModel, data: dict, groups: dict, orders: np.ndarray | None) -> dict:
    """The game of GroupShapExplainer on every coalition (orders None) or along sampled orders."""
    from multimodal_lesion.explain.shap_groups import exact_shapley, order_masks

    columns = group_columns(groups, data["meta"].shape[1])
    masks = coalition_masks(len(groups)) if orders is None else order_masks(orders)
    return exact_shapley(
        model,
        None,
        data["meta"],
        None,
        data["background"],
        np.ones(len(masks), dtype=bool),
        masks @ columns,
        masks,
        [0, 1, 2],
        orders=orders,
    )


def test_permutation_sampling_agrees_with_the_exact_values_and_its_error_shrinks(
    small_model: SmallModel, confident: Confident
) -> None:
    from multimodal_lesion.explain.shap_groups import permutation_orders

    model, data, groups = _many_groups(small_model, confident, 6)
    exact = _shapley(model, data, groups, None)
    few = _shapley(model, data, groups, permutation_orders(6, 16, seed=1))
    many = _shapley(model, data, groups, permutation_orders(6, 1024, seed=1))
    assert exact["exact"] and not many["exact"]
    assert np.abs(exact["values"]).max() > 0.01  # the features matter: the test can fail
    # each sampled order adds up to output - base: additivity holds exactly, not on average
    for res in (few, many):
        np.testing.assert_allclose(res["values"].sum(1), res["outputs"] - res["base_values"], atol=1e-10)
        np.testing.assert_allclose(res["outputs"], exact["outputs"], atol=1e-12)
    assert (many["sampling_se"] > 0).all()
    z = np.abs(many["values"] - exact["values"]) / many["sampling_se"]
    assert z.max() < 5, z  # within the reported standard error
    assert np.abs(many["values"] - exact["values"]).max() < np.abs(few["values"] - exact["values"]).max()
    ratio = few["sampling_se"].mean() / many["sampling_se"].mean()
    assert 4 < ratio < 16  # 64x the orders: sqrt(64) = 8x smaller error
    np.testing.assert_array_equal(exact["sampling_se"], 0)


def test_more_than_ten_groups_are_sampled_with_an_error_on_each_value(
    small_model: SmallModel, confident: Confident
) -> None:
    from multimodal_lesion.explain.shap_groups import MAX_EXACT_PLAYERS

    model, data, groups = _many_groups(small_model, confident, MAX_EXACT_PLAYERS + 2)
    explainer = GroupShapExplainer(model, data["background"].numpy(), groups, permutations=32, seed=2)
    exp = explainer.explain(None, data["meta"].numpy(), [0, 1, 2])
    probs = explainer.predict_proba(None, data["meta"].numpy())[np.arange(3), [0, 1, 2]]
    np.testing.assert_allclose(exp.base_values + exp.values.sum(1), probs, atol=1e-6)
    assert exp.values.shape == (3, 12) and (exp.error_std > 0).all()
    with pytest.raises(ConfigError, match="even"):
        GroupShapExplainer(model, data["background"].numpy(), groups, permutations=33).explain(None, data["meta"])
