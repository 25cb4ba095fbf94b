"""Torch dataset over the cached image array that yields dict samples ``{"image", "meta", "target", "image_id"}``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

Transform = Callable[[torch.Tensor], torch.Tensor]


def _augmentations() -> dict[str, Callable[[], Transform | None]]:
    """Augmentation presets by name (built lazily: torchvision is imported on first use)."""
    from torchvision.transforms import v2

    return {
        "none": lambda: None,
        "light": lambda: v2.Compose([v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]),
        "strong": lambda: v2.Compose(
            [
                v2.RandomHorizontalFlip(),
                v2.RandomVerticalFlip(),
                v2.RandomAffine(degrees=30, scale=(0.9, 1.1)),
                v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
            ]
        ),
    }


def build_augmentation(name: str) -> Transform | None:
    """The uint8-tensor augmentation named in ``TrainConfig.augment`` (none, light, strong)."""
    from ..errors import ConfigError

    presets = _augmentations()
    if name not in presets:
        raise ConfigError(f"train.augment: unknown value {name!r} (valid: {', '.join(presets)})")
    return presets[name]()


class Normalize:
    """uint8 CHW (or NCHW) tensor -> float tensor normalised with the backbone's mean and std."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.scale = 1.0 / (255.0 * torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))
        self.shift = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / torch.tensor(std).view(-1, 1, 1)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.to(torch.float32, copy=True).mul_(self.scale).sub_(self.shift)


class NormalizingCollate:
    """Stack uint8 samples into a batch and normalise it in one vectorised step (not per image)."""

    def __init__(self, normalize: Normalize) -> None:
        self.normalize = normalize

    def __call__(self, samples: list[dict]) -> dict:
        batch = torch.utils.data.default_collate(samples)
        batch["image"] = self.normalize(batch["image"])
        return batch


class LesionDataset(Dataset):
    """Images from a cached uint8 array (N, H, W, 3) with encoded metadata and targets.

    ``indices`` selects the rows of the arrays that belong to this split. Samples carry the
    (augmented) uint8 image; :class:`NormalizingCollate` normalises whole batches.
    """

    def __init__(
        self,
        images: np.ndarray,
        meta: np.ndarray,
        targets: np.ndarray,
        image_ids: Sequence[str],
        indices: Sequence[int] | np.ndarray,
        augment: Transform | None = None,
    ) -> None:
        self.images, self.meta, self.targets = images, meta, targets
        self.image_ids, self.indices = list(image_ids), np.asarray(indices, dtype=np.int64)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        j = int(self.indices[i])
        image = torch.from_numpy(np.array(self.images[j])).permute(2, 0, 1)
        if self.augment is not None:
            image = self.augment(image)
        return {
            "image": image,
            "meta": torch.from_numpy(self.meta[j]),
            "target": torch.tensor(int(self.targets[j])),
            "image_id": self.image_ids[j],
        }
