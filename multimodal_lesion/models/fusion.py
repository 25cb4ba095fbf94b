"""Fusion heads, the one model class they plug into, and the registered models.

Every model is ``LesionModel(head, image_branch, meta_branch, map_fusion)``: branches that a head does
not use are None, and ``forward`` is the same code for all. The models here are late fusion: gating and
FiLM act per channel, so applying them to the pooled embedding equals applying them to the feature maps
and pooling (average pooling commutes with a per-channel affine map): the frozen-embedding path and the
live path agree, and the metadata never changes the maps. The map-fusion models
(:mod:`~multimodal_lesion.models.map_fusion`) have a ``map_fusion`` that conditions the maps instead.

Every model splits into an image state that does not depend on the metadata (:meth:`LesionModel.image_state`:
the pooled embedding of a late model, the maps at the fusion point of a map-fusion model) and the rest
(:meth:`LesionModel.from_image_state`), which explanations evaluate for many metadata per image.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import ConfigError
from .image_branch import ImageBranch
from .metadata_branch import MetadataBranch
from .registry import register_model

if TYPE_CHECKING:
    from .map_fusion import MapFusion, MetaLayout


def mlp_classifier(in_dim: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout -> Linear -> ReLU -> Dropout -> Linear: the shared classifier of the fusion heads."""
    return nn.Sequential(
        nn.Dropout(dropout), nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
    )


class FusionHead(nn.Module):
    """Maps (image embedding, metadata embedding) to logits; a subclass declares which it reads."""

    uses_image: bool = True
    uses_meta: bool = True

    def __init__(self, image_dim: int, meta_dim: int, num_classes: int, hidden: int, dropout: float) -> None:
        super().__init__()

    def forward(self, image: Tensor | None, meta: Tensor | None) -> Tensor:
        raise NotImplementedError

    def image_term(self, image: Tensor) -> Tensor | None:
        """The image's whole contribution to the head in eval mode, narrower than the image, when the head
        reads the image only through a linear layer; None when it mixes image and metadata otherwise
        (gating, FiLM). ``from_image_term(image_term(image), meta) == forward(image, meta)``."""
        return None

    def from_image_term(self, term: Tensor, meta: Tensor | None) -> Tensor:
        """Logits from :meth:`image_term`'s output and the metadata embedding (eval mode)."""
        raise NotImplementedError(f"{type(self).__name__} has no image term")


class LinearImageHead(FusionHead):
    """Dropout + linear layer on the pooled image features."""

    uses_meta = False

    def __init__(self, image_dim: int, meta_dim: int, num_classes: int, hidden: int, dropout: float) -> None:
        super().__init__(image_dim, meta_dim, num_classes, hidden, dropout)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(image_dim, num_classes))

    def forward(self, image: Tensor | None, meta: Tensor | None) -> Tensor:
        return self.classifier(image)

    def image_term(self, image: Tensor) -> Tensor | None:
        """The logits themselves: the metadata plays no part."""
        return self.classifier(image)

    def from_image_term(self, term: Tensor, meta: Tensor | None) -> Tensor:
        return term


class MetadataHead(FusionHead):
    """Linear layer on the metadata embedding (together with the branch: an MLP)."""

    uses_image = False

    def __init__(self, image_dim: int, meta_dim: int, num_classes: int, hidden: int, dropout: float) -> None:
        super().__init__(image_dim, meta_dim, num_classes, hidden, dropout)
        self.classifier = nn.Linear(meta_dim, num_classes)

    def forward(self, image: Tensor | None, meta: Tensor | None) -> Tensor:
        return self.classifier(meta)


class ConcatHead(FusionHead):
    """Late fusion: MLP over the image features concatenated with the metadata embedding."""

    def __init__(self, image_dim: int, meta_dim: int, num_classes: int, hidden: int, dropout: float) -> None:
        super().__init__(image_dim, meta_dim, num_classes, hidden, dropout)
        self.image_dim = image_dim
        self.classifier = mlp_classifier(image_dim + meta_dim, hidden, num_classes, dropout)

    def forward(self, image: Tensor | None, meta: Tensor | None) -> Tensor:
        assert image is not None and meta is not None  # uses_image and uses_meta: LesionModel passes both
        return self.classifier(torch.cat([image, meta], dim=1))

    def image_term(self, image: Tensor) -> Tensor | None:
        """The image columns of the first linear layer times the image (B, hidden): dropout is off in eval mode."""
        return image @ self._first().weight[:, : self.image_dim].T

    def from_image_term(self, term: Tensor, meta: Tensor | None) -> Tensor:
        assert meta is not None  # uses_meta: LesionModel passes it
        first = self._first()
        hidden = term + torch.nn.functional.linear(meta, first.weight[:, self.image_dim :], first.bias)
        return self.classifier[2:](hidden)

    def _first(self) -> nn.Linear:
        """The classifier's first linear layer (after the input dropout)."""
        return cast(nn.Linear, self.classifier[1])


class GatedHead(FusionHead):
    """MetaBlock-style (Pacheco & Krohling 2021): a sigmoid gate and a bias per image channel from metadata."""

    def __init__(self, image_dim: int, meta_dim: int, num_classes: int, hidden: int, dropout: float) -> None:
        super().__init__(image_dim, meta_dim, num_classes, hidden, dropout)
        self.gate = nn.Linear(meta_dim, image_dim)
        self.shift = nn.Linear(meta_dim, image_dim)
        self.classifier = mlp_classifier(image_dim, hidden, num_classes, dropout)

    def forward(self, image: Tensor | None, meta: Tensor | None) -> Tensor:
        assert image is not None and meta is not None  # uses_image and uses_meta: LesionModel passes both
        return self.classifier(image * torch.sigmoid(self.gate(meta)) + self.shift(meta))


class FiLMHead(FusionHead):
    """FiLM / DAFT: metadata predicts a per-channel scale and shift, ``x * (1 + gamma) + beta``.

    The generator starts at zero, so an untrained head sees the image features unchanged.
    """

    def __init__(self, image_dim: int, meta_dim: int, num_classes: int, hidden: int, dropout: float) -> None:
        super().__init__(image_dim, meta_dim, num_classes, hidden, dropout)
        self.film = nn.Linear(meta_dim, 2 * image_dim)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.classifier = mlp_classifier(image_dim, hidden, num_classes, dropout)

    def forward(self, image: Tensor | None, meta: Tensor | None) -> Tensor:
        assert image is not None and meta is not None  # uses_image and uses_meta: LesionModel passes both
        gamma, beta = self.film(meta).chunk(2, dim=1)
        return self.classifier(image * (1 + gamma) + beta)


def _require(value: Tensor | None, what: str) -> Tensor:
    if value is None:
        raise KeyError(f"this model needs the batch key '{what}'")
    return value


class LesionModel(nn.Module):
    """One model class for every registered model: optional image and metadata branches + a fusion head.

    Args:
        head: the fusion head (its ``uses_image`` / ``uses_meta`` say what it reads).
        image_branch: the timm backbone branch, None when the head ignores the image.
        meta_branch: the metadata MLP of a late model, None when the head ignores the metadata.
        map_fusion: a map-fusion model's conditioning of the backbone's tail (its ``forward`` gives
            the last map after the fusion and the head's metadata summary); None for late models.
    """

    def __init__(
        self,
        head: FusionHead,
        image_branch: ImageBranch | None = None,
        meta_branch: MetadataBranch | None = None,
        map_fusion: MapFusion | None = None,
    ) -> None:
        super().__init__()
        self.head = head
        self.image_branch = image_branch
        self.meta_branch = meta_branch
        self.map_fusion = map_fusion

    @property
    def uses_image(self) -> bool:
        return self.image_branch is not None

    @property
    def uses_meta(self) -> bool:
        return self.meta_branch is not None or self.map_fusion is not None

    @property
    def fuses_on_maps(self) -> bool:
        """True when the metadata conditions the feature maps (map-fusion models), False for late fusion."""
        return self.map_fusion is not None

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Logits (B, C) from a batch dict: ``embedding`` (frozen), ``maps`` (partial) or ``image``; ``meta``."""
        maps = batch.get("maps")
        if maps is not None and self.image_branch is not None:
            return self.forward_maps(maps, batch.get("meta"))
        embedding = batch.get("embedding")
        if embedding is None and self.image_branch is not None:
            return self.from_image_state(self.image_state(_require(batch.get("image"), "image")), batch.get("meta"))
        return self.forward_head(embedding, batch.get("meta"))

    def _branch(self) -> ImageBranch:
        if self.image_branch is None:
            raise ConfigError("this model does not look at the image: it has no image state or feature maps")
        return self.image_branch

    def image_state(self, images: Tensor) -> Tensor:
        """The metadata-independent part of the forward pass on normalised images (B, 3, H, W).

        Late models: the pooled embedding (B, F); map-fusion models: the maps at the fusion point
        (B, C, h, w) = ``ImageBranch.forward_maps``, what partial mode caches.
        """
        branch = self._branch()
        return branch.forward_maps(images) if self.map_fusion is not None else branch.embed(images)

    def from_image_state(self, state: Tensor, meta: Tensor | None) -> Tensor:
        """Logits from an :meth:`image_state` batch and the encoded metadata (one row per state).

        ``forward(batch) == from_image_state(image_state(batch["image"]), batch["meta"])``.
        """
        if self.map_fusion is None:
            return self.forward_head(state, meta)
        branch = self._branch()
        maps, summary = self.map_fusion(branch, state.float(), _require(meta, "meta"))
        return self.head(branch.pool(maps), summary)

    def cam_layer(self) -> nn.Module:
        """The module whose output (B, C', h', w') is the last feature map after the fusion (Grad-CAM's default).

        Late models: the backbone's last map (``ImageBranch.default_target_layer``), which the
        metadata does not change; map-fusion models: the last map downstream of the fusion.
        """
        branch = self._branch()
        return self.map_fusion.cam_layer(branch) if self.map_fusion is not None else branch.default_target_layer()

    def forward_maps(self, maps: Tensor, meta: Tensor | None) -> Tensor:
        """Logits from cached fusion-point maps (B, C, h, w); with a view axis (B, V, C, h, w) the mean over views."""
        if maps.ndim == 4:
            return self._from_maps(maps.float(), meta)
        views = maps.shape[1]
        repeated = None if meta is None else meta.repeat_interleave(views, dim=0)
        return self._from_maps(maps.flatten(0, 1).float(), repeated).unflatten(0, (len(maps), views)).mean(1)

    def _from_maps(self, maps: Tensor, meta: Tensor | None) -> Tensor:
        if self.map_fusion is not None:
            return self.from_image_state(maps, meta)
        return self.forward_head(self._branch().embed_from_maps(maps), meta)

    def image_term(self, state: Tensor) -> Tensor | None:
        """A late model's image state reduced to what its head reads of it (:meth:`FusionHead.image_term`,
        e.g. (B, hidden) for ``concat`` against a (B, F) embedding), in eval mode; None where the head
        mixes image and metadata otherwise, for a map-fusion model, or in training mode (dropout).

        ``from_image_term(image_term(s), meta) == from_image_state(s, meta)``: the exact games, which
        evaluate many metadata rows per image state, move the narrow term instead of the state. A subclass
        that changes :meth:`from_image_state` without setting ``fuses_on_maps`` must override this too.
        """
        if self.training or self.fuses_on_maps:
            return None
        return self.head.image_term(state)

    def from_image_term(self, term: Tensor, meta: Tensor | None) -> Tensor:
        """Logits from :meth:`image_term`'s output and the encoded metadata."""
        meta_emb = self.meta_branch(_require(meta, "meta")) if self.meta_branch is not None else None
        return self.head.from_image_term(term, meta_emb)

    def forward_head(self, embedding: Tensor | None, meta: Tensor | None) -> Tensor:
        """Logits from the pooled image embedding and the encoded metadata: everything after the backbone.

        What the frozen path trains and what SHAP / modality attribution evaluate for late models;
        an input the model does not use may be None. A map-fusion model has no such head (its
        metadata acts before the pooling): use :meth:`from_image_state`.
        """
        if self.map_fusion is not None:
            raise ConfigError(
                "this model fuses the metadata into the feature maps: it has no head on pooled embeddings "
                "(use from_image_state on its image_state, and train.mode='partial' or 'end2end')"
            )
        image = _require(embedding, "embedding or image") if self.uses_image else None
        meta_emb = self.meta_branch(_require(meta, "meta")) if self.meta_branch is not None else None
        return self.head(image, meta_emb)


def build_lesion_model(
    head_cls: type[FusionHead],
    *,
    meta_dim: int,
    num_classes: int,
    cfg: ModelConfig,
    image_branch: ImageBranch | None,
    meta_layout: MetaLayout | None = None,
) -> LesionModel:
    """The late models' builder: branches the head reads (sized from their declared widths) + the head.

    ``meta_layout`` is unused (the metadata MLP reads every encoded column at once).
    """
    image = None
    if head_cls.uses_image:
        image = image_branch
        if image is None:
            image = ImageBranch(cfg.backbone, cfg.weights, cfg.multiscale, cfg.tail_blocks)
    meta = MetadataBranch(meta_dim, cfg.meta_hidden, cfg.dropout) if head_cls.uses_meta else None
    head = head_cls(
        image.num_features if image is not None else 0,
        meta.output_dim if meta is not None else 0,
        num_classes,
        cfg.head_hidden,
        cfg.dropout,
    )
    return LesionModel(head, image, meta)


@register_model
def image_only(**kwargs: Any) -> LesionModel:
    """Image only: timm backbone + linear head on the pooled features."""
    return build_lesion_model(LinearImageHead, **kwargs)


@register_model
def metadata_only(**kwargs: Any) -> LesionModel:
    """Metadata only: MLP over the encoded patient features (age, sex, localization)."""
    return build_lesion_model(MetadataHead, **kwargs)


@register_model
def concat(**kwargs: Any) -> LesionModel:
    """Late fusion: pooled image features ++ metadata embedding -> MLP head."""
    return build_lesion_model(ConcatHead, **kwargs)


@register_model
def gated(**kwargs: Any) -> LesionModel:
    """MetaBlock-style gating: metadata gates (sigmoid) and shifts the image feature channels -> MLP head."""
    return build_lesion_model(GatedHead, **kwargs)


@register_model
def film(**kwargs: Any) -> LesionModel:
    """FiLM / DAFT: metadata predicts a per-channel scale and shift of the image features -> MLP head."""
    return build_lesion_model(FiLMHead, **kwargs)


__all__ = [
    "ConcatHead",
    "FiLMHead",
    "FusionHead",
    "GatedHead",
    "LesionModel",
    "LinearImageHead",
    "MetadataHead",
    "build_lesion_model",
    "mlp_classifier",
]
