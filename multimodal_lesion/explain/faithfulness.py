"""Is a saliency map faithful? Deletion / insertion curves, localisation, model randomisation.

Every measure is reported next to two baselines of the same size: a random map and a centred
Gaussian (dermoscopy lesions are usually central, so beating the centre prior is the bar).

- Deletion / insertion (Petsiuk et al. 2018, RISE): remove (insert) the most salient pixels first in
  ~20 steps and follow the target-class probability; a faithful map gives a low deletion AUC and a
  high insertion AUC. Removed pixels take the training mean colour (deletion) or start from a strong
  blur (insertion), as in RISE; the image's own mean colour can be chosen too.
- Pointing game (Zhang et al. 2016) and energy inside the lesion mask.
- Model randomisation (Adebayo et al. 2018): the map should change when the backbone is
  re-initialised; reported as the Spearman rank correlation between the two maps (low = faithful).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType

import numpy as np
import torch
from scipy import ndimage, stats
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.fusion import LesionModel
from .gradcam import BoundMetadata, GradCamExplainer, preserved_state, resolve_target_layer

Predictor = Callable[[Tensor], Tensor]  # images (N, 3, H, W) -> logits (N, C)
BLUR_SIGMA = 0.1  # blur baseline: Gaussian sigma as a fraction of the longer image side
CENTRE_SIGMA = 0.25  # centre baseline: Gaussian sigma as a fraction of each image side
DEFAULT_STEPS = 20
# deletion: image -> baseline, removed pixels take the training mean colour (zeros once normalised);
# insertion: baseline -> image, starting from a blurred copy. Both as in RISE (Petsiuk et al. 2018).
DEFAULT_BASELINES: Mapping[str, str] = MappingProxyType({"deletion": "zero", "insertion": "blur"})
CURVE_MODES = tuple(DEFAULT_BASELINES)


def _blurred(image: Tensor) -> Tensor:
    """A strongly blurred copy (C, H, W): the shapes are gone, the colours remain."""
    sigma = BLUR_SIGMA * max(image.shape[-2:])
    arr = ndimage.gaussian_filter(image.detach().cpu().double().numpy(), sigma=(0, sigma, sigma), mode="reflect")
    return torch.as_tensor(arr, dtype=image.dtype, device=image.device)


def _zero_image(image: Tensor) -> Tensor:
    """Zeros: the training mean colour once normalised (RISE's deletion substrate)."""
    return torch.zeros_like(image)


def _mean_image(image: Tensor) -> Tensor:
    """The image's per-channel mean everywhere."""
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
        predict: normalised images (N, 3, H, W) -> logits (N, C), e.g. a :class:`BoundMetadata`.
        image: one normalised image (3, H, W).
        saliency: (H, W) map; higher = more important.
        target: class whose softmax probability is followed.
        mode: ``deletion`` (image -> baseline) or ``insertion`` (baseline -> image).
        steps: number of steps; all steps go through ``predict`` in one batch.
        baseline: ``zero`` | ``mean`` | ``blur`` | an image (3, H, W) that replaces removed pixels;
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


def random_map(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Uniform random saliency (H, W): the chance baseline."""
    return np.random.default_rng(seed).random(shape)


def centre_map(shape: tuple[int, int], sigma: float = CENTRE_SIGMA) -> np.ndarray:
    """Centred Gaussian (H, W) with sigma a fraction of each side, peak 1: the 'lesions are central' prior."""
    h, w = shape
    y = (np.arange(h) - (h - 1) / 2) / (sigma * h)
    x = (np.arange(w) - (w - 1) / 2) / (sigma * w)
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2))


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


def randomisation_check(cam_trained: np.ndarray, cam_random: np.ndarray) -> float:
    """Spearman rank correlation between two maps of one image (low = the map depends on the weights).

    0.0 when either map is constant (nothing to rank: the maps share no structure).
    """
    a, b = np.asarray(cam_trained, dtype=np.float64).ravel(), np.asarray(cam_random, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ConfigError(f"maps differ in size: {np.shape(cam_trained)} vs {np.shape(cam_random)}")
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(stats.spearmanr(a, b).statistic)


def faithfulness_report(
    model: LesionModel,
    image: Tensor,
    meta: Tensor | None,
    saliency: np.ndarray,
    target: int,
    *,
    mask: np.ndarray | None = None,
    steps: int = DEFAULT_STEPS,
    baseline: str | Tensor | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Deletion/insertion AUCs (and with a mask: pointing game, energy inside) for the map and its baselines.

    Returns ``{"map"|"random"|"centre": {"deletion_auc", "insertion_auc"[, "pointing_game", "energy_inside"]}}``.
    ``image`` (3, H, W) is normalised, ``meta`` (D,) or (1, D) is bound to every perturbed copy.
    """
    shape = (image.shape[-2], image.shape[-1])
    image = image.to(next(model.parameters()).device)
    maps = {"map": np.asarray(saliency), "random": random_map(shape, seed), "centre": centre_map(shape)}
    predict = BoundMetadata(model, None if meta is None else meta.reshape(1, -1))
    out: dict[str, dict[str, float]] = {}
    with preserved_state(model):
        model.eval()
        for name, sal in maps.items():
            out[name] = {
                f"{mode}_auc": curve_auc(
                    perturbation_curve(predict, image, sal, target, mode=mode, steps=steps, baseline=baseline)
                )
                for mode in CURVE_MODES
            }
            if mask is not None:
                out[name]["pointing_game"] = float(pointing_game(sal, mask))
                out[name]["energy_inside"] = energy_inside(sal, mask)
    return out


def _backbone(model: LesionModel) -> nn.Module:
    """The timm backbone of ``model``'s image branch."""
    if model.image_branch is None:
        raise ConfigError("model randomisation needs a model with an image branch")
    return model.image_branch.model


def _backbone_blocks(model: LesionModel) -> list[nn.Module]:
    """Top-level backbone children that hold parameters, input side first."""
    return [m for m in _backbone(model).children() if any(True for _ in m.parameters())]


def _reinitialise(module: nn.Module) -> None:
    """Fresh random parameters (and BatchNorm statistics) for every submodule of ``module``."""
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
        elif any(True for _ in sub.parameters(recurse=False)):
            for p in sub.parameters(recurse=False):
                nn.init.normal_(p, std=0.02)


def randomised_copy(model: LesionModel, *, blocks: int | None = None, seed: int = 0) -> LesionModel:
    """Deep copy whose backbone is re-initialised: all of it (None) or its top ``blocks`` blocks.

    ``blocks=k`` re-initialises the k top-level backbone blocks nearest the output (one step of
    Adebayo et al.'s cascading randomisation); the original model is untouched, the global RNG too.
    """
    if not model.uses_image:
        raise ConfigError("model randomisation needs a model with an image branch")
    clone = copy.deepcopy(model)
    chosen = _backbone_blocks(clone)[::-1][:blocks]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for block in chosen:
            _reinitialise(block)
    return clone


def cascading_randomisation(model: LesionModel, seed: int = 0) -> Iterator[tuple[int, LesionModel]]:
    """(k, copy with the top k backbone blocks re-initialised) for k = 1 .. number of blocks."""
    for k in range(1, len(_backbone_blocks(model)) + 1):
        yield k, randomised_copy(model, blocks=k, seed=seed)


def layer_path(model: LesionModel, layer: nn.Module) -> str:
    """Dotted path of ``layer`` inside the backbone (so the same layer can be found in a copy)."""
    for name, module in _backbone(model).named_modules():
        if module is layer:
            return name
    raise ConfigError("the target layer is not part of the backbone")


def randomised_cams(
    model: LesionModel,
    images: Tensor,
    meta: Tensor | None,
    targets: Sequence[int],
    *,
    method: str = "gradcam",
    target_layer: str | nn.Module | None = None,
    blocks: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """CAMs (B, H, W) of the same targets after re-initialising the backbone of a copy of ``model``.

    Pass the trained model's explained classes as ``targets`` so both maps explain the same class.
    """
    path = layer_path(model, resolve_target_layer(model, target_layer))
    clone = randomised_copy(model, blocks=blocks, seed=seed)
    return GradCamExplainer(clone, method, path).explain(images, meta, list(targets))


__all__ = [
    "BASELINES",
    "Predictor",
    "cascading_randomisation",
    "centre_map",
    "curve_auc",
    "energy_inside",
    "faithfulness_report",
    "layer_path",
    "perturbation_curve",
    "pointing_game",
    "random_map",
    "randomisation_check",
    "randomised_cams",
    "randomised_copy",
]
