"""Torch dataset over the cached image array that yields dict samples ``{"image", "meta", "target", "image_id"}``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

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


class BatchAugment:
    """The augmentation presets applied to a whole uint8 batch (N, 3, H, W) at once, no per-image Python.

    Flips by masks on the uint8 tensor; then, in float, one ``affine_grid`` / ``grid_sample`` call for
    every image's rotation and scaling (zero fill, as torchvision's RandomAffine) and per-image colour
    factors (brightness, contrast, saturation, and a hue rotation in YIQ space), in a fixed order where
    torchvision draws one. Returns float pixels in [0, 255]; the caller normalises the batch.
    """

    def __init__(
        self,
        flips: bool = True,
        degrees: float = 0.0,
        scale: tuple[float, float] = (1.0, 1.0),
        jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
    ) -> None:
        self.flips, self.degrees, self.scale, self.jitter = flips, degrees, scale, jitter

    def __call__(self, x: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        n = len(x)
        if self.flips:
            for dim in (3, 2):
                flip = torch.rand(n, generator=rng) < 0.5
                x = torch.where(flip[:, None, None, None], x.flip(dim), x)
        y = x.float()
        if self.degrees or self.scale != (1.0, 1.0):
            y = self._affine(y, rng)
        if any(self.jitter):
            y = self._colour(y, rng)
        return y

    def _affine(self, y: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        n = len(y)
        angle = (torch.rand(n, generator=rng) * 2 - 1) * self.degrees * torch.pi / 180
        low, high = self.scale
        s = low + torch.rand(n, generator=rng) * (high - low)
        cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        grid = torch.nn.functional.affine_grid(theta, list(y.shape), align_corners=False)
        return torch.nn.functional.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _colour(self, y: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        n = len(y)
        brightness, contrast, saturation, hue = self.jitter

        def factor(spread: float) -> torch.Tensor:
            return (1 + (torch.rand(n, generator=rng) * 2 - 1) * spread).view(n, 1, 1, 1)

        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        y = y * factor(brightness)
        gray_mean = (y * weights).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        y = (y - gray_mean) * factor(contrast) + gray_mean
        gray = (y * weights).sum(1, keepdim=True)
        y = (y - gray) * factor(saturation) + gray
        if hue:
            y = _hue_rotate(y, (torch.rand(n, generator=rng) * 2 - 1) * hue * 2 * torch.pi)
        return y.clamp_(0, 255)


_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue_rotate(y: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate each image's hue by ``angle`` (radians): a rotation of the chroma plane in YIQ space."""
    n = len(y)
    rot = torch.zeros(n, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
    matrix = torch.linalg.inv(_YIQ) @ rot @ _YIQ  # (n, 3, 3): RGB -> YIQ, rotate, back
    return torch.einsum("nij,njhw->nihw", matrix, y)


#: ``TrainConfig.augment`` presets as batch augmentations (the same ranges as :func:`build_augmentation`).
BATCH_AUGMENTATIONS: Mapping[str, Callable[[], BatchAugment | None]] = MappingProxyType(
    {
        "none": lambda: None,
        "light": lambda: BatchAugment(flips=True),
        "strong": lambda: BatchAugment(flips=True, degrees=30, scale=(0.9, 1.1), jitter=(0.2, 0.2, 0.2, 0.02)),
    }
)
