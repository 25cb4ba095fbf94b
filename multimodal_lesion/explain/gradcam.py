"""Grad-CAM and friends on the image branch of a fused model, with each case's own metadata bound.

pytorch-grad-cam calls ``model(x)`` with one tensor; :class:`BoundMetadata` wraps a
:class:`~multimodal_lesion.models.LesionModel` into that shape (wrap, don't fork). Inside the
explainer's ``with`` block no parameter requires grad and the input does instead, so gradients reach
the target layer even for frozen backbones while the model's ``.grad`` buffers stay untouched; on exit
the hooks are removed and every module's train/eval flag and every ``requires_grad`` flag restored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from types import MappingProxyType, TracebackType
from typing import NamedTuple

import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, HiResCAM, ScoreCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import Tensor, nn

from ..errors import ConfigError
from ..models.fusion import LesionModel

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


class BoundMetadata(nn.Module):
    """A :class:`LesionModel` as a function of the image alone: ``forward(images) -> logits``.

    ``meta`` holds one metadata row per image (or one row for all); change it between calls. The
    input is made a leaf that requires grad, so the graph reaches the backbone's maps even when no
    parameter requires grad (frozen backbones).
    """

    def __init__(self, model: LesionModel, meta: Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        self.meta = meta

    def forward(self, images: Tensor) -> Tensor:
        if torch.is_grad_enabled() and not images.requires_grad:
            images = images.detach().requires_grad_(True)
        meta = _meta_rows(self.meta, len(images))
        meta = meta.to(images.device) if meta is not None else None
        return self.model({"image": images, "meta": meta})

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No-op: inside the explainer no parameter takes part in backward, so the caller's grads stay."""


def resolve_target_layer(model: LesionModel, target_layer: str | nn.Module | None) -> nn.Module:
    """The CAM layer: a module of the backbone, a dotted path inside it, or its last stage (None / "")."""
    branch = model.image_branch
    if branch is None:
        raise ConfigError("Grad-CAM needs a model that looks at the image; this one uses metadata only")
    if isinstance(target_layer, nn.Module):
        if not any(target_layer is m for m in branch.modules()):
            raise ConfigError("explain.target_layer: the given module is not part of the image branch")
        return target_layer
    return branch.target_layer(target_layer or "")


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


class GradCamExplainer:
    """Class activation maps of a registered model's image branch, one map per case.

    Use as a context manager (hooks live inside the block) or call :meth:`explain` directly (it opens
    and closes the block itself).

    Args:
        model: a :class:`LesionModel` that uses the image.
        method: a key of :data:`CAM_METHODS` (gradcam, gradcam++, hirescam, scorecam).
        target_layer: a backbone module or its dotted path (e.g. ``layer3``); None = the backbone's
            last feature stage (``ImageBranch.default_target_layer``).
    """

    def __init__(
        self, model: LesionModel, method: str = "gradcam", target_layer: str | nn.Module | None = None
    ) -> None:
        if not model.uses_image:
            raise ConfigError("Grad-CAM needs a model that looks at the image; this one uses metadata only")
        if method not in CAM_METHODS:
            raise ConfigError(f"explain.method: unknown CAM method '{method}' (valid: {', '.join(CAM_METHODS)})")
        self.model = model
        self.method = method
        self.layer = resolve_target_layer(model, target_layer)
        self._view = BoundMetadata(model)
        self._cam: BaseCAM | None = None
        self._stack: contextlib.ExitStack | None = None

    def __enter__(self) -> GradCamExplainer:
        if self._stack is not None:
            raise RuntimeError("GradCamExplainer is already open")
        with contextlib.ExitStack() as stack:
            stack.enter_context(preserved_state(self.model))
            self.model.requires_grad_(False)
            cam = CAM_METHODS[self.method].cam(model=self._view, target_layers=[self.layer])  # sets eval()
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
        if self._cam is None:
            with self:
                return self.explain(images, meta, targets)
        if images.ndim != 4:
            raise ConfigError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        n = len(images)
        if meta is not None and len(meta) != n:
            raise ConfigError(f"{len(meta)} metadata rows for {n} images")
        cam_targets = _class_targets(targets, n, self._num_classes())
        step = n if CAM_METHODS[self.method].batched else 1
        maps = [
            self._run(
                images[i : i + step],
                meta[i : i + step] if meta is not None else None,
                cam_targets[i : i + step] if cam_targets is not None else None,
            )
            for i in range(0, n, step)
        ]
        return np.concatenate(maps).astype(np.float32)

    def _run(self, images: Tensor, meta: Tensor | None, targets: list[ClassifierOutputTarget] | None) -> np.ndarray:
        cam = self._cam
        if cam is None:
            raise RuntimeError("GradCamExplainer is not open")
        self._view.meta = meta
        try:
            with torch.enable_grad():  # also under a caller's no_grad()
                return cam(input_tensor=images, targets=targets)
        finally:
            cam.outputs = None  # drop the graph the library keeps

    def _num_classes(self) -> int:
        """Width of the logits: the out_features of the head's last linear layer."""
        linears = [m for m in self.model.head.modules() if isinstance(m, nn.Linear)]
        return linears[-1].out_features


__all__ = [
    "CAM_METHODS",
    "BoundMetadata",
    "CamMethod",
    "GradCamExplainer",
    "preserved_state",
    "resolve_target_layer",
]
