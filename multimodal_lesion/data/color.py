"""Colour constancy: each image's illuminant estimated and divided out before any model sees it.

Dermoscopes differ in light source, white balance and sensor, so the same lesion looks warmer,
cooler or darker from one clinic to the next. Shades of Gray (Finlayson & Trezzi, 2004; the
normalisation of the ISIC challenge winners, Gessert et al.) estimates the illuminant of each
channel as the Minkowski p-norm mean of its pixels, ``e_c = mean(I_c ** p) ** (1 / p)`` (p = 1 is
Gray World, p -> inf is max-RGB), and scales each channel by ``mean(e) / e_c``: the grey point is
kept, the cast is removed. Saturated pixels (any channel at or above :data:`SATURATED`) carry no
colour information and are left out of the estimate; the result is clipped to [0, 255].

One :class:`ColorConstancy` (from ``data.color_constancy``, ``_p`` and ``_gamma``) is applied to the
cached images of training, evaluation, explanation and the embedding / maps caches, and to every
image a run predicts, so a model never sees the two kinds of pixels mixed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from ..config import DataConfig

#: A pixel with any channel at or above this is saturated: left out of the illuminant estimate.
SATURATED = 250


def shades_of_gray(images: np.ndarray, p: float = 6.0, gamma: float = 1.0) -> np.ndarray:
    """Shades-of-Gray colour constancy of uint8 images (H, W, 3) or (N, H, W, 3); uint8 of the same shape.

    ``gamma`` != 1 estimates and corrects in the linearised image ``I ** gamma`` (with pixels in [0, 1]),
    then re-applies ``1 / gamma``. An image whose every pixel is saturated or black is returned as it is.
    """
    batch = np.asarray(images)
    single = batch.ndim == 3
    x = batch[None] if single else batch
    linear = (x.astype(np.float32) / 255.0) ** np.float32(gamma)
    unsaturated = (x < SATURATED).all(axis=-1, keepdims=True)  # (N, H, W, 1)
    count = unsaturated.sum(axis=(1, 2))  # (N, 1)
    power = (np.where(unsaturated, linear, 0.0) ** p).sum(axis=(1, 2)) / np.maximum(count, 1)
    illuminant = power ** (1.0 / p)  # (N, 3)
    grey = illuminant.mean(axis=1, keepdims=True)
    usable = (count > 0) & (illuminant > 0).all(axis=1, keepdims=True)
    gains = np.where(usable, grey / np.where(illuminant > 0, illuminant, 1.0), 1.0)  # (N, 3)
    corrected = np.clip(linear * gains[:, None, None, :], 0.0, 1.0) ** (1.0 / gamma)
    out = np.rint(corrected * 255.0).astype(np.uint8)
    return out[0] if single else out


@dataclass(frozen=True)
class ColorConstancy:
    """The configured colour constancy (``data.color_constancy``, ``_p``, ``_gamma``): applies it and names it."""

    method: str = "none"
    p: float = 6.0
    gamma: float = 1.0

    @property
    def active(self) -> bool:
        return self.method != "none"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (H, W, 3) or (N, H, W, 3) corrected; unchanged (the same array) when ``none``."""
        return COLOR_CONSTANCY[self.method](images, self)

    def key(self) -> dict[str, object]:
        """What a cache keyed by these pixels adds to its key: nothing when ``none`` (old caches stay valid)."""
        if not self.active:
            return {}
        return {"color_constancy": self.method, "color_constancy_p": self.p, "color_constancy_gamma": self.gamma}


#: The default: images as they are.
NO_COLOR_CONSTANCY = ColorConstancy()

#: ``data.color_constancy`` methods by name.
COLOR_CONSTANCY: Mapping[str, Callable[[np.ndarray, ColorConstancy], np.ndarray]] = MappingProxyType(
    {
        "none": lambda images, _: images,
        "shades_of_gray": lambda images, c: shades_of_gray(images, c.p, c.gamma),
    }
)


def color_constancy_of(data: DataConfig) -> ColorConstancy:
    """The :class:`ColorConstancy` a data config asks for."""
    return ColorConstancy(data.color_constancy, float(data.color_constancy_p), float(data.color_constancy_gamma))


__all__ = [
    "COLOR_CONSTANCY",
    "NO_COLOR_CONSTANCY",
    "SATURATED",
    "ColorConstancy",
    "color_constancy_of",
    "shades_of_gray",
]
