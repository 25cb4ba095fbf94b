"""Grad-CAM and friends on a fused model's image path, with each case's own metadata bound.

The default layer is ``model.cam_layer()``: the last feature map after the fusion. For a late model
that is the backbone's last stage, whose activations the metadata cannot change (it moves the map only
through the gradient weights); for a model that fuses on the maps (``model.fuses_on_maps``) it is a
layer the metadata conditions, so the map itself depends on the patient.

pytorch-grad-cam calls ``model(x)`` with one tensor; :class:`BoundMetadata` wraps a
:class:`~multimodal_lesion.models.LesionModel` into that shape (wrap, don't fork). The wrapper is the
*shown prediction as a function of the image*: the embedding averaged over the same flips as the
displayed probability (the frozen path's cached embeddings are flip-averaged) and the logits divided by
the run's temperature, so ``softmax(wrapper(x))`` is the displayed calibrated probability. The CAM
differentiates the explained class's calibrated logit of that function (for Grad-CAM and HiResCAM the
temperature does not change the normalised map); with flips, each flipped view's map is taken back to
the image's orientation and the views are averaged before the map is scaled to [0, 1].

Inside the explainer's ``with`` block no parameter requires grad and the input does instead, so
gradients reach the target layer even for frozen backbones while the model's ``.grad`` buffers stay
untouched; on exit the hooks are removed and every module's train/eval flag and ``requires_grad`` flag
restored.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, ScoreCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from ..errors import ConfigError
from ..models import FLIPS
from ..models.fusion import LesionModel

Flip = tuple[int, ...]  # tensor dims flipped, as in models.FLIPS: () | (3,) | (2,) | (2, 3)
NO_FLIP: tuple[Flip, ...] = ((),)

SCORECAM_BATCH = 64  # masked images per forward pass in ScoreCAM (the library's default is 16)


class CamMethod(NamedTuple):
    """A pytorch-grad-cam class and whether it can explain several cases in one call."""

    cam: type[BaseCAM]
    batched: bool  # ScoreCAM feeds one case's masked copies per call, so it needs that case's metadata


CAM_METHODS: Mapping[str, CamMethod] = MappingProxyType(
    {
        "gradcam": CamMethod(GradCAM, batched=True),
        "gradcam++": CamMethod(GradCAMPlusPlus, batched=True),
        "hirescam": CamMethod(HiResCAM, batched=True),
        "scorecam": CamMethod(ScoreCAM, batched=False),
    }
)


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every module's train/eval flag and every parameter's ``requires_grad`` on exit."""
    training = {module: module.training for module in model.modules()}
    requires_grad = {param: param.requires_grad for param in model.parameters()}
    try:
        yield model
    finally:
        for module, flag in training.items():
            module.training = flag
        for param, flag in requires_grad.items():
            param.requires_grad_(flag)


def _meta_rows(meta: Tensor | None, n: int) -> Tensor | None:
    """``meta`` for ``n`` images: one row per image, or one row repeated."""
    if meta is None or len(meta) == n:
        return meta
    if len(meta) == 1:
        return meta.expand(n, -1)
    raise ConfigError(f"{len(meta)} metadata rows bound for a batch of {n} images")


def flip_views(images: Tensor, flips: Sequence[Flip]) -> Tensor:
    """The V flipped copies of a batch (B, 3, H, W), view-major: (V*B, 3, H, W)."""
    return torch.cat([images.flip(d) if d else images for d in flips])


class BoundMetadata(nn.Module):
    """A :class:`LesionModel` as a function of the image alone: ``forward(images) -> calibrated logits``.

    ``meta`` holds one metadata row per image (or one row for all); change it between calls. The
    ``flips`` views run in one pass (:func:`view_logits`, so a hooked layer is called once) and the
    logits are divided by ``temperature``: with the run's flips and temperature,
    ``softmax(forward(x))`` is the displayed probability. The input is made a leaf that requires grad,
    so the graph reaches the backbone's maps even when no parameter requires grad (frozen backbones).
    """

    def __init__(
        self,
        model: LesionModel,
        meta: Tensor | None = None,
        *,
        flips: Sequence[Flip] = NO_FLIP,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if model.image_branch is None:
            raise ConfigError("this model does not look at the image")
        self.model = model
        self.meta = meta
        self.flips = tuple(tuple(f) for f in flips) or NO_FLIP
        self.temperature = float(temperature)

    def forward(self, images: Tensor) -> Tensor:
        if torch.is_grad_enabled() and not images.requires_grad:
            images = images.detach().requires_grad_(True)
        meta = _meta_rows(self.meta, len(images))
        meta = meta.to(images.device) if meta is not None else None
        return view_logits(self.model, flip_views(images, self.flips), meta, len(self.flips)) / self.temperature

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: inside the explainer no parameter takes part in backward, so the caller's grads stay."""


def meta_for_views(meta: Tensor | None, views: int) -> Tensor | None:
    """Metadata rows (B, D) repeated for ``views`` view-major copies of the images: (V*B, D)."""
    return None if meta is None or views == 1 else meta.repeat(views, 1)


def state_logits(model: LesionModel, state: Tensor | None, meta: Tensor | None) -> Tensor:
    """Logits from an image state (``model.image_state``; None for a metadata-only model) and the metadata."""
    return model.forward_head(None, meta) if state is None else model.from_image_state(state, meta)


def view_logits(model: LesionModel, views: Tensor, meta: Tensor | None, n_views: int) -> Tensor:
    """Logits (B, C) of images given as ``n_views`` view-major copies (V*B, 3, H, W), in one backbone pass.

    A late model averages the pooled embedding over the views (the frozen path's cached embedding); a
    model that fuses on the maps (``model.fuses_on_maps``) runs each view with the case's metadata and
    averages the logits (the mean over views of its cached-maps path), since flipped maps do not average.
    """
    state = model.image_state(views)
    if n_views == 1:
        return model.from_image_state(state, meta)
    if model.fuses_on_maps:
        logits = model.from_image_state(state, meta_for_views(meta, n_views))
        return logits.reshape(n_views, -1, logits.shape[-1]).mean(0)
    return model.from_image_state(state.reshape(n_views, -1, *state.shape[1:]).mean(0), meta)


def shown_view(model: LesionModel, flip_average: bool, temperature: float, meta: Tensor | None = None) -> BoundMetadata:
    """The displayed prediction as a function of the image: flips as the cached embedding, temperature."""
    return BoundMetadata(model, meta, flips=FLIPS if flip_average else NO_FLIP, temperature=temperature)


class ViewAveragedCam:
    """Mixin over a pytorch-grad-cam class: the raw maps of the V flipped views, each taken back to the
    image's orientation, averaged, then scaled to [0, 1] once (one map of the flip-averaged output)."""

    model: BoundMetadata
    target_layers: list[nn.Module]
    activations_and_grads: Any

    def compute_cam_per_layer(self, input_tensor: Tensor, targets: list[Any], eigen_smooth: bool) -> list[np.ndarray]:
        flips = self.model.flips
        if flips == NO_FLIP:
            return super().compute_cam_per_layer(input_tensor, targets, eigen_smooth)  # type: ignore[misc]
        acts = self.activations_and_grads.activations[0].numpy()
        grads = [g.numpy() for g in self.activations_and_grads.gradients]
        views = flip_views(input_tensor.detach(), flips)
        raw = self.get_cam_image(  # type: ignore[attr-defined]
            views, self.target_layers[0], list(targets) * len(flips), acts, grads[0] if grads else None, eigen_smooth
        )
        height, width = input_tensor.shape[-2:]
        up = np.stack([cv2.resize(m, (width, height)) for m in np.maximum(raw, 0)])
        up = up.reshape(len(flips), len(input_tensor), height, width)
        back = [
            np.flip(view, axis=tuple(d - 1 for d in flip)) if flip else view
            for view, flip in zip(up, flips, strict=True)
        ]
        return [scale_cam_image(np.mean(back, axis=0))[:, None]]


def view_averaged(cam: type[BaseCAM]) -> type[BaseCAM]:
    """``cam`` with :class:`ViewAveragedCam` mixed in."""
    return type(f"ViewAveraged{cam.__name__}", (ViewAveragedCam, cam), {})


#: The classes the explainer instantiates: each registered method with the view averaging mixed in.
VIEW_AVERAGED_CAMS: Mapping[str, type[BaseCAM]] = MappingProxyType(
    {name: view_averaged(m.cam) for name, m in CAM_METHODS.items()}
)


def resolve_target_layer(model: LesionModel, target_layer: str | nn.Module | None) -> nn.Module:
    """The CAM layer: a module of the model, a dotted path, or ``model.cam_layer()`` (None / "").

    A path is looked up inside the backbone first (``blocks.5``, ``layer3``: what runs have always
    named), then in the whole model (a fusion block after the backbone's maps). The default is the last
    feature map after the fusion, so for a model that fuses on the maps the CAM depends on the patient.
    """
    if model.image_branch is None:
        raise ConfigError("Grad-CAM needs a model that looks at the image; this one uses metadata only")
    if isinstance(target_layer, nn.Module):
        if not any(target_layer is m for m in model.modules()):
            raise ConfigError("explain.target_layer: the given module is not part of the model")
        return target_layer
    if not target_layer:
        return model.cam_layer()
    for root in (model.image_branch.model, model):
        try:
            return root.get_submodule(target_layer)
        except AttributeError:
            continue
    raise ConfigError(
        f"explain.target_layer: backbone '{model.image_branch.backbone}' (and the model) has no layer '{target_layer}'"
    )


def _class_targets(targets: list[int] | None, n: int, num_classes: int) -> list[ClassifierOutputTarget] | None:
    """pytorch-grad-cam targets for explicit class indices; None keeps the predicted class."""
    if targets is None:
        return None
    if len(targets) != n:
        raise ConfigError(f"{len(targets)} targets given for {n} images")
    bad = [t for t in targets if not 0 <= int(t) < num_classes]
    if bad:
        raise ConfigError(f"target class {bad[0]} out of range 0..{num_classes - 1}")
    return [ClassifierOutputTarget(int(t)) for t in targets]


@dataclass(frozen=True)
class ScoredMaps:
    """Maps (B, H, W) in [0, 1] and the probability (B,) of each explained class in the pass that made them."""

    maps: np.ndarray
    probabilities: np.ndarray


class GradCamExplainer:
    """Class activation maps of a registered model's image path, one map per case.

    Use as a context manager (hooks live inside the block) or call :meth:`explain` directly (it opens
    and closes the block itself).

    Args:
        model: a :class:`LesionModel` that uses the image.
        method: a key of :data:`CAM_METHODS` (gradcam, gradcam++, hirescam, scorecam).
        target_layer: a module of the model or its dotted path (inside the backbone first, e.g.
            ``layer3``, else in the whole model); None = ``model.cam_layer()``, the last feature map
            after the fusion.
        flip_average: explain the embedding averaged over the 4 flips (what the frozen path's cached
            embeddings are), each view's map taken back to the image's orientation and averaged.
        temperature: the logits are divided by it, so the explained probability is the calibrated one.
    """

    def __init__(
        self,
        model: LesionModel,
        method: str = "gradcam",
        target_layer: str | nn.Module | None = None,
        *,
        flip_average: bool = False,
        temperature: float = 1.0,
    ) -> None:
        if not model.uses_image:
            raise ConfigError("Grad-CAM needs a model that looks at the image; this one uses metadata only")
        if method not in CAM_METHODS:
            raise ConfigError(f"explain.method: unknown CAM method '{method}' (valid: {', '.join(CAM_METHODS)})")
        self.model = model
        self.method = method
        self.layer = resolve_target_layer(model, target_layer)
        self._view = shown_view(model, flip_average, temperature)
        self._cam: BaseCAM | None = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> GradCamExplainer:
        if self._stack is not None:
            raise RuntimeError("GradCamExplainer is already open")
        with contextlib.ExitStack() as stack:
            stack.enter_context(preserved_state(self.model))
            self.model.requires_grad_(False)
            cam = VIEW_AVERAGED_CAMS[self.method](model=self._view, target_layers=[self.layer])  # sets eval()
            cam.batch_size = SCORECAM_BATCH
            stack.callback(cam.activations_and_grads.release)
            self._cam, self._stack = cam, stack.pop_all()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Remove the hooks and restore the model's flags; exceptions propagate."""
        stack, self._stack, self._cam = self._stack, None, None
        self._view.meta = None
        if stack is not None:
            stack.close()

    def explain(self, images: Tensor, meta: Tensor | None, targets: list[int] | None = None) -> np.ndarray:
        """Maps (B, H, W) float32 in [0, 1] for normalised images (B, 3, H, W) and their metadata (B, D).

        ``targets`` are class indices, one per image; None explains each image's predicted class.
        ``meta`` may be None for models that ignore metadata.
        """
        return self.explain_scored(images, meta, targets).maps

    def explain_scored(self, images: Tensor, meta: Tensor | None, targets: list[int] | None = None) -> ScoredMaps:
        """:meth:`explain` plus the explained probability of each case, read from the CAM's own forward pass."""
        if self._cam is None:
            with self:
                return self.explain_scored(images, meta, targets)
        if images.ndim != 4:
            raise ConfigError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        n = len(images)
        if meta is not None and len(meta) != n:
            raise ConfigError(f"{len(meta)} metadata rows for {n} images")
        cam_targets = _class_targets(targets, n, self._num_classes())
        step = n if CAM_METHODS[self.method].batched else 1
        parts = [
            self._run(
                images[i : i + step],
                meta[i : i + step] if meta is not None else None,
                cam_targets[i : i + step] if cam_targets is not None else None,
            )
            for i in range(0, n, step)
        ]
        return ScoredMaps(
            np.concatenate([m for m, _ in parts]).astype(np.float32), np.concatenate([p for _, p in parts])
        )

    def _run(
        self, images: Tensor, meta: Tensor | None, targets: list[ClassifierOutputTarget] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        cam = self._cam
        if cam is None:
            raise RuntimeError("GradCamExplainer is not open")
        self._view.meta = meta
        try:
            with torch.enable_grad():  # also under a caller's no_grad()
                maps = cam(input_tensor=images, targets=targets)
            probs = torch.softmax(cam.outputs.detach().double(), -1)
            chosen = [t.category for t in targets] if targets is not None else probs.argmax(-1).tolist()
            return maps, probs[torch.arange(len(probs)), chosen].cpu().numpy()
        finally:
            cam.outputs = None  # drop the graph the library keeps

    def _num_classes(self) -> int:
        """Width of the logits: the out_features of the head's last linear layer."""
        linears = [m for m in self.model.head.modules() if isinstance(m, nn.Linear)]
        return linears[-1].out_features


@dataclass(frozen=True)
class LayerGeometry:
    """Where a CAM lives: the layer's dotted path, its stride in pixels and its map's grid (rows, columns)."""

    name: str
    stride: int
    grid: tuple[int, int]

    def __str__(self) -> str:
        return f"{self.name} (stride {self.stride}, {self.grid[0]}x{self.grid[1]} grid)"


def layer_path(model: LesionModel, layer: nn.Module) -> str:
    """Dotted path of ``layer`` (inside the backbone where it is there), so the same layer is found in a copy."""
    if model.image_branch is None:
        raise ConfigError("this model does not look at the image")
    for root in (model.image_branch.model, model):
        for name, module in root.named_modules():
            if module is layer:
                return name
    raise ConfigError("the target layer is not part of the model")


def meta_placeholder(model: LesionModel, n: int = 1) -> Tensor | None:
    """Zero metadata rows (n, D) for a pass whose output ignores their values (a layer's shape); None for a
    model that ignores the metadata. A model without a metadata branch of known width needs a real row."""
    if not model.uses_meta:
        return None
    if model.meta_branch is None:
        raise ConfigError("this model reads the metadata inside the network: pass a metadata row")
    return torch.zeros(n, model.meta_branch.in_dim, device=next(model.parameters()).device)


def layer_output(model: LesionModel, layer: nn.Module, images: Tensor, meta: Tensor | None) -> Tensor:
    """``layer``'s output in one no-grad forward pass of the whole model (eval mode, flags restored)."""
    seen: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    try:
        with preserved_state(model), torch.no_grad():
            model.eval()
            model.from_image_state(model.image_state(images), meta)
    finally:
        handle.remove()
    if not seen:
        raise ConfigError("explain.target_layer: the layer is not on the image's path through the model")
    return seen[0]


def layer_geometry(
    model: LesionModel,
    target_layer: str | nn.Module | None,
    image_size: tuple[int, int],
    meta: Tensor | None = None,
) -> LayerGeometry:
    """The CAM layer's name, stride and grid at ``image_size`` (height, width), from one forward pass.

    ``meta`` (1, D) is any metadata row (zeros by default): a layer after the fusion needs one, its
    shape does not depend on it. The stride is the power of two nearest the ratio of image to map height
    (TF-style padding rounds the grid up: 168 rows at stride 16 give 11).
    """
    layer = resolve_target_layer(model, target_layer)
    device = next(model.parameters()).device
    meta = meta_placeholder(model) if meta is None else meta[:1]
    out = layer_output(model, layer, torch.zeros(1, 3, *image_size, device=device), meta)
    rows, cols = out.shape[-2:]
    stride = 2 ** round(math.log2(image_size[0] / rows))
    return LayerGeometry(layer_path(model, layer), int(stride), (int(rows), int(cols)))


__all__ = [
    "CAM_METHODS",
    "NO_FLIP",
    "VIEW_AVERAGED_CAMS",
    "BoundMetadata",
    "CamMethod",
    "GradCamExplainer",
    "LayerGeometry",
    "ScoredMaps",
    "ViewAveragedCam",
    "flip_views",
    "layer_geometry",
    "layer_output",
    "layer_path",
    "meta_for_views",
    "meta_placeholder",
    "preserved_state",
    "resolve_target_layer",
    "shown_view",
    "state_logits",
    "view_averaged",
    "view_logits",
]
