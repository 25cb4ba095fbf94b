"""Model registry: adding a fusion model is writing one ``@register_model`` factory (timm's pattern).

A factory is called as ``factory(meta_dim=..., num_classes=..., cfg=..., image_branch=..., meta_layout=...)`` and
returns a :class:`~multimodal_lesion.models.fusion.LesionModel`. The first line of its docstring is
the model's description (``mmlesion models`` prints it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..config import ModelConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    from .fusion import LesionModel
    from .image_branch import ImageBranch
    from .map_fusion import MetaLayout

ModelFactory = Callable[..., "LesionModel"]

_model_factories: dict[str, ModelFactory] = {}  # name -> factory; the only mutable module state


def register_model(fn: ModelFactory) -> ModelFactory:
    """Register ``fn`` under its function name; a second factory with the same name is a bug."""
    name = fn.__name__
    if name in _model_factories:
        raise ValueError(f"model '{name}' is already registered")
    _model_factories[name] = fn
    return fn


def fuses_on_maps(name: str) -> bool:
    """True when model ``name`` fuses the metadata into the feature maps (its factory says so)."""
    return bool(getattr(_factory(name), "fuses_on_maps", False))


def check_model_mode(name: str, mode: str) -> None:
    """Refuse a map-fusion model in ``frozen`` mode, whose cached pooled embeddings have no maps to fuse into."""
    if mode == "frozen" and fuses_on_maps(name):
        raise ConfigError(
            f"model '{name}' fuses the metadata into the feature maps, which train.mode='frozen' does not keep "
            "(pooled embeddings only): use train.mode='partial' (cached maps, as cheap) or 'end2end'"
        )


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_model_factories)


def _factory(name: str) -> ModelFactory:
    try:
        return _model_factories[name]
    except KeyError:
        raise ConfigError(f"unknown model '{name}' (valid: {', '.join(list_models())})") from None


def model_description(name: str) -> str:
    """First line of the factory's docstring: a one-line description of model ``name``."""
    doc = (_factory(name).__doc__ or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def create_model(
    name: str,
    *,
    meta_dim: int,
    num_classes: int = 7,
    cfg: ModelConfig | None = None,
    image_branch: ImageBranch | None = None,
    meta_layout: MetaLayout | None = None,
) -> LesionModel:
    """Build registered model ``name``.

    Args:
        name: a registered model (see :func:`list_models`).
        meta_dim: width of the encoded patient features (``MetadataEncoder`` output).
        num_classes: number of logits.
        cfg: backbone, weights and head sizes; defaults to ``ModelConfig()``.
        image_branch: an existing :class:`ImageBranch` to share (e.g. one frozen backbone for every
            model of an ablation); when None, models that look at the image build one from ``cfg``.
        meta_layout: which encoded columns belong to which patient feature and their "missing"
            encoding (models that read features one by one, e.g. ``cross_attention``); None: each
            column is a feature of its own that is never missing.
    """
    factory = _factory(name)
    if num_classes < 1:
        raise ConfigError(f"model '{name}': num_classes must be >= 1, got {num_classes}")
    if meta_dim < 0:
        raise ConfigError(f"model '{name}': meta_dim must be >= 0, got {meta_dim}")
    return factory(
        meta_dim=meta_dim,
        num_classes=num_classes,
        cfg=cfg or ModelConfig(),
        image_branch=image_branch,
        meta_layout=meta_layout,
    )


__all__ = [
    "ModelFactory",
    "check_model_mode",
    "create_model",
    "fuses_on_maps",
    "list_models",
    "model_description",
    "register_model",
]
