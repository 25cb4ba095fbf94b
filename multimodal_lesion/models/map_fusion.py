"""Feature-map fusion: models whose metadata changes the feature maps the network looks at.

The late models (``concat``, ``gated``, ``film``) act on the pooled embedding; a per-channel gate
there commutes with average pooling, so they never change *where* the network looks. The models here
condition the maps that later convolutions (the backbone's tail: its last blocks and conv head) still
read, or attend between the last map's spatial tokens and the patient features, so the metadata
reaches the last feature map (what Grad-CAM reads, :meth:`LesionModel.cam_layer`).

The fusion point is the input of the backbone's tail, the maps that partial fine-tuning caches
(``ImageBranch.forward_maps``: the stem and the blocks before the last ``model.tail_blocks``); with
``tail_blocks = 0`` it is the last block's output and the (frozen) conv head is the tail. So every
model here trains end-to-end and in ``partial`` mode at the cost of partial mode; ``frozen`` mode
(pooled embeddings only) is refused (:func:`~multimodal_lesion.models.registry.check_model_mode`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..errors import ConfigError
from .fusion import FusionHead, LesionModel, mlp_classifier
from .image_branch import ImageBranch
from .metadata_branch import MetadataBranch
from .registry import register_model

ATTENTION_DIM = 64  # width of the cross-attention tokens
ATTENTION_HEADS = 4
LAYER_SCALE = 0.1  # initial scale of the cross-attention residual (LayerScale, Touvron et al. 2021)
METANET_HIDDEN = 64  # MetaNet's hidden 1x1 convolution (U -> 64 -> C)
#: MetaBlock's start (its two BatchNorms' weight and bias): f(u) = 0.3 +- 0.03 and g(u) = 0 +- 0.1. With the
#: unit-normal default, f flips the sign of the map's channels from one patient to the next and saturates tanh on
#: the last map's values (up to 6, ReLU6), and g drowns the image: on the frozen backbone the head learned from
#: neither (HAM10000 balanced accuracy 0.35-0.38). So it starts as one monotone squashing of the map for
#: everyone, with the metadata's scale and shift small, as ``film_maps`` starts at the identity.
METABLOCK_F_START = (0.03, 0.3)
METABLOCK_G_START = (0.1, 0.0)


@dataclass(frozen=True)
class MetaLayout:
    """Which encoded columns belong to which patient feature, and the encoding of a missing patient.

    Args:
        groups: per patient feature, its encoded columns (``MetadataEncoder.feature_groups_``).
        missing: the encoding of a patient with every feature missing (``MetadataEncoder.missing_row``);
            a feature whose columns equal it is missing. NaN never matches (never missing).
    """

    groups: tuple[tuple[int, ...], ...]
    missing: tuple[float, ...]

    @classmethod
    def columns(cls, meta_dim: int) -> MetaLayout:
        """Each encoded column a feature of its own, never missing (no encoder at hand)."""
        return cls(tuple((i,) for i in range(meta_dim)), (math.nan,) * meta_dim)

    def check(self, meta_dim: int) -> None:
        used = [c for g in self.groups for c in g]
        if not self.groups or any(not g for g in self.groups) or len(self.missing) != meta_dim:
            raise ConfigError(f"metadata layout does not describe {meta_dim} encoded columns: {self}")
        if any(c < 0 or c >= meta_dim for c in used):
            raise ConfigError(f"metadata layout names columns outside 0..{meta_dim - 1}: {self}")


class SafeBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d that reads a training batch of one image with its running statistics instead of failing."""

    def forward(self, x: Tensor) -> Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class MapFusion(nn.Module):
    """Runs the image branch's tail on the fusion-point maps, conditioned on the encoded metadata.

    ``forward(branch, maps, meta)`` -> (last map (B, C, h, w) after the fusion, summary (B, D) or None):
    :meth:`condition` is applied before each tail block and before the conv head (not before its
    batch norm: ``ImageBranch.tail_points``), then :meth:`finish` on the last map. A subclass
    overrides what it needs.
    """

    summary_dim: int = 0  # width of the metadata summary the head reads next to the pooled map (0: none)
    needs_points: bool = True  # conditions the input of a tail convolution (False: only the last map)

    def forward(self, branch: ImageBranch, maps: Tensor, meta: Tensor) -> tuple[Tensor, Tensor | None]:
        context = self.context(meta)
        points = branch.tail_points()
        x = maps
        for i, module in enumerate(branch.tail()):
            if i < points:
                x = self.condition(i, x, context)
            x = module(x)
        return self.finish(x, context)

    def context(self, meta: Tensor) -> Any:
        """What the conditioning reads, computed once per batch (default: the encoded metadata)."""
        return meta

    def condition(self, i: int, x: Tensor, context: Any) -> Tensor:
        """The input of tail module ``i`` (0 = the fusion point) given the metadata; default: unchanged."""
        return x

    def finish(self, x: Tensor, context: Any) -> tuple[Tensor, Tensor | None]:
        """The last map after the fusion and the head's metadata summary; default: unchanged, none."""
        return x, None

    def cam_layer(self, branch: ImageBranch) -> nn.Module:
        """The module whose output is the last map after the fusion (default: the branch's last map)."""
        return branch.default_target_layer()


def _channelwise(v: Tensor) -> Tensor:
    """(B, C) -> (B, C, 1, 1): one value per channel, broadcast over space."""
    return v[:, :, None, None]


class MetaNetFusion(MapFusion):
    """MetaNet: ``X' = X * sigmoid(W2 relu(W1 u))`` per channel of the fusion-point maps (1x1 convolutions)."""

    def __init__(self, meta_dim: int, channels: list[int], **_: Any) -> None:
        super().__init__()
        self.gate = nn.Sequential(
            nn.Conv2d(meta_dim, METANET_HIDDEN, 1), nn.ReLU(), nn.Conv2d(METANET_HIDDEN, channels[0], 1), nn.Sigmoid()
        )

    def condition(self, i: int, x: Tensor, context: Any) -> Tensor:
        return x * self.gate(_channelwise(context)) if i == 0 else x


def _norm(channels: int, start: tuple[float, float]) -> SafeBatchNorm1d:
    """A batch norm whose affine part starts at (weight, bias) = ``start``."""
    norm = SafeBatchNorm1d(channels)
    nn.init.constant_(norm.weight, start[0])
    nn.init.constant_(norm.bias, start[1])
    return norm


class MetaBlockLayer(nn.Module):
    """``X' = sigmoid(tanh(X * f(u)) + g(u))``, ``f, g = BatchNorm(Linear(u))``, one value per channel."""

    def __init__(self, meta_dim: int, channels: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(meta_dim, channels), _norm(channels, METABLOCK_F_START))
        self.g = nn.Sequential(nn.Linear(meta_dim, channels), _norm(channels, METABLOCK_G_START))

        # The paper's reducer block (Linear + BatchNorm) scales what the block outputs; the head here reads the
        # pooled map directly, so a per-channel BatchNorm of the block's (0, 1) output stands in for it.
        self.scale = nn.BatchNorm2d(channels)

    def forward(self, maps: Tensor, meta: Tensor) -> Tensor:
        return self.scale(torch.sigmoid(torch.tanh(maps * _channelwise(self.f(meta))) + _channelwise(self.g(meta))))


class MetaBlockFusion(MapFusion):
    """MetaBlock on the last map (see ``metablock``); its output is Grad-CAM's layer."""

    needs_points = False

    def __init__(self, meta_dim: int, out_channels: int, **_: Any) -> None:
        super().__init__()
        self.block = MetaBlockLayer(meta_dim, out_channels)

    def finish(self, x: Tensor, context: Any) -> tuple[Tensor, Tensor | None]:
        return self.block(x, context), None

    def cam_layer(self, branch: ImageBranch) -> nn.Module:
        return self.block


class FiLMMapsFusion(MapFusion):
    """FiLM on the maps: ``X_i' = X_i * (1 + gamma_i(m)) + beta_i(m)`` before every tail block and the conv head."""

    def __init__(self, meta_dim: int, channels: list[int], cfg: ModelConfig, **_: Any) -> None:
        super().__init__()
        self.meta = MetadataBranch(meta_dim, cfg.meta_hidden, cfg.dropout)
        generators = [nn.Linear(cfg.meta_hidden, 2 * c) for c in channels]
        for generator in generators:  # identity at the start: the pretrained tail sees its usual input
            nn.init.zeros_(generator.weight)
            nn.init.zeros_(generator.bias)
        self.generators = nn.ModuleList(generators)

    def context(self, meta: Tensor) -> Any:
        return self.meta(meta)

    def condition(self, i: int, x: Tensor, context: Any) -> Tensor:
        gamma, beta = self.generators[i](context).chunk(2, dim=1)
        return x * (1 + _channelwise(gamma)) + _channelwise(beta)


class MetaTokens(nn.Module):
    """One token per patient feature: ``Linear_f(columns of f) + id_f``, or ``missing_f + id_f`` when f is missing."""

    def __init__(self, layout: MetaLayout, dim: int) -> None:
        super().__init__()
        self.groups = [list(g) for g in layout.groups]
        self.embed = nn.ModuleList(nn.Linear(len(g), dim) for g in self.groups)
        self.feature_id = nn.Parameter(torch.randn(len(self.groups), dim) * 0.02)
        self.missing_token = nn.Parameter(torch.randn(len(self.groups), dim) * 0.02)
        self.missing: Tensor
        self.register_buffer("missing", torch.tensor(layout.missing, dtype=torch.float32), persistent=False)

    def forward(self, meta: Tensor) -> Tensor:
        """(B, U) encoded metadata -> (B, features, dim) tokens."""
        tokens = []
        for i, cols in enumerate(self.groups):
            values = meta[:, cols]
            missing = (values == self.missing[cols]).all(dim=1, keepdim=True)
            tokens.append(torch.where(missing, self.missing_token[i], self.embed[i](values)) + self.feature_id[i])
        return torch.stack(tokens, dim=1)


def _spatial_tokens(maps: Tensor) -> Tensor:
    """(B, C, h, w) -> (B, h*w, C)."""
    return maps.flatten(2).transpose(1, 2)


class ImageQueriesMeta(nn.Module):
    """The last map's spatial tokens attend to the patient-feature tokens; residual, back to (B, C, h, w).

    ``X' = X + s * W_o MHA(q = W_q LN(X), k = v = T)`` with a per-channel scale ``s`` (LayerScale).
    Its output is the metadata-conditioned last map (Grad-CAM's layer for ``cross_attention``).
    """

    def __init__(self, channels: int, dim: int = ATTENTION_DIM, heads: int = ATTENTION_HEADS) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.query = nn.Linear(channels, dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Linear(dim, channels)
        self.scale = nn.Parameter(torch.full((channels,), LAYER_SCALE))

    def forward(self, maps: Tensor, tokens: Tensor) -> Tensor:
        b, c, h, w = maps.shape
        x = _spatial_tokens(maps)
        attended, _ = self.attention(self.query(self.norm(x)), tokens, tokens, need_weights=False)
        return (x + self.scale * self.out(attended)).transpose(1, 2).reshape(b, c, h, w)


class MetaQueriesImage(nn.Module):
    """The patient-feature tokens attend to the (conditioned) map's spatial tokens; mean over features: (B, dim)."""

    def __init__(self, channels: int, dim: int = ATTENTION_DIM, heads: int = ATTENTION_HEADS) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.key = nn.Linear(channels, dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, tokens: Tensor, maps: Tensor) -> Tensor:
        x = self.key(self.norm(_spatial_tokens(maps)))
        attended, _ = self.attention(tokens, x, x, need_weights=False)
        return (tokens + attended).mean(dim=1)


class CrossAttentionFusion(MapFusion):
    """Cross-attention both ways between the last map and the patient-feature tokens (see ``cross_attention``)."""

    needs_points = False

    def __init__(self, meta_dim: int, out_channels: int, layout: MetaLayout, **_: Any) -> None:
        super().__init__()
        self.tokens = MetaTokens(layout, ATTENTION_DIM)
        self.attend = ImageQueriesMeta(out_channels)
        self.summarise = MetaQueriesImage(out_channels)
        self.summary_dim = ATTENTION_DIM

    def context(self, meta: Tensor) -> Any:
        return self.tokens(meta)

    def finish(self, x: Tensor, context: Any) -> tuple[Tensor, Tensor | None]:
        conditioned = self.attend(x, context)
        return conditioned, self.summarise(context, conditioned)

    def cam_layer(self, branch: ImageBranch) -> nn.Module:
        return self.attend


class MapHead(FusionHead):
    """MLP over the pooled conditioned map (++ the fusion's metadata summary where it has one)."""

    def __init__(self, image_dim: int, meta_dim: int, num_classes: int, hidden: int, dropout: float) -> None:
        super().__init__(image_dim, meta_dim, num_classes, hidden, dropout)
        self.classifier = mlp_classifier(image_dim + meta_dim, hidden, num_classes, dropout)

    def forward(self, image: Tensor | None, meta: Tensor | None) -> Tensor:
        assert image is not None  # LesionModel.from_image_state passes the pooled map
        return self.classifier(image if meta is None else torch.cat([image, meta], dim=1))


def build_map_model(
    fusion_cls: type[MapFusion],
    name: str,
    *,
    meta_dim: int,
    num_classes: int,
    cfg: ModelConfig,
    image_branch: ImageBranch | None,
    meta_layout: MetaLayout | None = None,
) -> LesionModel:
    """A map-fusion model: the image branch, ``fusion_cls`` sized from its tail's channels, a :class:`MapHead`."""
    if meta_dim < 1:
        raise ConfigError(f"a map-fusion model needs meta_dim >= 1 encoded features, got {meta_dim}")
    if cfg.multiscale:
        raise ConfigError("model.multiscale: a map-fusion model pools only its conditioned last map; set it to false")
    image = image_branch if image_branch is not None else ImageBranch(cfg.backbone, cfg.weights, False, cfg.tail_blocks)
    try:
        channels, out_channels = image.tail_channels()
    except ConfigError as exc:
        raise ConfigError(f"model '{name}' fuses into the maps before the backbone's tail: {exc}") from None
    points = image.tail_points()
    if fusion_cls.needs_points and not points:
        raise ConfigError(
            f"model '{name}': model.tail_blocks=0 leaves no convolution after the fusion point on backbone "
            f"'{image.backbone}' (it has no conv head), so the fusion would commute with the pooling; use >= 1"
        )
    layout = meta_layout if meta_layout is not None else MetaLayout.columns(meta_dim)
    layout.check(meta_dim)
    fusion = fusion_cls(
        meta_dim=meta_dim, channels=channels[:points], out_channels=out_channels, cfg=cfg, layout=layout
    )
    head = MapHead(image.num_features, fusion.summary_dim, num_classes, cfg.head_hidden, cfg.dropout)
    return LesionModel(head, image, None, fusion)


def _on_maps(fn: Any) -> Any:
    """Mark a factory as a map-fusion model (``registry.fuses_on_maps``)."""
    fn.fuses_on_maps = True
    return fn


@register_model
@_on_maps
def metanet(**kwargs: Any) -> LesionModel:
    """MetaNet (Li et al. 2020): metadata -> 1x1 convs -> sigmoid weight per channel of the maps before the tail.

    ``X' = X * sigmoid(Conv1x1_{64->C}(ReLU(Conv1x1_{U->64}(u))))``, X the maps (B, C, h, w) at the
    fusion point, u the encoded metadata (B, U). Source: W. Li, J. Zhuang, R. Wang, J. Zhang,
    W.-S. Zheng, "Fusing metadata and dermoscopy images for skin disease diagnosis", ISBI 2020.
    A per-channel weight on the LAST map would commute with average pooling (it would be late
    gating, like ``gated``), so it is applied at the input of the backbone's tail (the cached maps of
    partial mode), where the tail blocks and conv head still convolve the re-weighted channels.
    """
    return build_map_model(MetaNetFusion, "metanet", **kwargs)


@register_model
@_on_maps
def metablock(**kwargs: Any) -> LesionModel:
    """MetaBlock (Pacheco & Krohling 2021): sigmoid(tanh(X * f(u)) + g(u)) on the last map, before the pooling.

    ``f(u) = BN(W_f u + b_f)``, ``g(u) = BN(W_g u + b_g)``, one value per channel broadcast over
    space; X the last map (after the backbone's tail). Source: A. G. C. Pacheco, R. A. Krohling, "An
    attention-based mechanism to combine images and metadata in deep learning models applied to skin
    cancer classification", IEEE JBHI 25(9), 2021, which applies it to the last features before the
    classifier. On the map, before the average pooling, it is not late gating: tanh and sigmoid act
    on every position, so ``mean(block(X)) != block(mean(X))`` and the map Grad-CAM reads (the block's
    output) depends on the metadata. Before the tail it failed: its (0, 1) output made the frozen conv
    head's ReLU6 output zero everywhere (HAM10000 fold 0 of the fusion ablation, ``tail_blocks = 0``:
    uniform predictions, balanced accuracy 1/7).

    Two choices beyond the equation, both for a head that reads the pooled map: the block's output goes
    through a per-channel BatchNorm (the paper's reducer block, Linear + BatchNorm after the block, does
    this scaling there), and f, g start at 0.3 +- 0.03 and 0 +- 0.1 (``METABLOCK_F_START``,
    ``METABLOCK_G_START``). On the frozen backbone (``metadata_on_map`` recipe, HAM10000 seed 0, test
    balanced accuracy): the paper's initialisation alone 0.34-0.37 (ablation folds 0-2), f at a tenth of
    its scale 0.384, the start alone 0.345, both 0.629 (0.669 with the balanced decision; ``concat`` 0.658).
    """
    return build_map_model(MetaBlockFusion, "metablock", **kwargs)


@register_model
@_on_maps
def film_maps(**kwargs: Any) -> LesionModel:
    """FiLM on the maps: per-channel scale and shift from metadata at the input of every tail block and the conv head.

    ``X_i' = X_i * (1 + gamma_i(m)) + beta_i(m)``, ``[gamma_i, beta_i] = W_i m + b_i``, m the
    metadata MLP's embedding; the generators start at zero, so the pretrained tail first sees its
    usual input. Source: E. Perez et al., "FiLM: Visual reasoning with a general conditioning
    layer", AAAI 2018 (per-block conditioning of a CNN; cf. DAFT, Wolf et al. 2022).
    """
    return build_map_model(FiLMMapsFusion, "film_maps", **kwargs)


@register_model
@_on_maps
def cross_attention(**kwargs: Any) -> LesionModel:
    """Cross-attention between the last map's spatial tokens and one token per patient feature (both directions).

    Tokens: ``t_f = Linear_f(u_f) + e_f`` for feature f's encoded columns u_f and a learned feature-id
    embedding e_f; a learned ``missing_f + e_f`` where the encoder marks f missing (its columns equal
    ``MetadataEncoder.missing_row``: meta dropout and "unknown" patients). Direction 1, image tokens
    query the feature tokens: ``X' = X + s * W_o MHA(W_q LN(X), T, T)`` reshaped back to (B, C, h, w),
    residual, so the last map itself is conditioned and Grad-CAM (``cam_layer``) sees the metadata.
    Direction 2, the feature tokens query the conditioned map: ``z = mean_f(T + MHA(T, W_k LN(X'), .))``,
    concatenated with the pooled X' in the head, so a feature can pick the image regions it is about.
    Both, because direction 1 alone makes the metadata act only through the map and direction 2 alone
    leaves the map unconditioned. Sources: Vaswani et al. 2017 (attention); Touvron et al. 2021 (LayerScale s).
    """
    return build_map_model(CrossAttentionFusion, "cross_attention", **kwargs)


__all__ = [
    "CrossAttentionFusion",
    "FiLMMapsFusion",
    "MapFusion",
    "MapHead",
    "MetaBlockFusion",
    "MetaLayout",
    "MetaNetFusion",
    "MetaTokens",
    "build_map_model",
]
