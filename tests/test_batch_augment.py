"""Batch-level augmentation of cached uint8 images: the same ranges as the per-image presets, no per-image Python."""

from __future__ import annotations

import numpy as np
import torch

from multimodal_lesion.data.datasets import BATCH_AUGMENTATIONS, BatchAugment, Normalize
from multimodal_lesion.data.sampling import EpochSampler, ImageBatches


def test_flips_only_flip_and_every_flip_is_drawn() -> None:
    x = torch.randint(0, 256, (64, 3, 8, 10), dtype=torch.uint8)
    y = BatchAugment(flips=True)(x, torch.Generator().manual_seed(0))
    seen = set()
    for i in range(len(x)):
        views = {d: torch.equal(y[i], (x[i].flip(d) if d else x[i]).float()) for d in [(), (2,), (1,), (1, 2)]}
        assert sum(views.values()) >= 1
        seen |= {d for d, hit in views.items() if hit}
    assert seen == {(), (2,), (1,), (1, 2)}


def test_identity_affine_and_colour_leave_pixels_unchanged() -> None:
    x = torch.randint(0, 256, (4, 3, 12, 16), dtype=torch.uint8)
    same = BatchAugment(flips=False, degrees=0.0, scale=(1.0, 1.0))(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(same, x.float())
    # a full affine path with zero rotation and unit scale is the identity too (grid_sample at pixel centres)
    unit = BatchAugment(flips=False, degrees=1e-9, scale=(1.0, 1.0))(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(unit, x.float(), atol=1e-3, rtol=0)


def test_strong_preset_keeps_range_and_moves_each_image_differently() -> None:
    x = torch.full((8, 3, 20, 20), 128, dtype=torch.uint8)
    x[:, 0, 5:15, 5:15] = 250  # a red square on grey
    y = BATCH_AUGMENTATIONS["strong"]()(x, torch.Generator().manual_seed(1))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert float(y.min()) >= 0 and float(y.max()) <= 255
    means = y.mean((1, 2, 3))
    assert len(set(np.round(means.numpy(), 3))) == len(x)  # per-image draws, not one for the batch


def test_flips_ride_in_the_affine_resampling() -> None:
    # with a (near-)identity rotation and scale, the one grid_sample call must give exactly the four flips
    x = torch.randint(0, 256, (32, 3, 9, 12), dtype=torch.uint8)
    y = BatchAugment(flips=True, degrees=1e-9)(x, torch.Generator().manual_seed(2))
    seen = set()
    for i in range(len(x)):
        hits = [d for d in [(), (2,), (1,), (1, 2)] if torch.allclose(y[i], x[i].flip(d).float(), atol=1e-3)]
        assert len(hits) == 1
        seen.add(hits[0])
    assert seen == {(), (2,), (1,), (1, 2)}


def _stepwise_jitter(y: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """Brightness, contrast and saturation applied one after another on the image (the textbook way)."""
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    brightness, contrast, saturation = (f.view(-1, 1, 1, 1) for f in factors)
    y = y * brightness
    mean_grey = (y * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    y = (y - mean_grey) * contrast + mean_grey
    grey = (y * weights).sum(1, keepdim=True)
    return ((y - grey) * saturation + grey).clamp(0, 255)


def test_one_colour_matrix_equals_the_jitter_step_by_step() -> None:
    x = torch.randint(0, 256, (16, 3, 10, 14), dtype=torch.uint8)
    y = BatchAugment(flips=False, jitter=(0.3, 0.3, 0.3, 0.0))(x, torch.Generator().manual_seed(5))
    rng = torch.Generator().manual_seed(5)  # the same draws, in the documented order
    factors = [1 + (torch.rand(len(x), generator=rng) * 2 - 1) * 0.3 for _ in range(3)]
    torch.testing.assert_close(y, _stepwise_jitter(x.float(), factors), atol=1e-3, rtol=0)
    # a hue rotation keeps each pixel's luma and only turns its chroma
    hued = BatchAugment(flips=False, jitter=(0.0, 0.0, 0.0, 0.2))(x, torch.Generator().manual_seed(5))
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    inside = (hued > 0.5) & (hued < 254.5)
    keep = inside.all(1, keepdim=True)  # pixels not clamped
    luma_before, luma_after = (x.float() * weights).sum(1, keepdim=True), (hued * weights).sum(1, keepdim=True)
    torch.testing.assert_close(luma_after[keep], luma_before[keep], atol=1e-2, rtol=0)
    assert float((hued - x.float()).abs().max()) > 1.0


def test_normalisation_folded_into_the_colour_matrix_equals_normalising_after() -> None:
    x = torch.randint(0, 256, (8, 3, 16, 20), dtype=torch.uint8)
    norm = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    strong = BATCH_AUGMENTATIONS["strong"]()
    pixels = strong(x, torch.Generator().manual_seed(7))
    folded = strong(x, torch.Generator().manual_seed(7), norm)
    torch.testing.assert_close(folded, norm(pixels), atol=1e-5, rtol=0)


def test_image_batches_gather_normalise_and_repeat_per_epoch() -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(10, 6, 8, 3), dtype=np.uint8)
    rows = np.array([0, 2, 4, 6, 8])
    tensors = {"meta": torch.arange(5.0)[:, None], "target": torch.arange(5)}
    norm = Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

    def batches(augment: BatchAugment | None) -> ImageBatches:
        sampler = EpochSampler(5, shuffle=True, seed=0)
        return ImageBatches(images, rows, tensors, [f"i{r}" for r in rows], 4, sampler, norm, augment)

    plain = list(batches(None))
    assert [len(b["target"]) for b in plain] == [4, 1]
    for batch in plain:
        for k, image_id in enumerate(batch["image_id"]):
            row = int(image_id[1:])
            expected = norm(torch.from_numpy(images[row]).permute(2, 0, 1))
            torch.testing.assert_close(batch["image"][k], expected)
            assert int(batch["target"][k]) == row // 2
    augmented = batches(BatchAugment(flips=True))
    first = [b["image"] for b in augmented]
    assert all(torch.equal(a, b) for a, b in zip(first, (b["image"] for b in augmented), strict=True))
