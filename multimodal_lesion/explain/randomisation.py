"""Sanity checks that can fail (Adebayo et al. 2018): cascading model randomisation and the random logit.

Cascading randomisation re-draws the weights stage by stage from the output down: first everything
outside the backbone (fusion head, metadata branch and a map model's fusion blocks), then the backbone's
stages from the top (for EfficientNet ``bn2``, ``conv_head``, ``blocks.6`` ... ``conv_stem``; each keeps
the ones above it randomised). After each stage the CAM of the same cases and classes is computed again
and compared with the trained model's by Spearman rank correlation and SSIM. A faithful map changes: low
similarity. A randomised model whose target-layer activations vanish, or whose map is constant, proves
nothing: that case is **invalid**, never a pass (a constant map has no ranks to correlate).

The default randomiser re-draws each parameter tensor from a Gaussian with that tensor's own trained
mean and standard deviation (BatchNorm running statistics kept), so the network stays alive and
only the learned structure goes; ``reset`` calls each module's ``reset_parameters`` (BatchNorm back
to the identity), the classic recipe, which can kill deep networks (and is then flagged invalid).

The random-logit check explains another class of the same model and case: the map must change.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np
import torch
from scipy import stats
from skimage.metrics import structural_similarity
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.fusion import LesionModel
from .gradcam import (
    CAM_METHODS,
    GradCamExplainer,
    layer_output,
    layer_path,
    meta_placeholder,
    preserved_state,
    resolve_target_layer,
    shown_view,
)

SIMILAR = 0.5  # mean Spearman at or above which a randomised map counts as unchanged
VANISHED = 1e-3  # target-layer activation std, relative to the trained model's, below which activations vanished
Randomiser = Callable[[nn.Module], None]


def _gaussian_redraw(module: nn.Module) -> None:
    """Each parameter tensor re-drawn from N(its mean, its std); a one-value tensor keeps its value."""
    for p in module.parameters():
        with torch.no_grad():
            if p.numel() > 1:
                p.normal_(float(p.mean()), float(p.std()))


def _reset(module: nn.Module) -> None:
    """``reset_parameters`` of every submodule that has one (BatchNorm: weight 1, bias 0, fresh statistics)."""
    for sub in module.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()


RANDOMISERS: Mapping[str, Randomiser] = MappingProxyType({"gaussian": _gaussian_redraw, "reset": _reset})


def _stage_modules(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """Backbone stages, input side first: top-level children with parameters; a container of containers
    (EfficientNet's ``blocks``) is split into its children (``blocks.0`` ...)."""
    out = []
    for name, child in backbone.named_children():
        if not any(True for _ in child.parameters()):
            continue
        parts = list(child.named_children())
        if (
            isinstance(child, (nn.Sequential, nn.ModuleList))
            and parts
            and all(isinstance(c, (nn.Sequential, nn.ModuleList)) for _, c in parts)
        ):
            out += [(f"{name}.{k}", c) for k, c in parts if any(True for _ in c.parameters())]
        else:
            out.append((name, child))
    return out


def randomisation_stages(model: LesionModel) -> list[tuple[str, list[nn.Module]]]:
    """(stage name, modules) from the output down: ``head`` (every part of the model outside the backbone:
    fusion head, metadata branch, a map model's fusion blocks), then the backbone's stages from the top."""
    branch = model.image_branch
    if branch is None:
        raise ConfigError("model randomisation needs a model with an image branch")
    head = [m for m in model.children() if m is not branch]
    head += [m for m in branch.children() if m is not branch.model]  # fusion blocks living in the branch
    backbone = [(name, [m]) for name, m in _stage_modules(branch.model)[::-1]]
    return [("head", head), *backbone]


@dataclass(frozen=True)
class MapSimilarity:
    """Similarity of one case's randomised (or other-class) map to its original map."""

    spearman: float  # NaN when invalid
    ssim: float  # NaN when invalid
    valid: bool
    reason: str = ""  # why invalid: "constant map" | "activations vanished"


def map_similarity(original: np.ndarray, other: np.ndarray, activation_ratio: float = 1.0) -> MapSimilarity:
    """Spearman and SSIM of two maps in [0, 1]; invalid when either map is constant or the other model's
    activations vanished (``activation_ratio`` = its target-layer activation std / the original's)."""
    a, b = np.asarray(original, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if a.shape != b.shape:
        raise ConfigError(f"maps differ in size: {a.shape} vs {b.shape}")
    if not (np.isfinite(activation_ratio) and activation_ratio >= VANISHED):
        return MapSimilarity(float("nan"), float("nan"), False, "activations vanished")
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or np.ptp(a) == 0 or np.ptp(b) == 0:
        return MapSimilarity(float("nan"), float("nan"), False, "constant map")
    rho = float(stats.spearmanr(a.ravel(), b.ravel()).statistic)
    return MapSimilarity(rho, float(structural_similarity(a, b, data_range=1.0)), True)


@dataclass(frozen=True)
class StageResult:
    """One randomisation stage (or the random-logit check) over the cases."""

    stage: str
    cases: list[MapSimilarity] = field(default_factory=list)

    @property
    def n_valid(self) -> int:
        return sum(c.valid for c in self.cases)

    @property
    def spearman(self) -> float:
        """Mean Spearman over the valid cases (NaN when none is valid)."""
        vals = [c.spearman for c in self.cases if c.valid]
        return float(np.mean(vals)) if vals else float("nan")

    @property
    def ssim(self) -> float:
        vals = [c.ssim for c in self.cases if c.valid]
        return float(np.mean(vals)) if vals else float("nan")

    @property
    def verdict(self) -> str:
        """``invalid`` when at most half the cases are valid, else ``changed`` (mean Spearman < SIMILAR) or
        ``unchanged`` (the map survived: the check fails)."""
        if self.n_valid * 2 <= len(self.cases):
            return "invalid"
        return "changed" if self.spearman < SIMILAR else "unchanged"

    def reasons(self) -> str:
        """The invalid cases' reasons with counts, e.g. ``2 constant map``."""
        counts: dict[str, int] = {}
        for c in self.cases:
            if not c.valid:
                counts[c.reason] = counts.get(c.reason, 0) + 1
        return ", ".join(f"{n} {r}" for r, n in counts.items())


def activation_std(model: LesionModel, layer: nn.Module, images: Tensor, meta: Tensor | None = None) -> float:
    """Standard deviation of ``layer``'s output over a batch (one no-grad pass; ``meta`` (B, D) reaches a
    layer after the fusion, zeros when None)."""
    if meta is None:
        meta = meta_placeholder(model, len(images))
    return float(layer_output(model, layer, images, meta).double().std())


@dataclass(frozen=True)
class CamSetup:
    """How the maps are made: the CAM method and layer, and the shown prediction's flips and temperature."""

    method: str = "gradcam"
    target_layer: str = ""  # dotted path (backbone first, then the model); "" = model.cam_layer()
    flip_average: bool = False
    temperature: float = 1.0

    def explainer(self, model: LesionModel) -> GradCamExplainer:
        """A :class:`GradCamExplainer` of ``model`` with this method, layer, flips and temperature."""
        return GradCamExplainer(
            model, self.method, self.target_layer or None, flip_average=self.flip_average, temperature=self.temperature
        )

    def maps(self, model: LesionModel, images: Tensor, meta: Tensor | None, targets: Sequence[int]) -> np.ndarray:
        """CAMs (B, H, W) of ``targets`` on ``model``."""
        return self.explainer(model).explain(images, meta, list(targets))

    def layer_name(self, model: LesionModel) -> str:
        """The target layer's dotted path, so the same layer is found in a randomised copy."""
        return layer_path(model, resolve_target_layer(model, self.target_layer or None))


def maps_and_activation_std(
    setup: CamSetup, model: LesionModel, layer_name: str, images: Tensor, meta: Tensor | None, targets: Sequence[int]
) -> tuple[np.ndarray, float]:
    """The CAMs of ``targets`` and the target layer's activation std, read from the CAM's own forward pass.

    With a batched CAM method the layer's first output holds the unflipped view of every image first
    (the flips are view-major, the identity first), which is what :func:`activation_std` measures with a
    forward pass of its own; ScoreCAM runs many forwards, so it keeps that extra pass.
    """
    layer = resolve_target_layer(model, layer_name)
    if not CAM_METHODS[setup.method].batched:
        return setup.maps(model, images, meta, targets), activation_std(model, layer, images, meta)
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        maps = replace(setup, target_layer=layer_name).maps(model, images, meta, targets)
    finally:
        handle.remove()
    return maps, float(seen[0][: len(images)].double().std())


def cascading_randomisation(
    model: LesionModel,
    images: Tensor,
    meta: Tensor | None,
    targets: Sequence[int],
    cams: np.ndarray,
    setup: CamSetup,
    *,
    randomiser: str | Randomiser = "gaussian",
    seed: int = 0,
) -> list[StageResult]:
    """Randomise a copy of ``model`` stage by stage from the head down and compare each stage's maps of
    ``targets`` with the trained model's ``cams`` (B, H, W); ``model`` itself is untouched.

    Each stage's activation check reuses the activations of its CAM pass
    (:func:`maps_and_activation_std`): one backbone pass per stage instead of two.
    """
    redraw = RANDOMISERS[randomiser] if isinstance(randomiser, str) else randomiser
    path = setup.layer_name(model)
    reference = activation_std(model, resolve_target_layer(model, path), images, meta)
    clone = copy.deepcopy(model)
    results = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, modules in randomisation_stages(clone):
            for module in modules:
                redraw(module)
            randomised, std = maps_and_activation_std(setup, clone, path, images, meta, targets)
            ratio = std / max(reference, 1e-30)
            results.append(
                StageResult(name, [map_similarity(c, r, ratio) for c, r in zip(cams, randomised, strict=True)])
            )
    return results


def other_classes(targets: Sequence[int], num_classes: int, seed: int = 0) -> list[int]:
    """For each explained class, another class drawn at random (seeded)."""
    rng = np.random.default_rng(seed)
    return [int((t + rng.integers(1, num_classes)) % num_classes) for t in targets]


def random_logit_check(
    model: LesionModel,
    images: Tensor,
    meta: Tensor | None,
    targets: Sequence[int],
    cams: np.ndarray,
    setup: CamSetup,
    num_classes: int,
    seed: int = 0,
) -> StageResult:
    """Explain a random other class of the same model and case: the map must change."""
    others = other_classes(targets, num_classes, seed)
    maps = setup.maps(model, images, meta, others)
    return StageResult("random logit", [map_similarity(c, m) for c, m in zip(cams, maps, strict=True)])


def shown_probabilities(
    model: LesionModel, images: Tensor, meta: Tensor | None, flip_average: bool, temperature: float
) -> np.ndarray:
    """Class probabilities (B, C) of the shown prediction computed from the images (no cache)."""
    with preserved_state(model), torch.no_grad():
        model.eval()
        return torch.softmax(shown_view(model, flip_average, temperature, meta)(images).double(), -1).cpu().numpy()


__all__ = [
    "RANDOMISERS",
    "SIMILAR",
    "VANISHED",
    "CamSetup",
    "MapSimilarity",
    "StageResult",
    "activation_std",
    "cascading_randomisation",
    "map_similarity",
    "maps_and_activation_std",
    "other_classes",
    "random_logit_check",
    "randomisation_stages",
    "shown_probabilities",
]
