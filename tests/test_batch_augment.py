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
