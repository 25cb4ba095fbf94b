"""Partial fine-tuning: the backbone split at cached maps, the tail trained on the one loop, live use unchanged."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from multimodal_lesion.ablation import run_ablation
from multimodal_lesion.config import load_config
from multimodal_lesion.data.sampling import EpochSampler, MapBatches
from multimodal_lesion.errors import ConfigError
from multimodal_lesion.models import ImageBranch
from multimodal_lesion.runs import load_run, predict_logits, prepare_inputs, seed_everything
from multimodal_lesion.workflows import train_run

PARTIAL = [
    'model.backbone="tf_efficientnet_lite0"',
    'model.weights="none"',
    "data.image_size=[64, 96]",
    'train.mode="partial"',
    "train.epochs=2",
    "train.batch_size=16",
    "train.warmup_epochs=1",
    "data.test_size=0.25",
    "data.val_size=0.25",
]


@pytest.mark.parametrize(("tail_blocks", "multiscale"), [(0, False), (1, False), (2, False), (2, True)])
def test_embedding_from_cached_maps_equals_the_whole_backbone(tail_blocks: int, multiscale: bool) -> None:
    torch.manual_seed(0)
    branch = ImageBranch("tf_efficientnet_lite0", "none", multiscale, tail_blocks).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        maps = branch.forward_maps(x)
        resumed = branch.embed_from_maps(maps)
        whole = branch.embed(x)
    assert maps.shape[2:] == ((4, 6) if tail_blocks == 2 else (2, 3))  # stride 16, or 32 before the last block
    torch.testing.assert_close(resumed, whole)
    tail = {id(p) for m in branch.tail() for p in m.parameters()}
    assert tail and len(tail) < len(list(branch.parameters()))
    trained = {id(p) for m in branch.trainable_tail() for p in m.parameters()}
    assert trained == (tail if tail_blocks else set())  # tail_blocks=0: the conv head runs frozen


def test_backbones_and_multiscale_that_cannot_be_split_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="multiscale"):
        ImageBranch("tf_efficientnet_lite0", "none", multiscale=True, tail_blocks=1).check_partial()
    with pytest.raises(ConfigError, match="stem \\+ blocks"):  # its conv head runs after the pooling
        ImageBranch("mobilenetv3_small_050", "none").check_partial()
    ImageBranch("resnet18", "none").check_partial()  # stem + layer1-4: split before layer4
    with pytest.raises(ConfigError, match="tail_blocks"):
        ImageBranch("tf_efficientnet_lite0", "none", tail_blocks=7).check_partial()


def test_map_batches_draw_views_and_crops_per_epoch_and_keep_all_views_for_tta() -> None:
    maps = np.random.default_rng(0).standard_normal((10, 4, 3, 5, 6)).astype(np.float16)
    rows = np.array([1, 3, 5, 7, 9])
    tensors = {"meta": torch.zeros(5, 2), "target": torch.arange(5)}
    ids = [f"img{r}" for r in rows]

    def batches(train: bool, all_views: bool = False) -> MapBatches:
        sampler = EpochSampler(5, shuffle=train, seed=0)
        return MapBatches(maps, rows, tensors, ids, 4, sampler, train=train, crop=1, all_views=all_views, seed=0)

    train = batches(True)
    first = [b["maps"] for b in train]
    assert [m.shape for m in first] == [(4, 3, 4, 5), (1, 3, 4, 5)]
    assert all(torch.equal(a, b) for a, b in zip(first, (b["maps"] for b in train), strict=True))  # same epoch
    train.set_epoch(1)
    assert not all(torch.equal(a, b) for a, b in zip(first, (b["maps"] for b in train), strict=False))
    batch = next(iter(train))
    for k, image_id in enumerate(batch["image_id"]):  # each crop is a window of one flipped view of its own image
        row = int(image_id[3:])
        window = batch["maps"][k].numpy()
        assert any(
            np.array_equal(window, maps[row, v, :, dy : dy + 4, dx : dx + 5])
            for v in range(4)
            for dy in range(2)
            for dx in range(2)
        )
    evaluation = next(iter(batches(False)))
    np.testing.assert_array_equal(evaluation["maps"].numpy(), maps[rows[:4], 0])
    assert next(iter(batches(False, all_views=True)))["maps"].shape == (4, 4, 3, 5, 6)


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory: pytest.TempPathFactory, tiny_ham_factory: Callable[..., Path]) -> tuple[Path, dict]:
    os.environ["MMLESION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    root = tiny_ham_factory(tmp_path_factory.mktemp("data") / "dataset", n_lesions=42)
    cfg = load_config(None, [*PARTIAL, f'data.root="{root}"', 'model.name="concat"', "train.tta=true"])
    out = tmp_path_factory.mktemp("runs") / "partial"
    return out, train_run(cfg, out, show=False)


def test_partial_mode_trains_the_tail_only_and_predicts_live_like_on_the_cache(partial_run, single_thread) -> None:
    out, metrics = partial_run
    assert metrics["mode"] == "partial" and metrics["tta"] is True
    run = load_run(out)
    inputs, model = run.inputs, run.inputs.model
    branch = model.image_branch
    seed_everything(inputs.cfg.train.seed)  # the initial weights, as prepare_inputs builds them
    initial = prepare_inputs(inputs.cfg, inputs.dataset, inputs.splits, inputs.encoder).model.image_branch
    stem, tail = branch.model.conv_stem.weight, next(branch.tail()[0].parameters())
    assert torch.equal(stem, initial.model.conv_stem.weight)  # the cached part is frozen
    assert not torch.equal(tail, next(initial.tail()[0].parameters()))  # the tail was fine-tuned
    # the cached maps (float16, 4 flips averaged as TTA) give the logits of the live backbone on the images
    cached, _, ids = predict_logits(model, inputs.batches("test", train=False, show=False), inputs.device)
    rows = inputs.indices("test")
    assert ids == [inputs.image_ids[r] for r in rows]
    batch = {"image": inputs.normalized_images(rows), "meta": torch.from_numpy(inputs.meta[rows])}
    live, _, _ = predict_logits(
        model, [{**batch, "target": torch.zeros(len(rows)), "image_id": ids}], inputs.device, tta=True
    )
    np.testing.assert_allclose(cached, live, atol=2e-2, rtol=2e-2)


def test_a_partial_run_by_default_records_its_backend_and_caches_the_eager_maps(partial_run, single_thread) -> None:
    """``train.embed_backend`` defaults to ``auto``: config.toml names what it resolved to (OpenVINO, installed
    by the test extra), and the maps cached by that pass are eager torch's to 1e-3 (float16 cache)."""
    from multimodal_lesion.models import flipped_views

    out, _ = partial_run
    assert load_config(None).train.embed_backend == "auto"
    assert 'embed_backend = "openvino"' in (out / "config.toml").read_text()
    inputs = load_run(out).inputs
    maps, branch = inputs.feature_maps(show=False), inputs.model.image_branch
    rows = np.arange(0, len(inputs.image_ids), 5)
    with torch.no_grad():  # the loaded run's frozen stem: what made the cache
        eager = branch.forward_maps(flipped_views(inputs.normalized_images(rows))).unflatten(0, (4, len(rows)))
    np.testing.assert_allclose(maps[rows].astype(np.float32), eager.transpose(0, 1).numpy(), atol=1e-3, rtol=1e-3)


def test_partial_is_an_ablation_mode_with_one_maps_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMLESION_CACHE", str(tmp_path / "cache"))
    cfg = load_config(
        None,
        [
            *PARTIAL,
            "data.synthetic_n=60",
            "data.image_size=[32, 32]",
            "model.head_hidden=16",
            'ablation.models=["image_only", "concat"]',
            "ablation.gbm=false",
            'ablation.mode="partial"',
            "ablation.folds=3",
            "ablation.seeds=[0]",
            "ablation.bootstrap=20",
            "ablation.workers=2",
        ],
    )
    run_ablation(cfg, tmp_path / "ablation", show=False)
    results = pd.read_csv(tmp_path / "ablation" / "results.csv")
    assert sorted(results["model"].unique()) == ["concat", "image_only"] and len(results) == 6
    assert results["balanced_accuracy"].between(0, 1).all()
    assert len(list((tmp_path / "cache").rglob("maps-*.npy"))) == 1  # built once, before the cells


def test_augmented_map_views_extend_the_flips_reproducibly_and_only_train_on_them(
    tmp_path: Path, tiny_ham_factory: Callable[..., Path], single_thread
) -> None:
    from multimodal_lesion.data.ham10000 import read_ham10000
    from multimodal_lesion.data.splits import split_lesions

    root = tiny_ham_factory(tmp_path / "dataset", n_lesions=12)
    dataset = read_ham10000(root)
    splits = split_lesions(dataset.metadata, test_size=0.25, val_size=0.25)
    settings = [*PARTIAL, f'data.root="{root}"', 'data.cache_dir="' + str(tmp_path / "cache") + '"']
    flips_only = prepare_inputs(load_config(None, settings), dataset, splits)
    augmented_cfg = load_config(None, [*settings, "train.map_views=2", 'train.augment="strong"'])
    augmented = prepare_inputs(augmented_cfg, dataset, splits)
    plain, views = flips_only.feature_maps(show=False), augmented.feature_maps(show=False)
    assert views.shape == (plain.shape[0], 6, *plain.shape[2:])
    np.testing.assert_array_equal(views[:, :4], plain)  # the flips are the same maps, a separate cache entry
    assert len(list((tmp_path / "cache").glob("maps-*.npy"))) == 2
    for k in (4, 5):  # an augmented view is none of the flips of its image
        assert not any(np.allclose(views[:, k], plain[:, v], atol=1e-2) for v in range(4))
    assert not np.allclose(views[:, 4], views[:, 5], atol=1e-2)
    rebuilt = tmp_path / "rebuilt"  # drawn again from scratch: the same views (seeded by image rows and view)
    again = prepare_inputs(replace_cache(augmented_cfg, rebuilt), dataset, splits).feature_maps(show=False)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(views))
    train = augmented.batches("train", train=True, show=False)
    shapes = {tuple(b["maps"].shape[1:]) for b in train}
    assert shapes == {(plain.shape[2], plain.shape[3] - 1, plain.shape[4] - 1)}  # one view per image, cropped
    test = augmented.batches("test", train=False, show=False)
    assert all(b["maps"].shape[1] == plain.shape[2] for b in test)  # evaluation: the unflipped view only
    with pytest.raises(ConfigError, match=r"train\.map_views"):
        load_config(None, [*settings, "train.map_views=2"])  # the light preset has no views to draw


def replace_cache(cfg, folder: Path):
    from multimodal_lesion.config import replace

    return replace(cfg, data={"cache_dir": str(folder)})


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_one_maps_pass_gives_the_flips_and_views_of_separate_passes(
    tmp_path: Path, backend: str, single_thread
) -> None:
    """Flips and augmented views in one pass (each batch read once, written as computed) = the maps of the
    flipped views and of the seeded augmented copies computed apart, eagerly, to 1e-3."""
    from multimodal_lesion.data.datasets import BATCH_AUGMENTATIONS, Normalize
    from multimodal_lesion.models import flipped_views
    from multimodal_lesion.models.inference import backend_available
    from multimodal_lesion.runs.feature_maps import AugmentedViews, cached_feature_maps

    if not backend_available(backend):
        pytest.skip(f"{backend} is not installed")
    torch.manual_seed(0)
    branch = ImageBranch("tf_efficientnet_lite0", "none", False, 2).eval()
    pixels = np.random.default_rng(0).integers(0, 256, size=(10, 64, 96, 3), dtype=np.uint8)
    normalize, views = Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)), AugmentedViews(2, "strong", 3)
    maps = cached_feature_maps(
        branch, lambda: pixels, (64, 96), len(pixels), normalize, folder=tmp_path, fingerprint="f",
        identity={"test": 1}, batch_size=4, backend=backend, show=False, augmented=views,
    )  # fmt: skip
    augment = BATCH_AUGMENTATIONS["strong"]()
    assert augment is not None
    for start in range(0, len(pixels), 4):
        chunk = torch.from_numpy(pixels[start : start + 4]).permute(0, 3, 1, 2)
        with torch.no_grad():
            flips = branch.forward_maps(flipped_views(normalize(chunk))).unflatten(0, (4, len(chunk)))
            copies = [
                branch.forward_maps(
                    augment(chunk, torch.Generator().manual_seed(3 * 1_000_003 + start * 101 + k), normalize)
                )
                for k in range(2)
            ]
        expected = torch.cat([flips, torch.stack(copies)]).transpose(0, 1).numpy()
        np.testing.assert_allclose(maps[start : start + 4].astype(np.float32), expected, atol=1e-3, rtol=1e-3)
