"""Image panels of a case page (its maps over the image, titles, colour bars) composed with Pillow and
OpenCV instead of matplotlib.

A case page shows three figures made of pictures alone (the CAM overlays, the map with and without the
metadata, the map at a few ages). Through matplotlib each cost ~0.2 s (axes, resampling, text layout,
the colour bar's axis); composed here from arrays they cost a few milliseconds, which is what lets a
long report's figures keep pace with its computation. The text uses matplotlib's own DejaVu Sans, so
the panels read like the report's plots.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..io import atomic_write
from .figures import PNG_LEVEL

SIDE = 320  # the longer side of an image panel, in pixels
GAP, MARGIN, TITLE, BAR = 12, 8, 22, 14  # pixels between panels, around them, of a title line, a bar's width
WHITE, INK = (255, 255, 255), (30, 30, 30)


@functools.lru_cache(maxsize=4)
def font(size: int = 13) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """matplotlib's DejaVu Sans at ``size`` pixels (Pillow's own font if it cannot be found)."""
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except (OSError, ValueError, ImportError):
        return ImageFont.load_default()


def colours(name: str, values: np.ndarray) -> np.ndarray:
    """uint8 RGB of ``values`` in [0, 1] under matplotlib's colour map ``name`` (a table look-up)."""
    from matplotlib import colormaps

    table = (colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    return table[np.clip(np.round(values * 255), 0, 255).astype(np.int64)]


def scaled(picture: np.ndarray, side: int = SIDE) -> np.ndarray:
    """``picture`` (H, W, 3) resized so that its longer side is ``side`` pixels (bilinear)."""
    h, w = picture.shape[:2]
    factor = side / max(h, w)
    return cv2.resize(picture, (round(w * factor), round(h * factor)), interpolation=cv2.INTER_LINEAR)


def with_contour(picture: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """``picture`` with the lesion mask's outline drawn in white (nothing without a mask or an outline)."""
    if mask is None or not mask.any() or mask.all():
        return picture
    h, w = picture.shape[:2]
    resized = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    outlines, _ = cv2.findContours(resized, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    out = np.ascontiguousarray(picture.copy())
    cv2.drawContours(out, outlines, -1, WHITE, 2, lineType=cv2.LINE_AA)
    return out


@dataclass(frozen=True)
class Bar:
    """A vertical colour bar: its colour map, the values at its bottom and top, and its label."""

    cmap: str
    low: float
    high: float
    label: str

    def picture(self, height: int) -> np.ndarray:
        ramp = np.linspace(1, 0, height)[:, None].repeat(BAR, 1)
        return colours(self.cmap, ramp)


@dataclass(frozen=True)
class Panel:
    """One picture with its title, and optionally a colour bar to its right."""

    picture: np.ndarray
    title: str = ""
    bar: Bar | None = None


def _text_width(draw: ImageDraw.ImageDraw, text: str, size: int) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font(size))
    return int(right - left)


def _bar_width(draw: ImageDraw.ImageDraw, bar: Bar) -> int:
    ticks = max(_text_width(draw, f"{v:g}", 11) for v in (bar.low, bar.high, (bar.low + bar.high) / 2))
    return GAP // 2 + max(BAR + 5 + ticks, _text_width(draw, bar.label, 10))


def compose(panels: Sequence[Panel], path: str | Path, heading: str = "") -> Path:
    """Write ``panels`` side by side (each titled, a bar where it has one) under ``heading`` as a PNG."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    height = max(p.picture.shape[0] for p in panels)
    widths = [p.picture.shape[1] + (_bar_width(probe, p.bar) if p.bar else 0) for p in panels]
    top = MARGIN + (TITLE if heading else 0) + (TITLE if any(p.title for p in panels) else 0)
    width = max(2 * MARGIN + sum(widths) + GAP * (len(panels) - 1), _text_width(probe, heading, 13) + 2 * MARGIN)
    canvas = Image.new("RGB", (width, top + height + MARGIN + 6), WHITE)
    draw = ImageDraw.Draw(canvas)
    if heading:
        draw.text((width // 2, MARGIN), heading, fill=INK, font=font(13), anchor="mt")
    x = MARGIN
    for panel, w in zip(panels, widths, strict=True):
        ph, pw = panel.picture.shape[:2]
        if panel.title:
            draw.text((x + pw // 2, top - TITLE + 4), panel.title, fill=INK, font=font(12), anchor="mt")
        canvas.paste(Image.fromarray(np.ascontiguousarray(panel.picture)), (x, top))
        if panel.bar is not None:
            _draw_bar(canvas, draw, panel.bar, x + pw + GAP // 2, top, ph)
        x += w + GAP
    return save_png(canvas, path)


def save_png(picture: Image.Image, path: str | Path) -> Path:
    """Write ``picture`` as a PNG atomically, at the reports' zlib level."""
    with atomic_write(path, "wb") as fh:
        picture.save(fh, format="PNG", compress_level=PNG_LEVEL)
    return Path(path)


def _draw_bar(canvas: Image.Image, draw: ImageDraw.ImageDraw, bar: Bar, x: int, top: int, height: int) -> None:
    """The bar beside a panel: the ramp, ticks at its ends and middle, the label above it."""
    inner = max(height - 34, 20)
    y0 = top + 20
    canvas.paste(Image.fromarray(bar.picture(inner)), (x, y0))
    draw.rectangle((x, y0, x + BAR - 1, y0 + inner - 1), outline=INK)
    draw.text((x, y0 - 8), bar.label, fill=INK, font=font(10), anchor="lb")
    for value, y in ((bar.high, y0), ((bar.low + bar.high) / 2, y0 + inner // 2), (bar.low, y0 + inner - 1)):
        draw.line((x + BAR, y, x + BAR + 3, y), fill=INK)
        draw.text((x + BAR + 5, y), f"{value:g}", fill=INK, font=font(11), anchor="lm")


__all__ = ["Bar", "Panel", "colours", "compose", "font", "save_png", "scaled", "with_contour"]
