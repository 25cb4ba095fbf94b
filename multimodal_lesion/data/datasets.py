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
        "acquisition": lambda: PerImage(AcquisitionAugment()),  # no torchvision equivalent: the batch one per image
    }


def build_augmentation(name: str) -> Transform | None:
    """The uint8-tensor augmentation named in ``TrainConfig.augment`` (none, light, strong, acquisition)."""
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
        translate: float = 0.0,
    ) -> None:
        self.flips, self.degrees, self.scale, self.jitter = flips, degrees, scale, jitter
        self.translate = translate  # largest shift of the framing, a share of the half-width / half-height

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
        if self.translate:
            theta[:, :, 2] = (torch.rand(n, 2, generator=rng) * 2 - 1) * self.translate
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


class AcquisitionAugment(BatchAugment):
    """What changes between clinics and dermoscopes, drawn per image on a whole batch (``augment = "acquisition"``).

    On top of the strong preset's flips, rotation and colour jitter, with a wider scale and a shifted
    framing: thin dark curves of hair, a per-channel colour cast and an illumination gamma, the
    dermoscope's vignette and black corners (the dark outside of a round field of view), defocus blur
    and sensor noise. Every step is a tensor operation on the batch; the draws come from ``rng``.
    """

    def __init__(
        self,
        cast: float = 0.08,  # sd of the log gain of each channel (a colour cast)
        gamma: tuple[float, float] = (0.8, 1.25),  # illumination: pixels ** gamma (in [0, 1])
        blur: tuple[float, float] = (0.5, 1.5),  # sigma (pixels) of the defocus blur, when drawn
        noise: float = 6.0,  # largest sd of the Gaussian sensor noise (pixel values)
        chances: tuple[float, float, float, float] = (0.3, 0.5, 0.3, 0.3),  # hair, vignette, black corners, blur
        max_hairs: int = 12,
    ) -> None:
        super().__init__(flips=True, degrees=30, scale=(0.8, 1.25), jitter=(0.2, 0.2, 0.2, 0.02), translate=0.1)
        self.cast, self.gamma, self.blur, self.noise = cast, gamma, blur, noise
        self.chances, self.max_hairs = chances, max_hairs

    def __call__(self, x: torch.Tensor, rng: torch.Generator, normalize: Normalize | None = None) -> torch.Tensor:
        """Augmented float batch: pixels in [0, 255], or the model's input when ``normalize`` is given."""
        y = super().__call__(x, rng)
        n = len(y)
        p_hair, p_vignette, p_corners, p_blur = self.chances
        y = self._hair(y, torch.rand(n, generator=rng) < p_hair, rng)
        gains = torch.exp(torch.randn(n, 3, 1, 1, generator=rng) * self.cast)
        low, high = self.gamma
        gamma = torch.exp(torch.empty(n, 1, 1, 1).uniform_(float(np.log(low)), float(np.log(high)), generator=rng))
        y = 255.0 * ((y / 255.0).clamp(0, 1) ** gamma) * gains
        y = y * self._field_of_view(
            y, torch.rand(n, generator=rng) < p_vignette, torch.rand(n, generator=rng) < p_corners, rng
        )
        y = self._defocus(y, torch.rand(n, generator=rng) < p_blur, rng)
        y = y + torch.randn(y.shape, generator=rng) * (torch.rand(n, 1, 1, 1, generator=rng) * self.noise)
        y = y.clamp(0, 255)
        return normalize(y) if normalize is not None else y

    def _hair(self, y: torch.Tensor, drawn: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """Up to ``max_hairs`` thin dark quadratic Bezier curves (1 pixel wide) on the ``drawn`` images."""
        n, _, h, w = y.shape
        k, m = self.max_hairs, 2 * (h + w)
        count = torch.randint(1, k + 1, (n, 1), generator=rng)
        active = (torch.arange(k)[None] < count) & drawn[:, None]  # (N, K)
        ends = torch.rand(n, k, 3, 2, generator=rng) * 1.2 - 0.1  # three control points per curve, in [-0.1, 1.1]
        t = torch.linspace(0, 1, m).view(1, 1, m, 1)
        points = (1 - t) ** 2 * ends[:, :, :1] + 2 * (1 - t) * t * ends[:, :, 1:2] + t**2 * ends[:, :, 2:]
        col = (points[..., 0] * (w - 1)).round().long()
        row = (points[..., 1] * (h - 1)).round().long()
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h) & active[:, :, None]
        index = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).view(n, -1)
        mask = torch.zeros(n, h * w).scatter_reduce(1, index, inside.view(n, -1).float(), reduce="amax")
        mask = mask.view(n, 1, h, w)
        opacity = 0.6 + 0.35 * torch.rand(n, 1, 1, 1, generator=rng)
        shade = (10 + 50 * torch.rand(n, 1, 1, 1, generator=rng)) * torch.tensor([1.0, 0.8, 0.7]).view(1, 3, 1, 1)
        alpha = mask * opacity
        return y * (1 - alpha) + shade * alpha

    def _field_of_view(
        self, y: torch.Tensor, vignette: torch.Tensor, corners: torch.Tensor, rng: torch.Generator
    ) -> torch.Tensor:
        """A factor (N, 1, H, W): a radial falloff (vignette) and zero outside a round field of view (corners)."""
        n, _, h, w = y.shape
        side = max(h, w)
        v = torch.linspace(-1, 1, h).view(1, h, 1) * (h / side)
        u = torch.linspace(-1, 1, w).view(1, 1, w) * (w / side)
        r = torch.sqrt(u**2 + v**2)  # (1, H, W), 1 at the middle of the longer side
        strength = torch.where(vignette, 0.2 + 0.4 * torch.rand(n, generator=rng), 0.0).view(n, 1, 1)
        radius = torch.where(corners, 0.9 + 0.3 * torch.rand(n, generator=rng), torch.inf).view(n, 1, 1)
        factor = (1 - strength * r**2).clamp(min=0) * (r <= radius).float()
        return factor[:, None]

    def _defocus(self, y: torch.Tensor, drawn: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """A separable Gaussian blur of the ``drawn`` images (sigma in ``blur``); the others pass unchanged."""
        n, c, h, w = y.shape
        low, high = self.blur
        sigma = torch.where(drawn, low + (high - low) * torch.rand(n, generator=rng), 0.0)
        radius = int(np.ceil(2 * high))
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-(offsets[None] ** 2) / (2 * sigma[:, None].clamp(min=1e-3) ** 2))
        kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N * C, K)
        flat = torch.nn.functional.pad(y.reshape(1, n * c, h, w), (radius, radius, radius, radius), mode="reflect")
        flat = torch.nn.functional.conv2d(flat, kernel.view(n * c, 1, 1, -1), groups=n * c)
        flat = torch.nn.functional.conv2d(flat, kernel.view(n * c, 1, -1, 1), groups=n * c)
        return flat.view(n, c, h, w)


class PerImage:
    """A batch augmentation as a per-image uint8 transform (the DataLoader path): one image, a fresh generator.

    The generator is seeded from torch's global one, which the engine seeds (and DataLoader workers re-seed).
    """

    def __init__(self, augment: BatchAugment) -> None:
        self.augment = augment

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        rng = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        return self.augment(image[None], rng)[0].round().to(torch.uint8)


#: ``TrainConfig.augment`` presets as batch augmentations (the same ranges as :func:`build_augmentation`).
BATCH_AUGMENTATIONS: Mapping[str, Callable[[], BatchAugment | None]] = MappingProxyType(
    {
        "none": lambda: None,
        "light": lambda: BatchAugment(flips=True),
        "strong": lambda: BatchAugment(flips=True, degrees=30, scale=(0.9, 1.1), jitter=(0.2, 0.2, 0.2, 0.02)),
        "acquisition": AcquisitionAugment,
    }
)
