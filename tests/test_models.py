"""Registered models: one forward path, heads sized from declared widths, real dependence on the inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from multimodal_lesion.config import AblationConfig, ModelConfig
from multimodal_lesion.errors import ConfigError
from multimodal_lesion.models import ImageBranch, LesionModel, create_model, list_models, model_description

#: Registered model -> what it reads (conftest's ``model_inputs``): a subset of {"image", "meta"}.
InputsByModel = dict[str, frozenset[str]]

META_DIM = 12
BATCH = 4
IMAGE_SHAPE = (3, 48, 64)  # small real images: (C, H, W)
CFG = ModelConfig(backbone="tf_efficientnet_lite0", weights="none", meta_hidden=16, head_hidden=32, dropout=0.1)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def branch() -> ImageBranch:
    """One random-init backbone shared by every model of a test, as an ablation shares it."""
    torch.manual_seed(0)
    return ImageBranch(CFG.backbone, weights="none")


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    meta = torch.randn(BATCH, META_DIM, generator=g)
    return {
        "image": torch.randn(BATCH, *IMAGE_SHAPE, generator=g),
        "meta": meta,
        "target": torch.randint(0, 7, (BATCH,), generator=g),
    }


def build(name: str, branch: ImageBranch) -> LesionModel:
    torch.manual_seed(1)
    return create_model(name, meta_dim=META_DIM, cfg=CFG, image_branch=branch)


def head_params(model: LesionModel) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if not n.startswith("image_branch.")]


def test_registry_has_the_configured_models_of_every_kind_with_descriptions(model_inputs: InputsByModel) -> None:
    names = list_models()
    assert names == sorted(names)
    ablation = AblationConfig()
    assert {ModelConfig().name, ablation.baseline, *ablation.models} <= set(names)  # the defaults are registered
    assert set(model_inputs) == set(names)
    assert {frozenset({"image"}), frozenset({"meta"}), frozenset({"image", "meta"})} <= set(model_inputs.values())
    for name in names:
        description = model_description(name)
        assert description and "\n" not in description


def test_unknown_model_name_lists_valid_names(branch: ImageBranch) -> None:
    with pytest.raises(ConfigError, match="unknown model 'resnet'") as err:
        create_model("resnet", meta_dim=META_DIM, image_branch=branch)
    assert all(name in str(err.value) for name in list_models())
    with pytest.raises(ConfigError, match="valid: concat"):
        model_description("nope")


@pytest.mark.parametrize("name", list_models())
def test_forward_and_backward(name: str, branch: ImageBranch) -> None:
    model = build(name, branch).train()
    branch.zero_grad(set_to_none=True)
    batch = make_batch()
    logits = model(batch)
    assert logits.shape == (BATCH, 7) and torch.isfinite(logits).all()
    F.cross_entropy(logits, batch["target"]).backward()
    grads = [p.grad for p in model.head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    if model.uses_image:  # end-to-end: the gradient reaches the backbone
        assert model.image_branch.model.conv_stem.weight.grad is not None


@pytest.mark.parametrize("name", list_models())
def test_cached_state_and_live_image_paths_agree(name: str, branch: ImageBranch) -> None:
    """forward(batch) == from_image_state(image_state(image), meta), and the cached path gives the same."""
    model = build(name, branch).eval()
    batch = make_batch()
    with torch.no_grad():
        live = model(batch)
        if not model.uses_image:
            torch.testing.assert_close(model.forward_head(None, batch["meta"]), live)
            return
        state = model.image_state(batch["image"])
        split = model.from_image_state(state, batch["meta"])
        cached = model({"maps" if model.fuses_on_maps else "embedding": state, "meta": batch["meta"]})
    torch.testing.assert_close(split, live, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-5)
    if model.fuses_on_maps:  # the state is the maps partial mode caches
        assert state.shape == branch.forward_maps(batch["image"]).shape and state.ndim == 4
    else:  # late fusion: the state is the pooled embedding, and forward_head is the rest
        torch.testing.assert_close(state, branch.embed(batch["image"]))
        torch.testing.assert_close(model.forward_head(state, batch["meta"]), live, rtol=1e-5, atol=1e-5)


def trained(name: str, branch: ImageBranch, steps: int = 5) -> tuple[LesionModel, torch.Tensor]:
    """A model whose head took a few Adam steps on cached embeddings (the backbone stays untouched)."""
    model = build(name, branch)
    batch = make_batch()
    with torch.no_grad():
        embedding = branch.eval().embed(batch["image"])
    opt = torch.optim.Adam(head_params(model), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model({"embedding": embedding, "meta": batch["meta"]}), batch["target"]).backward()
        opt.step()
    return model.eval(), embedding


def test_fusion_models_depend_on_metadata(fusion_model: str, branch: ImageBranch) -> None:
    model, embedding = trained(fusion_model, branch)
    meta = make_batch()["meta"]
    with torch.no_grad():
        a = model.forward_head(embedding, meta)
        b = model.forward_head(embedding, meta.flip(0))
        c = model.forward_head(embedding.flip(0), meta)
    assert not torch.allclose(a, b, atol=1e-4), "output ignores the metadata"
    assert not torch.allclose(a, c, atol=1e-4), "output ignores the image"


def test_image_only_ignores_metadata(image_only_model: str, branch: ImageBranch) -> None:
    model, embedding = trained(image_only_model, branch)
    assert model.meta_branch is None and not model.uses_meta
    meta = make_batch()["meta"]
    with torch.no_grad():
        a = model({"embedding": embedding, "meta": meta})
        b = model({"embedding": embedding, "meta": torch.randn_like(meta) * 10})
        c = model({"embedding": embedding})
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_metadata_only_never_looks_at_the_image(metadata_only_model: str) -> None:
    # a backbone name that does not exist proves no image branch is ever built
    cfg = ModelConfig(backbone="no_such_backbone", meta_hidden=16)
    model = create_model(metadata_only_model, meta_dim=META_DIM, cfg=cfg).eval()
    assert model.image_branch is None and not model.uses_image
    batch = make_batch()
    with torch.no_grad():
        a = model({"meta": batch["meta"]})
        b = model({"meta": batch["meta"], "image": torch.randn(BATCH, *IMAGE_SHAPE)})
        c = model({"meta": batch["meta"], "embedding": torch.randn(BATCH, 5)})
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_film_starts_as_identity(branch: ImageBranch) -> None:
    model = build("film", branch).eval()
    batch = make_batch()
    with torch.no_grad():
        embedding = branch.embed(batch["image"])
        logits = model.forward_head(embedding, batch["meta"])
        plain = model.head.classifier(embedding)
    torch.testing.assert_close(logits, plain)


# (backbone, declared width of the pooled embedding): mobilenetv3's head_hidden_size (1024) differs
# from its num_features (288) because its conv head runs after the pooling.
WIDTHS = [("resnet18", 512), ("tf_efficientnet_lite0", 1280), ("mobilenetv3_small_050", 1024)]


@pytest.mark.parametrize("backbone,width", WIDTHS)
def test_heads_are_sized_from_the_declared_width(backbone: str, width: int) -> None:
    cfg = ModelConfig(backbone=backbone, weights="none", meta_hidden=16, head_hidden=32)
    model = create_model("concat", meta_dim=META_DIM, cfg=cfg).eval()
    assert model.image_branch.backbone == backbone
    assert model.image_branch.num_features == width
    assert model.head.classifier[1].in_features == width + cfg.meta_hidden
    image_only = create_model("image_only", meta_dim=META_DIM, image_branch=model.image_branch)
    assert image_only.head.classifier[-1].in_features == width
    with torch.no_grad():  # the declaration matches what the branch really produces
        assert model.image_branch.embed(torch.randn(2, *IMAGE_SHAPE)).shape == (2, width)
        assert model(make_batch()).shape == (BATCH, 7)


@pytest.mark.parametrize("backbone,width", WIDTHS)
def test_multiscale_width_adds_the_pooled_earlier_stages(backbone: str, width: int) -> None:
    branch = ImageBranch(backbone, weights="none", multiscale=True).eval()
    channels = {d["module"]: d["num_chs"] for d in branch.model.feature_info}
    assert len(branch.extra_stages) == 2
    assert all(channels[path] == chs for path, chs in branch.extra_stages)
    assert branch.num_features == width + sum(chs for _, chs in branch.extra_stages)
    x = torch.randn(2, *IMAGE_SHAPE)
    with torch.no_grad():
        embedding = branch.embed(x)
        single = branch.pool(branch.forward_features(x))
    assert embedding.shape == (2, branch.num_features)
    torch.testing.assert_close(embedding[:, :width], single)  # the final embedding comes first
    assert not branch.model._forward_hooks and all(
        not m._forward_hooks for m in branch.model.modules()
    )  # capture hooks were removed


@pytest.mark.parametrize(
    "backbone,layer", [("resnet18", "layer4"), ("tf_efficientnet_lite0", "bn2"), ("mobilenetv3_small_050", "blocks.5")]
)
def test_default_target_layer_outputs_the_last_feature_map(backbone: str, layer: str) -> None:
    branch = ImageBranch(backbone).eval()
    target = branch.default_target_layer()
    assert target is branch.model.get_submodule(layer)
    assert branch.target_layer("") is target and branch.target_layer(layer) is target
    seen = []
    handle = target.register_forward_hook(lambda _m, _i, out: seen.append(out.clone()))
    try:
        with torch.no_grad():
            maps = branch.forward_features(torch.randn(2, *IMAGE_SHAPE))
    finally:
        handle.remove()
    assert maps.ndim == 4
    torch.testing.assert_close(seen[-1], maps)
    with pytest.raises(ConfigError, match="no layer 'layer9'"):
        branch.target_layer("layer9")


def test_bad_backbones_and_meta_dims_are_config_errors(branch: ImageBranch) -> None:
    with pytest.raises(ConfigError, match=r"unknown timm backbone 'resnet81'.*resnet18"):
        ImageBranch("resnet81")
    with pytest.raises(ConfigError, match="meta_dim >= 1"):
        create_model("gated", meta_dim=0, image_branch=branch)
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("image_only", meta_dim=META_DIM, num_classes=0, image_branch=branch)


def test_data_config_follows_the_weights(branch: ImageBranch) -> None:
    resnet = ImageBranch("resnet18")
    assert resnet.data_config["mean"] == pytest.approx((0.485, 0.456, 0.406))
    assert len(resnet.data_config["std"]) == 3
    assert set(branch.data_config) >= {"mean", "std", "input_size"}
