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


class LesionTorchDataset(Dataset):
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

    Two arithmetic passes over the batch, whatever the preset:

    - **geometry**: one ``affine_grid`` / ``grid_sample`` call for every image's flips, rotation and
      scaling (a flip is a sign in the image's affine matrix; zero fill, as torchvision's RandomAffine).
      Without rotation or scaling, flips are masks on the uint8 tensor and nothing is resampled;
    - **colour**: brightness, contrast and saturation factors and a hue rotation in YIQ space are each
      linear in RGB, so an image's whole jitter is one 3x3 matrix and an offset (contrast blends with the
      image's mean grey, a per-image constant), applied to the batch in one batched matrix multiply. The
      normalisation, when given, is folded into the same matrix: it costs nothing extra.

    The jitter is torchvision's in a fixed order (brightness, contrast, saturation, hue) where torchvision
    draws one, and clamps once at the end (torchvision clamps after each step: the two differ only on
    pixels pushed out of range midway).
    """

    def __init__(
        self,
        flips: bool = True,
        degrees: float = 0.0,
        scale: tuple[float, float] = (1.0, 1.0),
        jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0),
    ) -> None:
        self.flips, self.degrees, self.scale, self.jitter = flips, degrees, scale, jitter

    def __call__(self, x: torch.Tensor, rng: torch.Generator, normalize: Normalize | None = None) -> torch.Tensor:
        """Augmented float batch: pixels in [0, 255], or the model's input when ``normalize`` is given."""
        n = len(x)
        signs = torch.where(torch.rand(n, 2, generator=rng) < 0.5, -1.0, 1.0) if self.flips else torch.ones(n, 2)
        if self.degrees or self.scale != (1.0, 1.0):
            y = self._affine(x.float(), signs, rng)
        else:
            for axis, dim in ((0, 3), (1, 2)):
                x = torch.where((signs[:, axis] < 0)[:, None, None, None], x.flip(dim), x)
            y = x.float()
        if not any(self.jitter):
            return normalize(y) if normalize is not None else y
        matrix, offset = self._colour(y, rng)
        low, high = torch.zeros(3, 1), torch.full((3, 1), 255.0)
        if normalize is not None:  # z = scale * y - shift, folded into the colour matrix and the clamp
            scale, shift = normalize.scale.view(1, 3, 1), normalize.shift.view(1, 3, 1)
            matrix, offset = scale * matrix, scale * offset - shift
            low, high = low * scale[0] - shift[0], high * scale[0] - shift[0]
        out = torch.baddbmm(offset, matrix, y.reshape(n, 3, -1))
        return torch.max(torch.min(out, high), low).view_as(y)

    def _affine(self, y: torch.Tensor, signs: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        n = len(y)
        angle = (torch.rand(n, generator=rng) * 2 - 1) * self.degrees * torch.pi / 180
        low, high = self.scale
        s = low + torch.rand(n, generator=rng) * (high - low)
        cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
        theta[:, :, :2] *= signs[:, None, :]  # sample at (+-x, +-y): the flip, in the same resampling
        grid = torch.nn.functional.affine_grid(theta, list(y.shape), align_corners=False)
        return torch.nn.functional.grid_sample(y, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _colour(self, y: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Each image's jitter as ``matrix`` (N, 3, 3) and ``offset`` (N, 3, 1): out = matrix @ rgb + offset."""
        n = len(y)
        brightness, contrast, saturation, hue = self.jitter

        def factor(spread: float) -> torch.Tensor:
            return (1 + (torch.rand(n, generator=rng) * 2 - 1) * spread).view(n, 1, 1)

        b, c, s = factor(brightness), factor(contrast), factor(saturation)
        grey = _YIQ[0].view(1, 3)  # luma weights; they sum to 1, so every matrix below keeps grey grey
        mean_grey = (y.mean((2, 3)) @ grey.T).view(n, 1, 1)  # the image's mean grey before brightness
        eye = torch.eye(3).expand(n, 3, 3)
        sat = s * eye + (1 - s) * torch.ones(3, 1) @ grey  # blend with each pixel's grey
        if hue:
            sat = _hue_matrix((torch.rand(n, generator=rng) * 2 - 1) * hue * 2 * torch.pi) @ sat
        offset = sat @ ((1 - c) * b * mean_grey).expand(n, 3, 1)  # contrast: blend with the (brightened) mean grey
        return sat * (b * c), offset


_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue_matrix(angle: torch.Tensor) -> torch.Tensor:
    """Per-image RGB matrices (N, 3, 3) rotating the hue by ``angle`` (radians): the chroma plane of YIQ."""
    n = len(angle)
    rot = torch.zeros(n, 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = angle.cos(), -angle.sin(), angle.sin(), angle.cos()
    return torch.linalg.inv(_YIQ) @ rot @ _YIQ  # RGB -> YIQ, rotate, back


#: ``TrainConfig.augment`` presets as batch augmentations (the same ranges as :func:`build_augmentation`).
BATCH_AUGMENTATIONS: Mapping[str, Callable[[], BatchAugment | None]] = MappingProxyType(
    {
        "none": lambda: None,
        "light": lambda: BatchAugment(flips=True),
        "strong": lambda: BatchAugment(flips=True, degrees=30, scale=(0.9, 1.1), jitter=(0.2, 0.2, 0.2, 0.02)),
    }
)
