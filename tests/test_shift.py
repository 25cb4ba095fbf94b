"""Acquisition shift: colour constancy, the acquisition augmentation and test-time batch-norm adaptation (AdaBN).

Real computations throughout: Shades of Gray checked against a hand computation, the image / maps caches
built for real, the augmentation drawn on real batches, and AdaBN on a tiny end-to-end and a tiny partial
run (real timm backbones, trained on a tiny HAM10000-layout dataset) scored on a recoloured copy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from multimodal_lesion.config import load_config
from multimodal_lesion.data.cache import image_array
from multimodal_lesion.data.color import SATURATED, ColorConstancy, shades_of_gray
from multimodal_lesion.data.constants import METADATA_FILE
from multimodal_lesion.data.datasets import (
    BATCH_AUGMENTATIONS,
    AcquisitionAugment,
    LesionTorchDataset,
    Normalize,
    build_augmentation,
)
from multimodal_lesion.data.ham10000 import read_ham10000
from multimodal_lesion.data.schema import preset
from multimodal_lesion.data.splits import split_lesions
from multimodal_lesion.errors import ConfigError
from multimodal_lesion.models import ImageBranch, create_model
from multimodal_lesion.models.adapt import batchnorm_layers
from multimodal_lesion.runs import (
    Cases,
    LoadedModel,
    Predictor,
    RunFolder,
    adapt_to_cases,
    predict_arrays,
    prepare_inputs,
)
from multimodal_lesion.runs.embeddings import embedding_identity
from multimodal_lesion.runs.feature_maps import AugmentedViews, cached_feature_maps
from multimodal_lesion.workflows import train_run

pytestmark = pytest.mark.usefixtures("single_thread")

# --- colour constancy ---------------------------------------------------------------------------------


def test_shades_of_gray_matches_a_hand_computation_and_leaves_saturated_pixels_out() -> None:
    # two pixels of one brownish cast (R:G:B = 5 : 2.5 : 1) and one saturated pixel (R = 250) that must not count
    image = np.array([[[100, 50, 20], [200, 100, 40], [SATURATED, 10, 10]]], dtype=np.uint8)
    # p = 2: e = sqrt(mean of squares) over the first two pixels = k * (5, 2.5, 1), k = sqrt((20^2 + 40^2) / 2);
    # the grey point is their mean, k * 8.5 / 3, so the gains are (8.5/15, 8.5/7.5, 8.5/3) = (0.5667, 1.1333, 2.8333)
    out = shades_of_gray(image, p=2)
    expected = np.array([[[57, 57, 57], [113, 113, 113], [142, 11, 28]]], dtype=np.uint8)
    np.testing.assert_array_equal(out, expected)  # the cast is gone: the two pixels are grey
    assert out.dtype == np.uint8 and out.shape == image.shape


def test_shades_of_gray_undoes_a_per_channel_gain_up_to_rounding() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(20, 180, size=(3, 24, 32, 3)).astype(np.uint8)
    cast = np.clip(np.rint(images * np.array([0.8, 1.0, 1.3])), 0, 255).astype(np.uint8)  # no pixel saturates
    a, b = shades_of_gray(images).astype(float), shades_of_gray(cast).astype(float)
    # the gains divide out up to one factor common to all channels (the cast's grey level: the mean illuminant
    # moved with it) and the rounding of the cast copy
    common = float((a * b).sum() / (a * a).sum())
    assert 0.9 < common < 1.2 and np.abs(b - common * a).max() <= 2.5
    assert np.abs(images.astype(int) - cast.astype(int)).max() > 40  # the cast itself was large
    np.testing.assert_array_equal(shades_of_gray(images)[1], shades_of_gray(images[1]))  # batch = one by one


def test_color_constancy_is_a_config_setting_whose_none_changes_nothing() -> None:
    cfg = load_config(None, ['data.color_constancy="shades_of_gray"', "data.color_constancy_p=4"])
    assert (cfg.data.color_constancy, cfg.data.color_constancy_p) == ("shades_of_gray", 4.0)
    with pytest.raises(ConfigError, match=r"data\.color_constancy"):
        load_config(None, ['data.color_constancy="retinex"'])
    images = np.zeros((2, 4, 4, 3), np.uint8)
    assert ColorConstancy()(images) is images and ColorConstancy().key() == {}


def test_cache_keys_differ_with_color_constancy(tiny_ham: Path, tmp_path: Path) -> None:
    dataset = read_ham10000(tiny_ham)
    sog = ColorConstancy("shades_of_gray")
    plain = image_array(dataset, (48, 64), tmp_path)
    corrected = image_array(dataset, (48, 64), tmp_path, color=sog)
    assert len(list(tmp_path.glob("images-*.npy"))) == 2  # a cache of its own, beside the plain one
    np.testing.assert_array_equal(corrected, shades_of_gray(np.asarray(plain)))
    assert (
        json.loads(next(p for p in tmp_path.glob("images-*.json") if "color" in p.read_text()).read_text())["color"]
        == sog.key()
    )
    other_p = ColorConstancy("shades_of_gray", p=2).key()
    identities = [embedding_identity("b", "w", False, (48, 64), "float32", c) for c in ({}, sog.key(), other_p)]
    assert len({json.dumps(i, sort_keys=True) for i in identities}) == 3  # embeddings and maps are keyed by it
    assert identities[0] == embedding_identity("b", "w", False, (48, 64), "float32")  # old caches stay valid


def test_run_inputs_see_corrected_images_and_keep_the_originals(tiny_ham: Path, tmp_path: Path) -> None:
    dataset = read_ham10000(tiny_ham)
    splits = split_lesions(dataset.metadata, test_size=0.25, val_size=0.25)
    cfg = load_config(
        None,
        [
            'model.name="image_only"',
            'model.backbone="test_resnet"',
            'model.weights="none"',
            "data.image_size=[48, 64]",
            f'data.cache_dir="{tmp_path}"',
            'data.color_constancy="shades_of_gray"',
        ],
    )
    inputs = prepare_inputs(cfg, dataset, splits)
    np.testing.assert_array_equal(inputs.images(), shades_of_gray(np.asarray(inputs.original_images())))
    assert not np.array_equal(inputs.images(), inputs.original_images())


def test_the_case_page_shows_the_image_as_the_model_saw_it_and_as_it_was(tmp_path: Path) -> None:
    from multimodal_lesion.explain.results import CaseExplanation, CohortExplanation
    from multimodal_lesion.report.explanations import draw_explanation_figures
    from multimodal_lesion.report.html import case_page_name, write_report

    original = np.random.default_rng(0).integers(0, 200, size=(48, 64, 3), dtype=np.uint8)
    seen = shades_of_gray(original)
    case = CaseExplanation(
        image_id="ISIC_1",
        target_class="nv",
        probabilities={"nv": 0.7, "mel": 0.3},
        pixels=seen,
        original_pixels=original,
    )
    plain = CaseExplanation(image_id="ISIC_2", target_class="nv", probabilities={"nv": 0.7, "mel": 0.3}, pixels=seen)
    cohort = CohortExplanation("Colour", {}, [case, plain])
    write_report(tmp_path, cohort, draw_explanation_figures(tmp_path, cohort))
    page = (tmp_path / "cases" / case_page_name("ISIC_1")).read_text()
    assert "as the model saw it" in page and "as it was, before the run" in page
    stem = case_page_name("ISIC_1").removesuffix(".html")
    for name, pixels in (("original", original), ("image", seen)):  # the figures the page embeds
        with Image.open(tmp_path / "cases" / "assets" / f"{stem}_{name}.png") as im:
            np.testing.assert_array_equal(np.asarray(im.convert("RGB")), pixels)
    assert "as it was" not in (tmp_path / "cases" / case_page_name("ISIC_2")).read_text()  # no colour constancy


# --- the acquisition augmentation ---------------------------------------------------------------------


def test_acquisition_preset_changes_every_image_keeps_shape_and_range() -> None:
    x = torch.from_numpy(np.random.default_rng(0).integers(30, 220, size=(8, 3, 48, 64), dtype=np.uint8))
    augment = BATCH_AUGMENTATIONS["acquisition"]()
    assert isinstance(augment, AcquisitionAugment)
    y = augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == torch.float32 and y.min() >= 0 and y.max() <= 255
    assert all(not torch.allclose(y[i], x[i].float(), atol=2) for i in range(len(x)))
    again = augment(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(y, again)  # the draws come from the generator only
    normalize = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    torch.testing.assert_close(augment(x, torch.Generator().manual_seed(0), normalize), normalize(y))


def _only(chances: tuple[float, float, float, float], noise: float = 0.0) -> AcquisitionAugment:
    """The acquisition preset with only the named steps (hair, vignette, corners, blur; noise): no geometry, no cast."""
    augment = AcquisitionAugment(cast=0.0, gamma=(1.0, 1.0), noise=noise, chances=chances)
    augment.degrees, augment.scale, augment.translate, augment.jitter = 0.0, (1.0, 1.0), 0.0, (0.0, 0.0, 0.0, 0.0)
    augment.flips = False
    return augment


def test_acquisition_draws_hair_vignette_black_corners_blur_and_noise() -> None:
    grey = torch.full((4, 3, 60, 80), 160, dtype=torch.uint8)
    hair = _only((1.0, 0.0, 0.0, 0.0))(grey, torch.Generator().manual_seed(1))
    dark = hair.mean(1) < 120  # thin dark curves on every image, a small share of its pixels
    assert all(0 < int(d.sum()) < 0.25 * d.numel() for d in dark)
    optics = _only((0.0, 1.0, 1.0, 0.0))(grey, torch.Generator().manual_seed(1))
    assert (optics[:, :, 0, 0] == 0).all() and (optics[:, :, -1, -1] == 0).all()  # outside a round field of view
    assert (optics[:, :, 28:32, 38:42].mean((1, 2, 3)) > optics[:, :, 30, 8:10].mean((1, 2))).all()  # vignette
    edge = torch.zeros(1, 3, 20, 20, dtype=torch.uint8)
    edge[..., 10:] = 200
    soft = _only((0.0, 0.0, 0.0, 1.0))(edge, torch.Generator().manual_seed(0))
    assert 0 < soft[0, 0, 5, 9] < 100 < soft[0, 0, 5, 10] < 200  # the step is smoothed
    assert _only((0.0, 0.0, 0.0, 0.0), noise=10.0)(grey, torch.Generator().manual_seed(0)).std() > 0.5
    torch.testing.assert_close(_only((0.0, 0.0, 0.0, 0.0))(grey, torch.Generator()), grey.float())  # all off


def test_the_per_image_path_augments_uint8_images_and_keeps_labels() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(6, 48, 64, 3), dtype=np.uint8)
    meta, targets = np.zeros((6, 2), np.float32), np.arange(6) % 3
    ids = [f"img{i}" for i in range(6)]
    plain = LesionTorchDataset(images, meta, targets, ids, np.arange(6))
    augmented = LesionTorchDataset(images, meta, targets, ids, np.arange(6), build_augmentation("acquisition"))
    torch.manual_seed(0)
    for i in range(6):
        a, b = plain[i], augmented[i]
        assert b["image"].shape == (3, 48, 64) and b["image"].dtype == torch.uint8
        assert not torch.equal(a["image"], b["image"])
        assert int(a["target"]) == int(b["target"]) == targets[i] and a["image_id"] == b["image_id"]


def test_partial_map_views_are_drawn_under_the_acquisition_preset(tmp_path: Path) -> None:
    cfg = load_config(None, ['train.mode="partial"', "train.map_views=2", 'train.augment="acquisition"'])
    assert cfg.train.augment == "acquisition"
    torch.manual_seed(0)
    branch = ImageBranch("tf_efficientnet_lite0", "none", False, 2).eval()
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 64, 96, 3), dtype=np.uint8)
    normalize = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    def maps(views: AugmentedViews | None) -> np.ndarray:
        return cached_feature_maps(
            branch, lambda: pixels, (64, 96), 4, normalize, folder=tmp_path, fingerprint="f",
            identity={"test": 1}, batch_size=4, show=False, augmented=views,
        )  # fmt: skip

    acquisition, strong = maps(AugmentedViews(2, "acquisition", 0)), maps(AugmentedViews(2, "strong", 0))
    assert acquisition.shape[1] == 6 and len(list(tmp_path.glob("maps-*.npy"))) == 2  # keyed by the preset
    np.testing.assert_array_equal(acquisition[:, :4], strong[:, :4])  # the same flips
    assert not np.allclose(acquisition[:, 4:], strong[:, 4:], atol=1e-2)
    expected = BATCH_AUGMENTATIONS["acquisition"]()(
        torch.from_numpy(pixels).permute(0, 3, 1, 2),
        torch.Generator().manual_seed(0 * 1_000_003 + 0 * 101 + 1),
        normalize,
    )
    with torch.no_grad():
        np.testing.assert_allclose(
            acquisition[:, 5].astype(np.float32), branch.forward_maps(expected).numpy(), atol=2e-2, rtol=2e-2
        )


# --- test-time adaptation of the batch-norm statistics (AdaBN) ----------------------------------------


def _loaded(tmp_path: Path, settings: list[str], name: str = "concat") -> Predictor:
    """A predictor over an untrained model of ``settings`` (no run trained: the layer choice is the subject)."""
    cfg = load_config(None, [*settings, f'model.name="{name}"', 'model.weights="none"'])
    model = create_model(name, meta_dim=4, num_classes=7, cfg=cfg.model).eval()
    loaded = LoadedModel(
        RunFolder(tmp_path), cfg, preset("ham10000"), None, model, torch.device("cpu"), 1.0, None, False
    )  # type: ignore[arg-type]
    return Predictor(loaded)


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """The modules whose running statistics changed."""
    return {k.rsplit(".", 1)[0] for k in before if k.endswith("running_mean") and not torch.equal(before[k], after[k])}


def test_adabn_moves_only_the_running_statistics_towards_the_new_data(tmp_path: Path) -> None:
    torch.manual_seed(0)
    predictor = _loaded(tmp_path, ['model.backbone="test_resnet"', "data.image_size=[32, 32]", 'train.mode="end2end"'])
    model, branch = predictor.model, predictor.model.image_branch
    params, buffers = _params(model), _buffers(model)
    pixels = np.random.default_rng(0).integers(150, 256, size=(12, 32, 32, 3), dtype=np.uint8)  # a bright clinic
    first = batchnorm_layers([branch])[0]
    seen: list[torch.Tensor] = []
    hook = first.register_forward_pre_hook(lambda _, args: seen.append(args[0].mean((0, 2, 3))))
    with torch.no_grad():  # what the first layer sees on the new images (it does not depend on any statistics)
        branch.embed(predictor.normalize(torch.from_numpy(pixels).permute(0, 3, 1, 2)))
    hook.remove()
    record = predictor.adapt_batchnorm([pixels[:6], pixels[6:]])
    assert record == {"method": "adabn", "scope": "backbone", "layers": len(batchnorm_layers([branch])), "images": 12}
    after = _params(model)
    assert all(torch.equal(params[k], after[k]) for k in params)  # every weight bit-identical
    names = {n for n, m in model.named_modules() if m in batchnorm_layers([branch])}
    assert _moved(buffers, _buffers(model)) == names and names  # every batch-norm layer of the backbone
    old = buffers[next(n for n, m in model.named_modules() if m is first) + ".running_mean"]
    assert (first.running_mean - seen[0]).abs().mean() < (old - seen[0]).abs().mean()  # towards the new data
    torch.testing.assert_close(first.running_mean, seen[0], atol=1e-4, rtol=1e-4)  # its mean over the images
    assert not model.training


def test_adabn_of_a_partial_run_moves_the_tail_and_keeps_the_prefix_that_made_the_maps(tmp_path: Path) -> None:
    torch.manual_seed(0)
    settings = ['model.backbone="tf_efficientnet_lite0"', "data.image_size=[64, 96]", 'train.mode="partial"']
    predictor = _loaded(tmp_path, settings)
    model, branch = predictor.model, predictor.model.image_branch
    buffers = _buffers(model)
    pixels = np.random.default_rng(0).integers(0, 256, size=(4, 64, 96, 3), dtype=np.uint8)
    record = predictor.adapt_batchnorm([pixels])
    tail = batchnorm_layers(branch.tail())
    assert record["scope"] == "tail" and record["layers"] == len(tail) > 0
    assert _moved(buffers, _buffers(model)) == {n for n, m in model.named_modules() if m in tail}


@pytest.mark.parametrize(
    ("settings", "name", "needle"),
    [
        (['model.backbone="test_resnet"', 'train.mode="frozen"'], "concat", "frozen run"),
        (['train.mode="end2end"'], "metadata_only", "no image branch"),
    ],
)
def test_adabn_is_refused_where_no_statistics_were_learned(
    tmp_path: Path, settings: list[str], name: str, needle: str
) -> None:
    predictor = _loaded(tmp_path, [*settings, "data.image_size=[32, 32]"], name)
    before = _buffers(predictor.model)
    with pytest.raises(ConfigError, match=f"--adapt-bn: .*{needle}"):
        predictor.adapt_batchnorm([np.zeros((2, 32, 32, 3), np.uint8)])
    assert all(torch.equal(before[k], v) for k, v in _buffers(predictor.model).items())


def test_predict_adapt_bn_needs_a_set_of_images(cli, tmp_path: Path) -> None:
    image = tmp_path / "lesion.jpg"
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(image)
    cli.error(cli("predict", "--run", tmp_path, "--image", image, "--adapt-bn"), "predict", "--adapt-bn", "--data")


# --- AdaBN on real tiny runs (trained here) and external evaluation ---------------------------------
TINY = [
    'model.name="concat"',
    'model.weights="none"',
    "train.epochs=2",
    "train.batch_size=16",
    "train.warmup_epochs=1",
    "data.test_size=0.25",
    "data.val_size=0.25",
    'train.device="cpu"',
    "train.threads=1",
]
END2END = [*TINY, 'model.backbone="test_resnet"', "data.image_size=[48, 64]", 'train.mode="end2end"']
FROZEN = [*TINY, 'model.backbone="test_resnet"', "data.image_size=[48, 64]", 'train.mode="frozen"']


def recoloured_copy(source: Path, dest: Path, gains: tuple[float, float, float] = (1.3, 0.9, 0.6)) -> Path:
    """``source`` (HAM10000 layout) under new ids, every image under another clinic's colour cast."""
    df = pd.read_csv(source / METADATA_FILE)
    new_ids = {old: f"ISIC_{8_000_000 + k:07d}" for k, old in enumerate(df.image_id)}
    (dest / "images").mkdir(parents=True)
    for old, new in new_ids.items():
        with Image.open(next(source.rglob(f"{old}.jpg"))) as im:
            arr = np.clip(np.asarray(im.convert("RGB"), np.float32) * np.array(gains) + 20, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(dest / "images" / f"{new}.jpg", quality=90)
    df["image_id"] = df.image_id.map(new_ids)
    df["lesion_id"] = df.lesion_id.str.replace("HAM_", "HAM_8", regex=False)
    df.to_csv(dest / METADATA_FILE, index=False)
    return dest


@pytest.fixture(scope="module")
def shifted(tmp_path_factory: pytest.TempPathFactory, tiny_ham_factory: Callable[..., Path]) -> dict[str, Path]:
    """A tiny end-to-end and a tiny frozen run on one tiny dataset, and a recoloured copy of it."""
    os.environ["MMLESION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    root = tiny_ham_factory(tmp_path_factory.mktemp("data") / "dataset", n_lesions=30)
    runs = tmp_path_factory.mktemp("runs")
    out = {"data": root, "other": recoloured_copy(root, tmp_path_factory.mktemp("other") / "clinic_c")}
    for name, settings in (("end2end", END2END), ("frozen", FROZEN)):
        out[name] = runs / name
        train_run(load_config(None, [*settings, f'data.root="{root}"']), out[name], show=False)
    return out


def other_cases(other: Path) -> Cases:
    table = pd.read_csv(other / METADATA_FILE)
    paths = [other / "images" / f"{i}.jpg" for i in table.image_id]
    return Cases(paths, table[["age", "sex", "localization"]], table.image_id.tolist())


def _state(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return (
        {k: v.detach().clone() for k, v in model.named_parameters()},
        {k: v.detach().clone() for k, v in model.named_buffers()},
    )


def _first_bn_input_mean(predictor: Predictor, cases: Cases) -> torch.Tensor:
    """The channel means of what the backbone's first batch-norm layer sees on ``cases`` (eval mode)."""
    branch = predictor.model.image_branch
    first = batchnorm_layers([branch])[0]
    seen: list[torch.Tensor] = []
    handle = first.register_forward_pre_hook(lambda _, args: seen.append(args[0].mean((0, 2, 3))))
    try:
        with torch.no_grad():
            for path in cases.paths:
                with Image.open(path) as im:
                    x = predictor.normalize(
                        torch.from_numpy(predictor.pixels(im.convert("RGB"))[None]).permute(0, 3, 1, 2)
                    )
                branch.embed(x)
    finally:
        handle.remove()
    return torch.stack(seen).mean(0)


@pytest.mark.slow
def test_adapt_bn_moves_only_the_batchnorm_statistics_of_an_end2end_run(shifted: dict[str, Path]) -> None:
    cases = other_cases(shifted["other"])
    plain = Predictor.load(shifted["end2end"])
    before = predict_arrays(plain, cases, "other").calibrated
    predictor = Predictor.load(shifted["end2end"])
    params, buffers = _state(predictor.model)
    target = _first_bn_input_mean(predictor, cases)
    record = adapt_to_cases(predictor, cases, "other")
    assert record["method"] == "adabn" and record["scope"] == "backbone" and record["images"] == len(cases.ids)
    new_params, new_buffers = _state(predictor.model)
    assert all(torch.equal(params[k], new_params[k]) for k in params)  # every weight bit-identical
    layers = {id(m) for m in batchnorm_layers([predictor.model.image_branch])}
    names = {n for n, m in predictor.model.named_modules() if id(m) in layers}
    assert record["layers"] == len(layers) > 0
    moved = {k.rsplit(".", 1)[0] for k in buffers if not torch.equal(buffers[k], new_buffers[k])}
    assert moved == names  # the running statistics of every batch-norm layer, and nothing else
    first = batchnorm_layers([predictor.model.image_branch])[0]
    old_mean = buffers[next(n for n in names if predictor.model.get_submodule(n) is first) + ".running_mean"]
    assert (first.running_mean - target).abs().mean() < (old_mean - target).abs().mean()  # towards the new data
    torch.testing.assert_close(first.running_mean, target, atol=1e-4, rtol=1e-4)  # its mean over the images
    after = predict_arrays(predictor, cases, "other").calibrated
    assert not np.allclose(before, after, atol=1e-4)
    assert not predictor.model.training


@pytest.mark.slow
def test_external_evaluation_with_adapt_bn_is_recorded_apart(shifted: dict[str, Path]) -> None:
    import multimodal_lesion as mml

    run = mml.load_run(shifted["end2end"])
    plain = run.evaluate(shifted["other"])
    adapted = run.evaluate(shifted["other"], adapt_bn=True)
    assert adapted.path != plain.path and adapted.path.parent.name.endswith("-adapt_bn")
    metrics = json.loads(adapted.path.read_text())
    assert metrics["adapt_bn"]["method"] == "adabn" and metrics["adapt_bn"]["images"] > 0
    assert json.loads(plain.path.read_text())["adapt_bn"] is None
    table = run.predict_table(shifted["other"] / "images", adapt_bn=True)
    assert len(table) == metrics["adapt_bn"]["images"]


@pytest.mark.slow
def test_adapt_bn_is_refused_where_it_does_not_apply(shifted: dict[str, Path], cli) -> None:
    with pytest.raises(ConfigError, match="frozen run"):
        adapt_to_cases(Predictor.load(shifted["frozen"]), other_cases(shifted["other"]), "other")
    cli.error(
        cli("evaluate", "--run", shifted["frozen"], "--data", shifted["other"], "--adapt-bn"),
        "evaluate",
        "--adapt-bn",
        "frozen run",
    )
    cli.error(cli("evaluate", "--run", shifted["end2end"], "--adapt-bn"), "evaluate", "--adapt-bn", "--data")
    image = next((shifted["other"] / "images").iterdir())
    cli.error(cli("predict", "--run", shifted["end2end"], "--image", image, "--adapt-bn"), "predict", "--adapt-bn")
