"""Synthetic HAM10000: the embedded default dataset, with a planted image-versus-metadata structure.

``make_synthetic(out, n, seed)`` writes the official layout (``HAM10000_metadata.csv``,
``HAM10000_images_part_1/`` and ``_part_2/`` with 200x150 RGB JPEGs, lesion masks in
``HAM10000_segmentations_lesion_tschandl/``) plus ``synthetic.json`` (seed, n, ``PLANTED``), so the
whole pipeline runs without a download and its explanations can be checked against a known truth.

What is planted (also in :data:`PLANTED`):

* **Metadata** is drawn per lesion from the real HAM10000 per-class frequency tables of age, sex,
  localization and dx_type below (counted over the 10,015 real images), missing values included.
  Every image of a lesion shares its patient's metadata, as in the real data.
* **Two ambiguous pairs**: ``mel``/``nv`` and ``akiec``/``bkl``. The two classes of a pair are drawn
  from the *same* image distribution (one "look"), so no image model can tell them apart beyond
  chance.
* **Age resolves the pairs**: within a pair, the real age histogram of each class is reweighted by a
  logistic likelihood around a threshold (``mel`` old / ``nv`` young at 47.5 years, ``akiec`` old /
  ``bkl`` young at 62.5 years, scale 2.5 years), so age separates the pair far more sharply than in
  the real data (AUROC of age 0.99 for mel vs nv and 0.97 for akiec vs bkl, against 0.75 and 0.54
  in the real data). Missing ages keep the real missing rate.
  Sex and localization keep their real, weakly informative, distributions: age is *the* planted
  patient feature, and SHAP should rank it first.
* **The other classes look distinct**: ``bcc`` (pink, pearly, red branching vessels, blue-grey
  nests), ``df`` (small brown ring around a white central scar), ``vasc`` (red-purple with dark red
  lacunae), besides the two pair looks ``pigmented`` (dark brown, pigment network, darker centre)
  and ``keratotic`` (grey-tan, scaly speckle with white keratin flecks, irregular border). Image
  features therefore matter too: metadata alone cannot separate bcc / df / vasc.
* **The class evidence lies inside the blob**: background skin tone, shading, hair, vignette,
  dermoscope corners and noise are drawn independently of the class, so Grad-CAM energy should fall
  inside the lesion mask (the mask is exactly the blob).
* **Lesions are sized like the real ones**: the blob covers a median 24% of the image (mean 26%,
  10th-90th percentile 13-43%, n=1000) against a median 24% (7-61%) for 400 sampled real HAM10000
  masks; each look keeps its own mean size (``df`` smallest).
* **Multi-image lesions**: images per lesion follow the real per-class counts (26% of real lesions
  have more than one image; ~30% here, as the flattened priors favour mel, whose lesions often have
  several); the images of a lesion are the same blob (shape, colour, texture) seen with
  a small shift, rotation, scale and new artefacts.
* **Class priors** are the real image counts flattened as ``count ** 0.75`` (nv 54%, df 2.5%) so that
  ``n=1000`` holds ~25 images of the rarest class; every class gets at least one image when
  ``n >= 7``. Counts per class are allocated exactly (largest remainder), not sampled.

Measured (n=1000, seed 0, lesion-grouped 5-fold logistic regression, balanced accuracy): colour and
texture statistics inside the mask 0.71 image-only, 0.94 with the patient features, 0.41 patient
features only; frozen ImageNet EfficientNet-Lite0 embeddings (224x168, flip-averaged, PCA to 32)
0.71 image-only and 0.92 with the patient features.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..errors import ConfigError
from ..io import atomic_write, read_json, write_json
from .constants import CLASSES, MASK_DIR, MASK_SUFFIX, METADATA_COLUMNS, METADATA_FILE

#: Bump when the generator's output changes, so a cached dataset of an older version is rebuilt.
GENERATOR_VERSION = 2

WIDTH, HEIGHT = 200, 150
PROVENANCE_FILE = "synthetic.json"
IMAGE_DIRS = ("HAM10000_images_part_1", "HAM10000_images_part_2")

# ---- frequency tables counted once over the real HAM10000_metadata.csv (10,015 images) ----------

#: Real image counts per class; the priors are these flattened by ``PRIOR_EXPONENT``.
REAL_CLASS_COUNTS: dict[str, int] = {
    "akiec": 327,
    "bcc": 514,
    "bkl": 1099,
    "df": 115,
    "mel": 1113,
    "nv": 6705,
    "vasc": 142,
}
PRIOR_EXPONENT = 0.75

#: Ages are multiples of five in HAM10000.
AGE_GRID: tuple[int, ...] = tuple(range(0, 90, 5))
AGE_COUNTS: dict[str, tuple[int, ...]] = {
    "akiec": (0, 0, 0, 0, 0, 0, 1, 0, 9, 10, 19, 27, 58, 38, 56, 47, 37, 25),
    "bcc": (0, 0, 0, 0, 1, 3, 4, 5, 23, 26, 27, 25, 35, 79, 85, 76, 73, 52),
    "bkl": (5, 1, 0, 0, 0, 0, 6, 24, 46, 59, 87, 95, 131, 108, 183, 153, 98, 93),
    "df": (0, 0, 0, 0, 0, 2, 4, 12, 9, 14, 18, 13, 9, 18, 4, 9, 3, 0),
    "mel": (0, 1, 0, 0, 6, 16, 34, 36, 49, 74, 96, 142, 106, 133, 166, 91, 85, 76),
    "nv": (30, 81, 39, 73, 158, 221, 410, 668, 846, 1100, 928, 686, 454, 351, 248, 231, 97, 39),
    "vasc": (4, 3, 2, 4, 4, 5, 5, 8, 3, 16, 12, 21, 10, 4, 14, 11, 11, 5),
}
#: Images whose age is empty.
AGE_MISSING: dict[str, int] = {"akiec": 0, "bcc": 0, "bkl": 10, "df": 0, "mel": 2, "nv": 45, "vasc": 0}
SEX_COUNTS: dict[str, dict[str, int]] = {
    "akiec": {"female": 106, "male": 221},
    "bcc": {"female": 197, "male": 317},
    "bkl": {"female": 463, "male": 626, "unknown": 10},
    "df": {"female": 52, "male": 63},
    "mel": {"female": 424, "male": 689},
    "nv": {"female": 3237, "male": 3421, "unknown": 47},
    "vasc": {"female": 73, "male": 69},
}
LOCALIZATION_COUNTS: dict[str, dict[str, int]] = {
    "akiec": {
        "face": 113,
        "lower extremity": 65,
        "upper extremity": 62,
        "back": 29,
        "scalp": 14,
        "hand": 13,
        "chest": 12,
        "neck": 10,
        "abdomen": 5,
        "ear": 3,
        "trunk": 1,
    },
    "bcc": {
        "back": 186,
        "face": 101,
        "lower extremity": 58,
        "upper extremity": 49,
        "chest": 47,
        "scalp": 19,
        "abdomen": 18,
        "neck": 14,
        "trunk": 11,
        "unknown": 5,
        "foot": 4,
        "hand": 2,
    },
    "bkl": {
        "face": 319,
        "back": 202,
        "lower extremity": 174,
        "upper extremity": 104,
        "chest": 74,
        "trunk": 73,
        "abdomen": 42,
        "scalp": 34,
        "neck": 31,
        "unknown": 23,
        "hand": 14,
        "ear": 6,
        "genital": 2,
        "foot": 1,
    },
    "df": {"lower extremity": 82, "upper extremity": 24, "abdomen": 4, "back": 2, "foot": 2, "genital": 1},
    "mel": {
        "back": 324,
        "upper extremity": 213,
        "lower extremity": 192,
        "face": 104,
        "chest": 68,
        "abdomen": 66,
        "trunk": 47,
        "neck": 29,
        "foot": 28,
        "ear": 17,
        "scalp": 14,
        "unknown": 10,
        "hand": 1,
    },
    "nv": {
        "lower extremity": 1479,
        "back": 1427,
        "trunk": 1241,
        "abdomen": 860,
        "upper extremity": 655,
        "foot": 284,
        "chest": 200,
        "unknown": 196,
        "face": 100,
        "neck": 81,
        "hand": 55,
        "genital": 45,
        "scalp": 45,
        "ear": 30,
        "acral": 7,
    },
    "vasc": {
        "trunk": 31,
        "lower extremity": 27,
        "abdomen": 27,
        "back": 22,
        "upper extremity": 11,
        "face": 8,
        "chest": 6,
        "hand": 5,
        "neck": 3,
        "scalp": 2,
    },
}
DX_TYPE_COUNTS: dict[str, dict[str, int]] = {
    "akiec": {"histo": 327},
    "bcc": {"histo": 514},
    "bkl": {"histo": 766, "consensus": 264, "confocal": 69},
    "df": {"consensus": 60, "histo": 55},
    "mel": {"histo": 1113},
    "nv": {"follow_up": 3704, "histo": 2498, "consensus": 503},
    "vasc": {"consensus": 75, "histo": 67},
}
#: Lesions with 1, 2, ... 6 images, per class.
IMAGES_PER_LESION: dict[str, tuple[int, ...]] = {
    "akiec": (151, 57, 18, 2, 0, 0),
    "bcc": (175, 118, 33, 1, 0, 0),
    "bkl": (440, 220, 55, 8, 2, 2),
    "df": (39, 26, 8, 0, 0, 0),
    "mel": (230, 278, 100, 4, 1, 1),
    "nv": (4415, 699, 268, 18, 2, 1),
    "vasc": (64, 25, 8, 1, 0, 0),
}

# ---- the planted structure ----------------------------------------------------------------------

#: Which look (image distribution) each class is drawn from; a look shared by two classes is an
#: ambiguous pair that only metadata can resolve.
VISUAL_GROUP: dict[str, str] = {
    "akiec": "keratotic",
    "bkl": "keratotic",
    "mel": "pigmented",
    "nv": "pigmented",
    "bcc": "bcc",
    "df": "df",
    "vasc": "vasc",
}

#: Planted age likelihood: class -> (threshold in years, +1 older / -1 younger than it).
AGE_PLANT: dict[str, tuple[float, int]] = {"mel": (47.5, +1), "nv": (47.5, -1), "akiec": (62.5, +1), "bkl": (62.5, -1)}
AGE_PLANT_SCALE = 2.5

#: The documented truth that explanations are checked against.
PLANTED: dict[str, object] = {
    "informative_feature": "age",
    "ambiguous_pairs": [["mel", "nv"], ["akiec", "bkl"]],
    "visual_group": VISUAL_GROUP,
    "age_threshold": {"mel": 47.5, "nv": 47.5, "akiec": 62.5, "bkl": 62.5},
    "age_direction": {"mel": "older", "nv": "younger", "akiec": "older", "bkl": "younger"},
    "age_scale_years": AGE_PLANT_SCALE,
    "evidence_region": "lesion mask (the blob); background, hair and vignette are class-independent",
    "uninformative_beyond_real": ["sex", "localization"],
    "class_prior": f"real image counts ** {PRIOR_EXPONENT}, normalised, allocated exactly",
}


@dataclass(frozen=True)
class Look:
    """Class-dependent appearance of a lesion: colour, size, border and texture."""

    colour: tuple[float, float, float]  # mean RGB of the lesion body
    radius: float  # mean blob radius in pixels (image is 200x150)
    irregularity: float  # amplitude of the border's angular harmonics (0 = circle)
    centre_dark: float  # darkening towards the centre (0 = flat)
    texture: str  # key of TEXTURES


#: Log-normal spread of a lesion's radius around its look's mean (clipped to 0.65-1.5x): with the
#: radii above, the blob covers a median 24% of the image (real HAM10000 masks: median 24%,
#: 10th-90th percentile 7-61%, 400 sampled).
RADIUS_SPREAD = 0.22

#: Patient skin tones are drawn uniformly between these two RGB colours (independent of the class).
SKIN_LIGHT, SKIN_DARK = (236.0, 196.0, 176.0), (176.0, 124.0, 94.0)

LOOKS: dict[str, Look] = {
    "pigmented": Look((112, 66, 44), 48, 0.10, 0.35, "network"),
    "keratotic": Look((168, 142, 122), 50, 0.17, 0.0, "scaly"),
    "bcc": Look((218, 150, 160), 43, 0.07, 0.0, "vessels"),
    "df": Look((150, 98, 68), 32, 0.04, 0.0, "scar"),
    "vasc": Look((158, 36, 72), 39, 0.03, 0.1, "lacunae"),
}


# ---- drawing the metadata -----------------------------------------------------------------------


def class_image_counts(n: int) -> dict[str, int]:
    """Images per class for ``n`` images: flattened real priors, largest remainder, >= 1 each if n >= 7."""
    prior = np.array([REAL_CLASS_COUNTS[c] for c in CLASSES], float) ** PRIOR_EXPONENT
    share = prior / prior.sum() * n
    counts = np.floor(share).astype(int)
    counts[np.argsort(-(share - counts), kind="stable")[: n - counts.sum()]] += 1
    while n >= len(CLASSES) and (counts == 0).any():
        counts[np.argmax(counts)] -= 1
        counts[np.argmin(counts)] += 1
    return dict(zip(CLASSES, counts.tolist(), strict=True))


def _pick(rng: np.random.Generator, table: dict[str, int]) -> str:
    """Draw one key of a frequency table with probability proportional to its count."""
    keys = list(table)
    p = np.array([table[k] for k in keys], float)
    return keys[rng.choice(len(keys), p=p / p.sum())]


def age_distribution(dx: str) -> np.ndarray:
    """P(age = AGE_GRID[i] | dx, age known): the real histogram times the planted likelihood."""
    counts = np.array(AGE_COUNTS[dx], float)
    if dx in AGE_PLANT:
        threshold, sign = AGE_PLANT[dx]
        counts = counts / (1.0 + np.exp(-sign * (np.array(AGE_GRID) - threshold) / AGE_PLANT_SCALE))
    return counts / counts.sum()


def _draw_age(rng: np.random.Generator, dx: str) -> float:
    """One age (NaN when missing, at the real missing rate of ``dx``)."""
    if rng.random() < AGE_MISSING[dx] / REAL_CLASS_COUNTS[dx]:
        return float("nan")
    return float(AGE_GRID[rng.choice(len(AGE_GRID), p=age_distribution(dx))])


def _draw_lesions(rng: np.random.Generator, n: int) -> list[dict]:
    """Lesions (class, patient metadata, image count) whose image counts add up to ``n``."""
    lesions = []
    for dx, target in class_image_counts(n).items():
        per_lesion = np.array(IMAGES_PER_LESION[dx], float)
        while target > 0:
            k = min(int(rng.choice(len(per_lesion), p=per_lesion / per_lesion.sum())) + 1, target)
            target -= k
            lesions.append(
                dict(
                    dx=dx,
                    n_images=k,
                    dx_type=_pick(rng, DX_TYPE_COUNTS[dx]),
                    age=_draw_age(rng, dx),
                    sex=_pick(rng, SEX_COUNTS[dx]),
                    localization=_pick(rng, LOCALIZATION_COUNTS[dx]),
                )
            )
    return [lesions[i] for i in rng.permutation(len(lesions))]


def synthetic_metadata(n: int, seed: int) -> pd.DataFrame:
    """The metadata table (official columns, lesion-grouped rows) plus ``lesion_index``/``view``."""
    rng = np.random.default_rng([seed, 0])
    lesions = _draw_lesions(rng, n)
    image_numbers = 24306 + rng.permutation(n)
    rows, k = [], 0
    lesion_numbers = rng.choice(np.arange(10 * len(lesions) + 10), size=len(lesions), replace=False)
    for i, lesion in enumerate(lesions):
        for view in range(lesion["n_images"]):
            rows.append(
                dict(
                    lesion_id=f"HAM_{lesion_numbers[i]:07d}",
                    image_id=f"ISIC_{image_numbers[k]:07d}",
                    dx=lesion["dx"],
                    dx_type=lesion["dx_type"],
                    age=lesion["age"],
                    sex=lesion["sex"],
                    localization=lesion["localization"],
                    lesion_index=i,
                    view=view,
                )
            )
            k += 1
    return pd.DataFrame(rows)


# ---- drawing the images -------------------------------------------------------------------------

_YY, _XX = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
_CENTRE_DIST = np.hypot(_XX - WIDTH / 2, _YY - HEIGHT / 2)  # pixels from the image centre
_VIGNETTE = (np.hypot((_XX - WIDTH / 2) / WIDTH, (_YY - HEIGHT / 2) / HEIGHT) * math.sqrt(2)) ** 2.5
for _constant in (_YY, _XX, _CENTRE_DIST, _VIGNETTE):
    _constant.setflags(write=False)


def _rgb(r: float, g: float, b: float) -> np.ndarray:
    """An RGB colour as a float32 (1, 1, 3) array that broadcasts over an image."""
    return np.array([r, g, b], np.float32)[None, None, :]


def _smooth_noise(
    rng: np.random.Generator, cells: tuple[int, int], u: np.ndarray, v: np.ndarray, cell: float
) -> np.ndarray:
    """Value noise: a random grid of ``cells`` sampled bilinearly at (u, v) / cell (wraps around)."""
    rows, cols = cells
    grid = np.pad(rng.random(cells).astype(np.float32), ((0, 1), (0, 1)), mode="wrap").ravel()
    gy, gx = (v / cell) % rows, (u / cell) % cols
    fy, fx = gy - np.floor(gy), gx - np.floor(gx)
    i00 = (gy - fy).astype(np.intp) * (cols + 1) + (gx - fx).astype(np.intp)
    top = grid.take(i00) * (1 - fx) + grid.take(i00 + 1) * fx
    bottom = grid.take(i00 + cols + 1) * (1 - fx) + grid.take(i00 + cols + 2) * fx
    return top * (1 - fy) + bottom * fy


def _dots(
    rng: np.random.Generator, u: np.ndarray, v: np.ndarray, count: int, spread: float, size: tuple[float, float]
) -> np.ndarray:
    """Soft round dots at random lesion-frame positions; returns coverage in [0, 1]."""
    cover = np.zeros_like(u)
    for _ in range(count):
        r, a = spread * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
        radius = rng.uniform(*size)
        d = np.hypot(u - r * math.cos(a), v - r * math.sin(a))
        cover = np.maximum(cover, np.clip(radius + 0.5 - d, 0, 1))
    return cover


def _network(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, rho: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Pigment network: a honeycomb of darker lines plus mottled shading."""
    f, p1, p2 = rng.uniform(0.5, 0.7), rng.uniform(0, 6.3), rng.uniform(0, 6.3)
    wu, wv = 4 * _smooth_noise(rng, (8, 8), u, v, 6.0), 4 * _smooth_noise(rng, (8, 8), u, v, 6.0)
    net = np.abs(np.sin(f * (u + wu) + p1) * np.sin(f * (v + wv) + p2))
    line = np.clip(1.0 - net / 0.35, 0, 1)
    mottle = _smooth_noise(rng, (8, 8), u, v, 9.0)
    shade = (1.0 - 0.45 * line) * (0.8 + 0.4 * mottle)
    return colour * shade[..., None]


def _scaly(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, rho: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Keratotic scale: blocky high-contrast speckle with white-yellow keratin flecks."""
    speck = _smooth_noise(rng, (24, 24), u, v, 2.5)
    flecks = np.clip((_smooth_noise(rng, (16, 16), u, v, 3.5) - 0.72) * 6, 0, 1)
    body = colour * (0.7 + 0.6 * speck[..., None])
    return body * (1 - flecks[..., None]) + _rgb(240, 232, 200) * flecks[..., None]


def _vessels(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, rho: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Pearly pink with a glossy highlight, red branching vessels and blue-grey nests."""
    out = colour * (0.95 + 0.12 * _smooth_noise(rng, (6, 6), u, v, 10.0)[..., None])
    for _ in range(int(rng.integers(4, 8))):
        a, d, w = rng.uniform(0, math.pi), rng.uniform(-20, 20), rng.uniform(0.15, 0.3)
        along = u * math.cos(a) + v * math.sin(a)
        dist = np.abs(v * math.cos(a) - u * math.sin(a) - d - 4 * np.sin(w * along + rng.uniform(0, 6.3)))
        vessel = np.clip(1.3 - dist, 0, 1)[..., None]
        out = out * (1 - vessel) + _rgb(175, 25, 40) * vessel
    nests = _dots(rng, u, v, int(rng.integers(2, 5)), 18, (2.5, 4.5))[..., None]
    return out * (1 - nests) + _rgb(95, 105, 130) * nests


def _scar(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, rho: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Dermatofibroma: fine brown ring around a white central scar-like patch."""
    fine = _smooth_noise(rng, (10, 10), u, v, 3.0)
    out = colour * (0.85 + 0.3 * fine[..., None])
    centre = np.clip((rng.uniform(0.45, 0.6) - rho) * 8, 0, 1)[..., None]
    return out * (1 - centre) + _rgb(238, 226, 215) * centre


def _lacunae(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, rho: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Vascular lesion: red-purple body with dark red round lacunae."""
    out = colour * (0.9 + 0.2 * _smooth_noise(rng, (6, 6), u, v, 8.0)[..., None])
    lac = _dots(rng, u, v, int(rng.integers(6, 12)), 20, (2.5, 5.0))[..., None]
    return out * (1 - lac) + _rgb(95, 8, 35) * lac


#: Texture painters by name: (rng, u, v, rho, colour) -> RGB field (H, W, 3).
TEXTURES: dict[str, Callable[..., np.ndarray]] = {
    "network": _network,
    "scaly": _scaly,
    "vessels": _vessels,
    "scar": _scar,
    "lacunae": _lacunae,
}


def _lesion_params(rng: np.random.Generator, dx: str) -> dict:
    """Per-lesion appearance, shared by every image of the lesion."""
    look = LOOKS[VISUAL_GROUP[dx]]
    harmonics = np.arange(2, 7)
    light, dark = np.array(SKIN_LIGHT), np.array(SKIN_DARK)
    return dict(
        look=look,
        colour=_rgb(*np.clip(np.array(look.colour) * rng.normal(1, 0.08) + rng.normal(0, 4, 3), 0, 255)),
        radius=look.radius * float(np.clip(rng.lognormal(0.0, RADIUS_SPREAD), 0.65, 1.5)),
        amps=look.irregularity * rng.uniform(0.3, 1.0, harmonics.size) / np.sqrt(harmonics - 1),
        phases=rng.uniform(0, 2 * np.pi, harmonics.size),
        centre=np.array([WIDTH / 2, HEIGHT / 2]) + rng.normal(0, 8, 2),
        angle=rng.uniform(0, 2 * np.pi),
        skin=_rgb(*light + rng.uniform(0, 1) * (dark - light) + rng.normal(0, 5, 3)),
        texture_seed=int(rng.integers(2**31)),
    )


def _lesion_frame(lesion: dict, rng: np.random.Generator) -> tuple:
    """This view's crop (slices), lesion-frame coords (u, v), normalised radius rho, edge distance (px).

    Only the box around the blob is computed: outside it the lesion layer is fully transparent.
    """
    cx, cy = (lesion["centre"] + rng.normal(0, 3, 2)).tolist()
    angle, scale = float(lesion["angle"] + rng.normal(0, 0.15)), float(rng.normal(1.0, 0.05))
    reach = lesion["radius"] * (1 + lesion["amps"].sum()) * scale + 2
    box = (
        slice(max(int(cy - reach), 0), max(int(cy + reach) + 2, 0)),
        slice(max(int(cx - reach), 0), max(int(cx + reach) + 2, 0)),
    )
    dx, dy = _XX[box] - cx, _YY[box] - cy
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    u, v = dx * cos + dy * sin, dy * cos - dx * sin
    phi = np.arctan2(v, u)
    wobble = np.ones_like(phi)
    for k, (amp, phase) in enumerate(zip(lesion["amps"].tolist(), lesion["phases"].tolist(), strict=True), start=2):
        wobble += amp * np.cos(k * phi + phase)
    edge = float(lesion["radius"]) * wobble
    rho = np.hypot(u, v) / edge
    return box, u, v, rho, (1 - rho) * edge * scale


def _background(lesion: dict, rng: np.random.Generator) -> np.ndarray:
    """Class-independent skin: the patient's tone, smooth shading and fine grain."""
    coarse = Image.fromarray(rng.random((4, 5), dtype=np.float32), mode="F")
    shade = 0.9 + 0.2 * np.asarray(coarse.resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR))
    grain = 0.025 * rng.standard_normal((HEIGHT, WIDTH), dtype=np.float32)
    return lesion["skin"] * rng.normal(1.0, 0.03) * (shade + grain)[..., None]


def _hair(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dark curved hair strands drawn as dense points along quadratic curves."""
    for _ in range(int(rng.poisson(1.5))):
        p0, p2 = rng.uniform([0, 0], [WIDTH, HEIGHT]), rng.uniform([0, 0], [WIDTH, HEIGHT])
        p1 = (p0 + p2) / 2 + rng.normal(0, 30, 2)
        t = np.linspace(0, 1, 600)[:, None]
        pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        colour = rng.uniform(25, 70) * np.array([1.0, 0.85, 0.75])
        for off in ((0, 0), (1, 0), (0, 1)) if rng.random() < 0.5 else ((0, 0),):
            x = np.clip(np.round(pts[:, 0]).astype(int) + off[0], 0, WIDTH - 1)
            y = np.clip(np.round(pts[:, 1]).astype(int) + off[1], 0, HEIGHT - 1)
            img[y, x] = 0.15 * img[y, x] + 0.85 * colour
    return img


def _vignette(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Radial darkening, and sometimes the dark circular rim of a dermoscope."""
    img = img * (1 - rng.uniform(0.05, 0.4) * _VIGNETTE)[..., None]
    if rng.random() < 0.3:
        rim = np.clip((_CENTRE_DIST - rng.uniform(95, 115)) / 3, 0, 1)
        img = img * (1 - rim[..., None]) + 12 * rim[..., None]
    return img


def render_image(lesion: dict, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One view of a lesion: the RGB uint8 image (H, W, 3) and its boolean blob mask (H, W)."""
    box, u, v, rho, edge_px = _lesion_frame(lesion, rng)
    look = lesion["look"]
    body = TEXTURES[look.texture](np.random.default_rng(lesion["texture_seed"]), u, v, rho, lesion["colour"])
    body = body * (1 - look.centre_dark * np.clip(1 - rho, 0, 1) ** 1.5)[..., None]
    alpha = np.clip(edge_px / 1.5, 0, 1)[..., None]
    img = _background(lesion, rng)
    img[box] = img[box] * (1 - alpha) + body * alpha
    img = _vignette(_hair(img, rng), rng)
    img = img * rng.normal(1.0, 0.04) + 3 * rng.standard_normal(img.shape, dtype=np.float32)
    mask = np.zeros((HEIGHT, WIDTH), bool)
    mask[box] = rho < 1
    return np.clip(np.round(img), 0, 255).astype(np.uint8), mask


# ---- writing the dataset ------------------------------------------------------------------------


def _write_images(root: Path, meta: pd.DataFrame, seed: int) -> None:
    """Render and save every image and mask; each lesion's appearance is seeded by its index."""
    half = (len(meta) + 1) // 2
    lesions: dict[int, dict] = {}
    for k, row in enumerate(meta.itertuples(index=False)):
        if row.lesion_index not in lesions:
            lesions[row.lesion_index] = _lesion_params(np.random.default_rng([seed, 1, row.lesion_index]), row.dx)
        view_rng = np.random.default_rng([seed, 2, row.lesion_index, row.view])
        img, mask = render_image(lesions[row.lesion_index], view_rng)
        Image.fromarray(img).save(root / IMAGE_DIRS[k >= half] / f"{row.image_id}.jpg", quality=92)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / MASK_DIR / f"{row.image_id}{MASK_SUFFIX}")


def _provenance(n: int, seed: int) -> dict:
    """What ``synthetic.json`` records: enough to tell whether an existing folder can be reused."""
    return dict(
        generator="multimodal_lesion.data.synthetic", version=GENERATOR_VERSION, n=n, seed=seed, planted=PLANTED
    )


def _is_current(out: Path, n: int, seed: int) -> bool:
    """True when ``out`` already holds this exact synthetic dataset (same n, seed and generator)."""
    marker = out / PROVENANCE_FILE
    if not (marker.is_file() and (out / METADATA_FILE).is_file()):
        return False
    old = read_json(marker)
    return all(old.get(k) == v for k, v in _provenance(n, seed).items() if k != "planted")


def _check_target(out: Path) -> None:
    """Refuse to replace a folder that is not empty and not a synthetic dataset written here."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"synthetic output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / PROVENANCE_FILE).is_file():
        raise ConfigError(f"synthetic output {out} is a non-empty folder that is not a synthetic dataset")


def make_synthetic(out: str | Path, n: int = 1000, seed: int = 0) -> Path:
    """Write the synthetic HAM10000 (official layout, planted structure) to ``out``; returns ``out``.

    Deterministic by ``seed``. Written into a temporary sibling folder and renamed into place, so
    ``out`` is never half-written; an existing identical dataset (same n, seed, generator) is reused.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"synthetic n must be a positive integer, got {n!r}")
    out = Path(out)
    if _is_current(out, int(n), int(seed)):
        return out
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for sub in (*IMAGE_DIRS, MASK_DIR):
            (tmp / sub).mkdir()
        meta = synthetic_metadata(int(n), int(seed))
        _write_images(tmp, meta, int(seed))
        with atomic_write(tmp / METADATA_FILE) as fh:
            meta[list(METADATA_COLUMNS)].to_csv(fh, index=False)
        write_json(tmp / PROVENANCE_FILE, _provenance(int(n), int(seed)))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``, moving an older synthetic dataset aside first and deleting it."""
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old."))
        out.rename(old / "data")
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
        return
    if out.is_dir():
        out.rmdir()
    tmp.rename(out)
