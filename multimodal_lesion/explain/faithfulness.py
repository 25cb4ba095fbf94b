"""Is a saliency map faithful? Perturbation curves, ROAD, localisation, baselines with paired verdicts.

Every measure runs on the *shown prediction* (:func:`~.gradcam.shown_view`: the same flips and
temperature as the displayed probability), for the CAM and for baseline maps of the same size that
know nothing about the model:

- the mean training lesion mask (where lesions usually are),
- a centred Gaussian whose width is fitted to the mean training mask (:func:`fit_centre_sigma`),
- a smooth random map (white noise blurred to the CAM's own resolution).

Measures:

- Deletion / insertion (Petsiuk et al. 2018, RISE): delete (insert) the most salient pixels first
  and follow the explained class's probability; a faithful map gives a low deletion AUC and a high
  insertion AUC. Deleted pixels take the image's own mean colour (``mean``); insertion starts from
  a strongly blurred copy (``blur``), as in RISE. ``zero`` (the normalisation mean, ImageNet's mean
  colour: a mid-grey) can be chosen instead.
- ROAD (Rong et al. 2022, pytorch-grad-cam's ``ROADCombined`` arithmetic and imputer): removed pixels
  are imputed from their neighbours, which avoids the out-of-distribution artefacts of a constant
  fill; the score is (least-relevant-first minus most-relevant-first) / 2, higher is better.
- Pointing game (Zhang et al. 2016) and energy inside the lesion mask.

:func:`compare_to_baselines` turns per-case values into paired differences (CAM minus baseline,
signed so that positive means the CAM did better) with a bootstrap CI and a verdict: better, tie or
worse. Model randomisation lives in :mod:`.randomisation`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from pytorch_grad_cam.metrics.road import neighbors_weights
from scipy import ndimage, sparse
from scipy.sparse.linalg import splu
from torch import Tensor

from ..errors import ConfigError

Predictor = Callable[[Tensor], Tensor]  # images (N, 3, H, W) -> logits (N, C)
BLUR_SIGMA = 0.1  # blur baseline: Gaussian sigma as a fraction of the longer image side
CENTRE_SIGMA = 0.25  # centre Gaussian's sigma (fraction of each side) when no training masks are there to fit it
CENTRE_SIGMAS = tuple(np.round(np.arange(0.05, 0.51, 0.01), 2))  # the widths :func:`fit_centre_sigma` tries
DEFAULT_STEPS = 20
# deletion: image -> its own mean colour; insertion: a blurred copy -> image (as in RISE).
DEFAULT_BASELINES: Mapping[str, str] = MappingProxyType({"deletion": "mean", "insertion": "blur"})
CURVE_MODES = tuple(DEFAULT_BASELINES)
#: Each measure and whether a higher value means a more faithful map.
HIGHER_IS_BETTER: Mapping[str, bool] = MappingProxyType(
    {"energy_inside": True, "pointing_game": True, "deletion_auc": False, "insertion_auc": True, "road": True}
)
MAP_NAMES = ("cam", "mean_mask", "centre", "smooth_random")  # the CAM, then the baselines
TIE_TOLERANCE = 1e-9  # a CI bound this close to 0 counts as 0 (identical maps differ by float noise only)


def _blurred(image: Tensor) -> Tensor:
    """A strongly blurred copy (C, H, W): the shapes are gone, the colours remain."""
    sigma = BLUR_SIGMA * max(image.shape[-2:])
    arr = ndimage.gaussian_filter(image.detach().cpu().double().numpy(), sigma=(0, sigma, sigma), mode="reflect")
    return torch.as_tensor(arr, dtype=image.dtype, device=image.device)


def _zero_image(image: Tensor) -> Tensor:
    """Zeros once normalised: the normalisation's mean colour (ImageNet's, a mid-grey), not the image's."""
    return torch.zeros_like(image)


def _mean_image(image: Tensor) -> Tensor:
    """The image's own per-channel mean colour everywhere."""
    return image.mean(dim=(-2, -1), keepdim=True).expand_as(image).clone()


BASELINES: Mapping[str, Callable[[Tensor], Tensor]] = MappingProxyType(
    {"zero": _zero_image, "mean": _mean_image, "blur": _blurred}
)


def _baseline(image: Tensor, baseline: str | Tensor) -> Tensor:
    """The image (3, H, W) that removed pixels take: a named baseline or a given image."""
    if isinstance(baseline, Tensor):
        return baseline.to(image).expand_as(image)
    if baseline not in BASELINES:
        raise ConfigError(f"unknown baseline '{baseline}' (valid: {', '.join(BASELINES)})")
    return BASELINES[baseline](image)


def _step_masks(saliency: np.ndarray, steps: int) -> np.ndarray:
    """Bool masks (steps+1, H, W): step k covers the k/steps most salient pixels (ties keep pixel order)."""
    order = np.argsort(-np.asarray(saliency, dtype=np.float64).ravel(), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    counts = np.round(np.linspace(0, order.size, steps + 1)).astype(np.int64)
    return rank.reshape(saliency.shape)[None] < counts[:, None, None]


def perturbation_curve(
    predict: Predictor,
    image: Tensor,
    saliency: np.ndarray,
    target: int,
    *,
    mode: str = "deletion",
    steps: int = DEFAULT_STEPS,
    baseline: str | Tensor | None = None,
) -> np.ndarray:
    """Target-class probabilities (steps+1,) as the most salient pixels are deleted or inserted.

    Args:
        predict: normalised images (N, 3, H, W) -> logits (N, C), e.g. :func:`~.gradcam.shown_view`.
        image: one normalised image (3, H, W).
        saliency: (H, W) map; higher = more important.
        target: class whose softmax probability is followed.
        mode: ``deletion`` (image -> baseline) or ``insertion`` (baseline -> image).
        steps: number of steps; all steps go through ``predict`` in one batch.
        baseline: ``mean`` | ``zero`` | ``blur`` | an image (3, H, W) that replaces removed pixels;
            None = the mode's default (:data:`DEFAULT_BASELINES`).
    """
    if saliency.shape != tuple(image.shape[-2:]):
        raise ConfigError(f"saliency map {saliency.shape} does not match the image {tuple(image.shape[-2:])}")
    if mode not in CURVE_MODES:
        raise ConfigError(f"unknown curve mode '{mode}' (valid: {', '.join(CURVE_MODES)})")
    masks = torch.as_tensor(_step_masks(saliency, steps), device=image.device)[:, None]
    base = _baseline(image, DEFAULT_BASELINES[mode] if baseline is None else baseline)
    first, second = (base, image) if mode == "deletion" else (image, base)
    batch = torch.where(masks, first[None], second[None])
    with torch.no_grad():
        probs = torch.softmax(predict(batch).double(), dim=-1)[:, target]
    return probs.cpu().numpy()


def curve_auc(scores: np.ndarray) -> float:
    """Area under a curve sampled at evenly spaced fractions 0..1 (trapezoid rule)."""
    scores = np.asarray(scores, dtype=np.float64)
    return float(np.trapezoid(scores, np.linspace(0.0, 1.0, len(scores))))


def road_scores(
    predict: Predictor,
    image: Tensor,
    maps: np.ndarray,
    target: int,
    percentiles: Sequence[int] = (20, 50, 80),
    seed: int = 0,
    imputer: RoadImputer | Callable[[Tensor, Tensor], Tensor] | None = None,
) -> np.ndarray:
    """The combined ROAD score (K,) of K maps (K, H, W) of one image (higher = more faithful).

    pytorch-grad-cam's ``ROADCombined`` arithmetic with its own imputer and removal classes, in the
    same order (so the seeded imputation noise is the same): for each percentile, the probability
    after removing the least relevant pixels minus that after removing the most relevant, halved,
    averaged over ``percentiles``. The unperturbed score cancels, so all K x 2 x P imputed images go
    through ``predict`` in one batch (``ROADCombined`` runs the original image 2 x P times more).
    ``imputer`` as in :func:`road_images` (default: a :class:`RoadImputer`).
    """
    imputed = road_images(image, maps, percentiles, seed, imputer)
    with torch.no_grad():
        probs = torch.softmax(predict(imputed.to(image.device)).double(), -1)[:, target]
    lerf, morf = probs.cpu().numpy().reshape(2, len(percentiles), len(maps))
    return ((lerf - morf) / 2).mean(0)


def random_map(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Uniform random saliency (H, W): white noise."""
    return np.random.default_rng(seed).random(shape)


def smooth_random_map(shape: tuple[int, int], sigma: float, seed: int = 0) -> np.ndarray:
    """White noise blurred with a Gaussian of ``sigma`` pixels, scaled to [0, 1]: a random map as smooth as a CAM."""
    noise = ndimage.gaussian_filter(random_map(shape, seed), sigma=max(sigma, 1e-6), mode="reflect")
    return (noise - noise.min()) / max(float(np.ptp(noise)), 1e-12)


def centre_map(shape: tuple[int, int], sigma: float = CENTRE_SIGMA) -> np.ndarray:
    """Centred Gaussian (H, W) with sigma a fraction of each side, peak 1: the 'lesions are central' prior."""
    h, w = shape
    y = (np.arange(h) - (h - 1) / 2) / (sigma * h)
    x = (np.arange(w) - (w - 1) / 2) / (sigma * w)
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2))


def fit_centre_sigma(masks: np.ndarray, sigmas: Sequence[float] = CENTRE_SIGMAS) -> float:
    """The width of the centred Gaussian that best fits the mean of the training masks (N, H, W).

    Least squares over ``sigmas``, each Gaussian with its best height: the mean mask is how often a
    pixel is lesion, so the fitted Gaussian is where lesions are, as a reviewer would draw the prior.
    """
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3 or not len(masks):
        raise ConfigError(f"training masks must be (N, H, W) with N >= 1, got shape {masks.shape}")
    mean = masks.mean(0)
    shape = (masks.shape[1], masks.shape[2])

    def residual(sigma: float) -> float:
        g = centre_map(shape, sigma)
        height = float((g * mean).sum() / (g * g).sum())
        return float(((mean - height * g) ** 2).sum())

    return float(sigmas[int(np.argmin([residual(s) for s in sigmas]))])


@dataclass(frozen=True)
class BaselineMaps:
    """The baseline maps of one image size: the mean training mask, the fitted centre, a smooth random map.

    Build it with :func:`baseline_maps`; :meth:`maps` gives the maps of one case (the random one seeded).
    """

    mean_mask: np.ndarray | None  # (H, W) mean of the training masks; None without masks
    centre_sigma: float  # fitted on the training masks, or CENTRE_SIGMA without them
    smooth_sigma: float  # pixels: the CAM layer's stride, so the random map has the CAM's resolution
    n_masks: int  # training masks behind mean_mask and centre_sigma

    def maps(self, shape: tuple[int, int], seed: int) -> dict[str, np.ndarray]:
        """Baseline name -> (H, W) map (the mean mask only when there were training masks)."""
        out = {"mean_mask": self.mean_mask} if self.mean_mask is not None else {}
        out["centre"] = centre_map(shape, self.centre_sigma)
        out["smooth_random"] = smooth_random_map(shape, self.smooth_sigma, seed)
        return {k: v for k, v in out.items() if v is not None}


def baseline_maps(training_masks: np.ndarray | None, smooth_sigma: float) -> BaselineMaps:
    """Baselines from training-split masks (N, H, W) at the model's input size (None: no masks)."""
    if training_masks is None or not len(training_masks):
        return BaselineMaps(None, CENTRE_SIGMA, smooth_sigma, 0)
    masks = np.asarray(training_masks, dtype=bool)
    return BaselineMaps(masks.mean(0), fit_centre_sigma(masks), smooth_sigma, len(masks))


def pointing_game(saliency: np.ndarray, mask: np.ndarray, tolerance: float = 0.0) -> bool:
    """True when the map's maximum lies inside the mask or within ``tolerance`` pixels of it.

    Tied maxima (the plateau of an upsampled coarse map) count by their centroid, so a flat map
    points at the image centre, like the centre baseline. Zhang et al. use a 15-pixel tolerance.
    """
    saliency, mask = np.asarray(saliency), np.asarray(mask, dtype=bool)
    if saliency.shape != mask.shape:
        raise ConfigError(f"saliency map {saliency.shape} and mask {mask.shape} differ in size")
    peak = tuple(np.argwhere(saliency == saliency.max()).mean(0).round().astype(int))
    if mask[peak] or tolerance <= 0 or not mask.any():
        return bool(mask[peak])
    return bool(ndimage.distance_transform_edt(~mask)[peak] <= tolerance)


def energy_inside(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share of the (non-negative) saliency mass inside the mask, in [0, 1].

    A map with no mass is treated as uniform (its share is the mask's area fraction).
    """
    saliency, mask = np.clip(np.asarray(saliency, dtype=np.float64), 0, None), np.asarray(mask, dtype=bool)
    if saliency.shape != mask.shape:
        raise ConfigError(f"saliency map {saliency.shape} and mask {mask.shape} differ in size")
    total = saliency.sum()
    return float(saliency[mask].sum() / total) if total > 0 else float(mask.mean())


def faithfulness_report(
    predict: Predictor,
    image: Tensor,
    maps: Mapping[str, np.ndarray],
    target: int,
    *,
    mask: np.ndarray | None = None,
    steps: int = DEFAULT_STEPS,
    road_percentiles: Sequence[int] = (20, 50, 80),
    baseline: str | Tensor | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Every measure of every map of one case: ``{map name: {measure: value}}``.

    ``predict`` is the shown prediction with the case's metadata bound (:func:`~.gradcam.shown_view`);
    ``image`` (3, H, W) is normalised; ``maps`` are (H, W), e.g. ``{"cam": ..., **BaselineMaps.maps()}``.
    Deletion / insertion AUCs and ROAD always; pointing game and energy inside with a mask. One case of
    :func:`faithfulness_reports`, which batches many.
    """
    case = FaithfulnessCase(image, None, target, maps, mask)
    settings = CurveSettings(steps, tuple(road_percentiles), baseline, seed)
    return faithfulness_reports(lambda x, _meta: predict(x), [case], settings)[0]


#: The shown prediction of many cases at once: images (N, 3, H, W) and each image's metadata row
#: (N, D; None for models without metadata) -> calibrated logits (N, C).
CasePredictor = Callable[[Tensor, Tensor | None], Tensor]


@dataclass(frozen=True)
class FaithfulnessCase:
    """One case to measure: its normalised image (3, H, W), metadata row (D,), explained class and maps."""

    image: Tensor
    meta: Tensor | None
    target: int
    maps: Mapping[str, np.ndarray]  # name -> (H, W), e.g. ``{"cam": ..., **BaselineMaps.maps()}``
    mask: np.ndarray | None = None  # the lesion mask (H, W), for the pointing game and energy inside


@dataclass(frozen=True)
class CurveSettings:
    """How the curves are drawn: deletion / insertion steps, ROAD percentiles, removed-pixel baseline, seed."""

    steps: int = DEFAULT_STEPS
    road_percentiles: tuple[int, ...] = (20, 50, 80)  # () = no ROAD
    baseline: str | Tensor | None = None  # None = each mode's default (:data:`DEFAULT_BASELINES`)
    seed: int = 0  # ROAD's imputation noise


@dataclass(frozen=True)
class _CasePlan:
    """One case's distinct perturbed images and where each curve point and ROAD score reads them.

    Every deletion curve starts at the image and ends at the baseline (insertion: the reverse), so the
    two ends are one image each, shared by all maps: K maps cost 2 + K x 2 x (steps - 1) curve images.
    """

    images: Tensor  # (M, 3, H, W)
    curves: dict[str, np.ndarray]  # mode -> (K, steps + 1) indices into images
    road: np.ndarray | None  # (2, P, K) indices: least- then most-relevant-first


def _plan(case: FaithfulnessCase, settings: CurveSettings, imputer: RoadImputer) -> _CasePlan:
    """The case's perturbed images, built as :func:`perturbation_curve` and :func:`road_scores` build them."""
    image, names, steps = case.image, list(case.maps), settings.steps
    for name in names:
        if np.shape(case.maps[name]) != tuple(image.shape[-2:]):
            raise ConfigError(
                f"saliency map '{name}' {np.shape(case.maps[name])} does not match the image {tuple(image.shape[-2:])}"
            )
    parts, curves, n = [image[None]], {}, 1
    for mode in CURVE_MODES:
        base = _baseline(image, DEFAULT_BASELINES[mode] if settings.baseline is None else settings.baseline)
        parts.append(base[None])
        ends = (0, n) if mode == "deletion" else (n, 0)
        first, second = (base, image) if mode == "deletion" else (image, base)
        n += 1
        index = np.empty((len(names), steps + 1), dtype=np.int64)
        for k, name in enumerate(names):
            inner = torch.as_tensor(_step_masks(case.maps[name], steps)[1:-1], device=image.device)[:, None]
            parts.append(torch.where(inner, first[None], second[None]))
            index[k] = [ends[0], *range(n, n + steps - 1), ends[1]]
            n += steps - 1
        curves[mode] = index
    road = None
    if settings.road_percentiles:
        stacked = np.stack([np.asarray(case.maps[m]) for m in names])
        imputed = road_images(image, stacked, settings.road_percentiles, settings.seed, imputer)
        parts.append(imputed.to(image.device))
        road = np.arange(n, n + len(imputed)).reshape(2, len(settings.road_percentiles), len(names))
    return _CasePlan(torch.cat(parts), curves, road)


#: NoisyLinearImputer's weights of the 8 neighbours (ROAD's imputation): (row offset, column offset) -> weight.
NEIGHBOUR_WEIGHTS = tuple(((int(dy), int(dx)), float(w)) for (dy, dx), w in neighbors_weights)
ROAD_NOISE = 0.01  # NoisyLinearImputer's noise added to the imputed values


class RoadImputer:
    """ROAD's noisy linear imputation (pytorch-grad-cam's ``NoisyLinearImputer``), fast and remembered.

    Each removed pixel becomes the weighted mean of its 8 neighbours (a sparse linear system over the
    removed pixels) plus Gaussian noise of sd 0.01, as ``NoisyLinearImputer`` does, with the same system,
    the same noise draws and the same result to ~1e-12 before the noise. Two things make it fast: the
    system is assembled with array operations (the original fills a LIL matrix), and it is factorised
    once per removal mask (SuperLU, symmetric mode: the system is symmetric and diagonally dominant), the
    factors kept for the last ``cache_size`` masks. The mean-mask and centre baselines remove the same
    pixels in every case, so their systems are factorised once for all cases.
    """

    def __init__(self, cache_size: int = 32) -> None:
        self.cache_size = cache_size
        self._systems: OrderedDict[bytes, _LinearSystem] = OrderedDict()

    def __call__(self, image: Tensor, keep: np.ndarray, generator: torch.Generator | None = None) -> Tensor:
        """``image`` (C, H, W) with the pixels where ``keep`` (H, W) is 0 imputed; the noise is drawn from
        ``generator`` (default: torch's global generator, as ``NoisyLinearImputer`` draws it)."""
        keep = np.asarray(keep) > 0.5
        key = hashlib.blake2b(np.packbits(keep).tobytes() + repr(keep.shape).encode(), digest_size=16).digest()
        system = self._systems.pop(key, None) or _LinearSystem.build(keep)
        self._systems[key] = system
        while len(self._systems) > self.cache_size:
            self._systems.popitem(last=False)
        flat = image.reshape(image.shape[0], -1)
        res = torch.tensor(system.solve(flat.numpy()), dtype=torch.float)
        infill = flat.clone()
        noise = torch.randn(res.t().shape, generator=generator) if generator is not None else torch.randn_like(res.t())
        infill[:, torch.from_numpy(system.unknown)] = res.t() + ROAD_NOISE * noise
        return infill.reshape_as(image)


@dataclass(frozen=True)
class _LinearSystem:
    """The factorised imputation system of one removal mask and where its right-hand side reads the image."""

    unknown: np.ndarray  # flat indices of the removed pixels (the unknowns, in order)
    known: list[tuple[np.ndarray, np.ndarray, float]]  # per neighbour: (equation ids, known pixel, weight)
    factor: Any  # scipy SuperLU of the system matrix; None when singular (the values are then NaN, as
    # NoisyLinearImputer's spsolve returns them, and the case's ROAD is dropped from the comparisons)

    @classmethod
    def build(cls, keep: np.ndarray) -> _LinearSystem:
        """NoisyLinearImputer's ``setup_sparse_system`` with array operations, then its LU factors."""
        h, w = keep.shape
        kept = keep.ravel()
        unknown = np.flatnonzero(~kept)
        variable = np.zeros(h * w, dtype=np.int64)
        variable[unknown] = np.arange(len(unknown))
        row, col = unknown // w, unknown % w
        weight_sum = np.ones(len(unknown))
        rows, cols, values, known = [], [], [], []
        for (dy, dx), weight in NEIGHBOUR_WEIGHTS:
            r, c = row + dy, col + dx
            inside = (r >= 0) & (c >= 0) & (r < h) & (c < w)
            weight_sum[~inside] -= weight
            ids, neighbour = np.flatnonzero(inside), r[inside] * w + c[inside]
            has_value = kept[neighbour]
            known.append((ids[has_value], neighbour[has_value], weight))
            rows.append(ids[~has_value])
            cols.append(variable[neighbour[~has_value]])
            values.append(np.full(int((~has_value).sum()), weight))
        n = len(unknown)
        rows.append(np.arange(n))
        cols.append(np.arange(n))
        values.append(-weight_sum)
        matrix = sparse.csc_matrix((np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
        try:
            factor = splu(matrix, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
        except RuntimeError:  # singular: nothing kept next to a removed region (a constant map removes all)
            factor = None
        return cls(unknown, known, factor)

    def solve(self, flat: np.ndarray) -> np.ndarray:
        """The imputed values (n, C) of the removed pixels of an image (C, H*W)."""
        rhs = np.zeros((len(self.unknown), flat.shape[0]))
        if self.factor is None:
            return np.full_like(rhs, np.nan)
        for ids, neighbour, weight in self.known:
            rhs[ids, :] -= weight * flat[:, neighbour].T
        return self.factor.solve(rhs)


def road_images(
    image: Tensor,
    maps: np.ndarray,
    percentiles: Sequence[int],
    seed: int = 0,
    imputer: RoadImputer | Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Tensor:
    """The 2 x P x K imputed images of ROAD (least-relevant-first, then most-relevant-first) on the CPU.

    The removal masks are pytorch-grad-cam's ``RemoveLeastRelevantFirst`` / ``RemoveMostRelevantFirst``
    (pixels at or above the percentile removed), drawn in its order so that the seeded noise is the same.
    A :class:`RoadImputer` draws the noise from a generator of its own seeded with ``seed`` (the same draws
    as torch's global generator seeded so, which stays untouched: safe beside other threads); another
    imputer (e.g. pytorch-grad-cam's ``NoisyLinearImputer``, called with the image and the kept mask as
    tensors) from the global one, seeded for the call and restored after.
    """
    imputer = imputer or RoadImputer()
    base = image.detach().cpu()
    masks = [
        _kept(torch.from_numpy(np.asarray(m, dtype=np.float32)), p, least_first)
        for least_first in (True, False)
        for p in percentiles
        for m in maps
    ]
    if isinstance(imputer, RoadImputer):
        generator = torch.Generator().manual_seed(seed)
        return torch.stack([imputer(base, keep, generator) for keep in masks])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([imputer(base, torch.from_numpy(keep)) for keep in masks])


def _kept(saliency: Tensor, percentile: int, least_first: bool) -> np.ndarray:
    """pytorch-grad-cam's binary mask (1 = kept): below the percentile of the map (of 1 - map, least first)."""
    mask = 1 - saliency if least_first else saliency
    threshold = np.percentile(mask.cpu().numpy(), percentile)
    return (mask < threshold).numpy().astype(np.float32)


def _report(case: FaithfulnessCase, plan: _CasePlan, probs: np.ndarray) -> dict[str, dict[str, float]]:
    """The measures of one case from the target-class probabilities (M,) of its planned images."""
    out: dict[str, dict[str, float]] = {}
    for k, name in enumerate(case.maps):
        sal = np.asarray(case.maps[name])
        out[name] = {f"{mode}_auc": curve_auc(probs[index[k]]) for mode, index in plan.curves.items()}
        if plan.road is not None:
            lerf, morf = probs[plan.road[0, :, k]], probs[plan.road[1, :, k]]
            out[name]["road"] = float(((lerf - morf) / 2).mean())
        if case.mask is not None:
            out[name]["pointing_game"] = float(pointing_game(sal, case.mask))
            out[name]["energy_inside"] = energy_inside(sal, case.mask)
    return out


def _repeated_meta(pending: list[tuple[FaithfulnessCase, _CasePlan]]) -> Tensor | None:
    """Each case's metadata row once per planned image of the case (None without metadata)."""
    if any(case.meta is None for case, _ in pending):
        return None
    return torch.cat([case.meta.reshape(1, -1).expand(len(plan.images), -1) for case, plan in pending])  # type: ignore[union-attr]


def _score(
    predict: CasePredictor, pending: list[tuple[FaithfulnessCase, _CasePlan]], batch_size: int
) -> list[dict[str, dict[str, float]]]:
    """Every planned image of the pending cases through ``predict`` in batches of ``batch_size``."""
    if not pending:
        return []
    images = torch.cat([plan.images for _, plan in pending])
    meta = _repeated_meta(pending)
    with torch.no_grad():
        logits = [
            predict(images[i : i + batch_size], None if meta is None else meta[i : i + batch_size])
            for i in range(0, len(images), batch_size)
        ]
    probs = torch.softmax(torch.cat(logits).double(), dim=-1).cpu().numpy()
    out, start = [], 0
    for case, plan in pending:
        out.append(_report(case, plan, probs[start : start + len(plan.images), case.target]))
        start += len(plan.images)
    return out


#: Images a call of the predictor: OpenVINO scores 150x200 images ~15% faster 8 at a time than 32-128
#: (305 against 260 images/s on 2 idle cores, docs/performance-explanations.md).
CURVE_BATCH = 8


def faithfulness_reports(
    predict: CasePredictor,
    cases: Iterable[FaithfulnessCase],
    settings: CurveSettings | None = None,
    *,
    batch_size: int = CURVE_BATCH,
    queue: int = 256,
    on_case: Callable[[int, dict[str, dict[str, float]]], None] | None = None,
    imputer: RoadImputer | None = None,
) -> list[dict[str, dict[str, float]]]:
    """Every measure of every map of many cases, the curves of all of them batched together.

    The perturbed images of consecutive cases (every map, step and ROAD percentile; the curves' shared
    ends once) are queued until ``queue`` images wait, then go through ``predict`` ``batch_size`` at a
    time, each with its case's metadata row: the values equal :func:`faithfulness_report` case by case
    (to float noise). ``on_case(k, report)`` is called as case ``k``'s report is done (progress, a store).
    Pass the same ``imputer`` to the calls of one report (its chunks): the factors of the masks every case
    shares (the mean-mask and centre baselines') are then computed once for the whole report.
    """
    settings, imputer = settings or CurveSettings(), imputer or RoadImputer()
    out: list[dict[str, dict[str, float]]] = []
    pending: list[tuple[FaithfulnessCase, _CasePlan]] = []

    def flush() -> None:
        for report in _score(predict, pending, batch_size):
            out.append(report)
            if on_case is not None:
                on_case(len(out) - 1, report)
        pending.clear()

    for case, plan in _planned_ahead(cases, settings, imputer, PLANS_AHEAD):
        pending.append((case, plan))
        if sum(len(p.images) for _, p in pending) >= queue:
            flush()
    flush()
    release_freed_memory()
    return out


def release_freed_memory() -> None:
    """Hand the memory freed in this process back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    The ROAD factors are allocated in the plan thread and freed from the caller's. Measured over 64 real
    cases in chunks of 16: a fresh imputer a chunk grew the process 2.9 -> 6.4 GB, 2.2 -> 4.7 GB with
    this; one imputer for the report and this, 2.2 -> 2.4 GB.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL(None).malloc_trim(0)


PLANS_AHEAD = 3  # cases whose perturbed images are built in a thread while the queued ones are scored


def _planned_ahead(
    cases: Iterable[FaithfulnessCase], settings: CurveSettings, imputer: RoadImputer, ahead: int
) -> Iterator[tuple[FaithfulnessCase, _CasePlan]]:
    """Each case with its plan, in order, the plans built ``ahead`` cases in advance in one thread.

    The ROAD factorisations (SuperLU) and the masking release the interpreter, so they run while the
    caller's predictor scores the cases before (OpenVINO and torch release it too). One thread, so the
    imputer's factor cache is never used by two threads at once; the seeded noise comes from each case's
    own generator. The thread lives as long as the process (one thread for every chunk of a report).
    """
    pool = _plan_pool()
    queued: deque[tuple[FaithfulnessCase, Future[_CasePlan]]] = deque()
    try:
        for case in cases:
            queued.append((case, pool.submit(_plan, case, settings, imputer)))
            if len(queued) > ahead:
                first, plan = queued.popleft()
                yield first, plan.result()
        while queued:
            first, plan = queued.popleft()
            yield first, plan.result()
    finally:
        for _, plan in queued:  # stopped early (an error): drop what has not started, wait for the rest
            if not plan.cancel():
                plan.exception()


@functools.cache
def _plan_pool() -> ThreadPoolExecutor:
    """The one thread that builds the faithfulness plans, for the life of the process."""
    return ThreadPoolExecutor(1, thread_name_prefix="faithfulness-plans")


@dataclass(frozen=True)
class PairedComparison:
    """CAM versus one baseline on one measure, paired over the cases.

    ``diff`` is the mean of (CAM - baseline), signed so that positive = the CAM did better (for
    deletion, where lower is better, it is baseline - CAM); ``ci_low`` / ``ci_high`` its bootstrap CI.
    """

    metric: str
    baseline: str
    n: int
    cam: float
    baseline_value: float
    diff: float
    ci_low: float
    ci_high: float
    verdict: str  # better | tie | worse | n/a (fewer than 2 cases)


def paired_comparison(
    metric: str,
    baseline: str,
    cam: Sequence[float],
    other: Sequence[float],
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedComparison:
    """Mean paired difference CAM - baseline (oriented by :data:`HIGHER_IS_BETTER`) with a percentile
    bootstrap CI over cases and a verdict: better (CI above 0), worse (below 0) or tie."""
    a, b = np.asarray(cam, dtype=np.float64), np.asarray(other, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    sign = 1.0 if HIGHER_IS_BETTER.get(metric, True) else -1.0
    d = sign * (a - b)
    if len(d) < 2:
        mean = float(d.mean()) if len(d) else float("nan")
        return PairedComparison(metric, baseline, len(d), _mean(a), _mean(b), mean, mean, mean, "n/a")
    idx = np.random.default_rng(seed).integers(0, len(d), size=(n_boot, len(d)))
    boots = d[idx].mean(1)
    low, high = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    verdict = "better" if low > TIE_TOLERANCE else "worse" if high < -TIE_TOLERANCE else "tie"
    return PairedComparison(
        metric, baseline, len(d), _mean(a), _mean(b), float(d.mean()), float(low), float(high), verdict
    )


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else float("nan")


def compare_to_baselines(
    reports: Sequence[Mapping[str, Mapping[str, float]]], *, n_boot: int = 2000, seed: int = 0
) -> list[PairedComparison]:
    """Paired comparisons of the CAM with every baseline on every measure, over the cases' reports."""
    out = []
    for metric in HIGHER_IS_BETTER:
        with_metric = [r for r in reports if metric in r.get("cam", {})]
        if not with_metric:
            continue
        baselines = [b for b in MAP_NAMES[1:] if all(metric in r.get(b, {}) for r in with_metric)]
        for b in baselines:
            cam = [r["cam"][metric] for r in with_metric]
            other = [r[b][metric] for r in with_metric]
            out.append(paired_comparison(metric, b, cam, other, n_boot=n_boot, seed=seed))
    return out


__all__ = [
    "BASELINES",
    "CENTRE_SIGMA",
    "HIGHER_IS_BETTER",
    "MAP_NAMES",
    "BaselineMaps",
    "CasePredictor",
    "CurveSettings",
    "FaithfulnessCase",
    "PairedComparison",
    "Predictor",
    "RoadImputer",
    "baseline_maps",
    "centre_map",
    "compare_to_baselines",
    "curve_auc",
    "energy_inside",
    "faithfulness_report",
    "faithfulness_reports",
    "fit_centre_sigma",
    "paired_comparison",
    "perturbation_curve",
    "pointing_game",
    "random_map",
    "road_images",
    "road_scores",
    "smooth_random_map",
]
