"""The image branch: any timm CNN backbone, giving feature maps and a pooled embedding of declared width."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import timm
import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .weights import load_image_weights, weights_normalisation

MULTISCALE_EXTRA_STAGES = 2  # earlier stages pooled next to the final embedding when multiscale=True
_POOL_CHILDREN = ("global_pool", "head")  # timm's pooling / head children follow the last map module


class _TimmInterface(Protocol):
    """The part of timm's common model interface the branch reads; timm's builder sets these at run time."""

    num_features: int
    feature_info: list[dict[str, Any]]

    def forward_features(self, x: Tensor) -> Tensor: ...

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor: ...


def _timm(model: nn.Module) -> _TimmInterface:
    """``model`` seen through timm's interface, which nn.Module's ``__getattr__`` typing cannot see."""
    return cast(_TimmInterface, model)


def _create_backbone(name: str) -> nn.Module:
    """A timm model without classifier and pooling, so ``forward_features`` gives the last maps."""
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f" (did you mean: {', '.join(close)}?)" if close else " (see timm.list_models())"
        raise ConfigError(f"unknown timm backbone '{name}'{hint}")
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
    except (AssertionError, RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"backbone '{name}' cannot be used without its pooling and classifier: {exc}") from None


@dataclass(frozen=True)
class Staged:
    """A backbone as stem -> blocks -> head, by module path (timm's names)."""

    stem: tuple[str, ...]  # run once before the first block
    blocks: tuple[str, ...]  # the stages, in order; partial fine-tuning caches the output of one of them
    head: tuple[str, ...]  # after the last block, before the pooling (EfficientNet's conv head and its norm)
    conditioned_head: int  # how many of ``head`` are convolutions whose input a map fusion conditions


def staged_layout(model: nn.Module) -> Staged | None:
    """The stem / blocks / head split of timm's EfficientNet / MobileNetV2 families and ResNets; None for others."""
    if all(hasattr(model, part) for part in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
        n = len(cast(nn.Sequential, model.get_submodule("blocks")))
        return Staged(("conv_stem", "bn1"), tuple(f"blocks.{i}" for i in range(n)), ("conv_head", "bn2"), 1)
    resnet = ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3", "layer4")
    if all(hasattr(model, part) for part in resnet):
        return Staged(resnet[:4], resnet[4:], (), 0)
    return None


def _get_module(model: nn.Module, path: str, backbone: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ConfigError(f"backbone '{backbone}' has no layer '{path}'") from None


def _pooled_width(model: nn.Module) -> int:
    """Declared width of timm's pre-logits embedding (``head_hidden_size`` where it differs)."""
    return int(getattr(model, "head_hidden_size", None) or _timm(model).num_features)


def _last_stage_is_final_map(model: nn.Module) -> bool:
    """True when the last feature_info stage already is ``forward_features``' output (no conv head after)."""
    return _timm(model).feature_info[-1]["num_chs"] == _timm(model).num_features


def _extra_stages(model: nn.Module, n: int = MULTISCALE_EXTRA_STAGES) -> tuple[tuple[str, int], ...]:
    """(module path, channels) of the ``n`` stages before the final map, from timm's feature_info."""
    info = list(_timm(model).feature_info)
    if _last_stage_is_final_map(model):
        info = info[:-1]
    return tuple((d["module"], int(d["num_chs"])) for d in info[-n:])


@contextlib.contextmanager
def _capture_outputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, Tensor]]:
    """Record the outputs of ``modules`` during the forward passes inside the block; hooks always removed."""
    outputs: dict[str, Tensor] = {}
    handles = [
        m.register_forward_hook(lambda _m, _i, out, key=key: outputs.__setitem__(key, out))
        for key, m in modules.items()
    ]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _avg_pool(maps: Tensor, backbone: str) -> Tensor:
    if maps.ndim != 4:
        raise ConfigError(
            f"backbone '{backbone}' gives features of shape {tuple(maps.shape)}; "
            "the image branch needs (B, C, H, W) maps (a CNN backbone)"
        )
    return maps.mean(dim=(2, 3), keepdim=True)


class ImageBranch(nn.Module):
    """A timm backbone with weights loaded, exposing maps, a pooled embedding and its declared width.

    Args:
        backbone: any timm model name producing (B, C, H, W) feature maps.
        weights: ``none`` | ``timm`` | ``offline-imagenet`` | path to a checkpoint file.
        multiscale: also average-pool the last stages before the final map and concatenate them
            (richer frozen embeddings at no extra backbone cost).
        tail_blocks: partial fine-tuning trains this many of the last blocks (stages) and the conv
            head on the cached output of the block before them; 0 caches the last block's output and
            trains nothing of the backbone (the conv head runs frozen on the cached maps).

    Attributes:
        num_features: width of :meth:`embed`'s output, read from timm's declared sizes.
        data_config: timm data config (``mean``, ``std``, ``input_size``...) matching the weights.
    """

    def __init__(self, backbone: str, weights: str = "none", multiscale: bool = False, tail_blocks: int = 1) -> None:
        super().__init__()
        self.backbone = backbone
        self.weights = weights
        self.multiscale = multiscale
        self.tail_blocks = tail_blocks
        self.model = _create_backbone(backbone)
        load_image_weights(self.model, weights)
        self.extra_stages = _extra_stages(self.model) if multiscale else ()
        for path, _ in self.extra_stages:
            _get_module(self.model, path, backbone)  # fail now, not at the first forward
        self.num_features = _pooled_width(self.model) + sum(chs for _, chs in self.extra_stages)
        self.data_config = self._resolve_data_config()

    def _resolve_data_config(self) -> dict[str, Any]:
        cfg = dict(timm.data.resolve_model_data_config(self.model))
        cfg.update(weights_normalisation(self.weights))
        cfg["mean"] = tuple(float(v) for v in cfg["mean"])
        cfg["std"] = tuple(float(v) for v in cfg["std"])
        return cfg

    def forward_features(self, x: Tensor) -> Tensor:
        """Last feature maps (B, C, h, w): timm's ``forward_features`` (conv head included where it has one)."""
        return _timm(self.model).forward_features(x)

    def pool(self, maps: Tensor) -> Tensor:
        """Global average pool + timm's pre-logits head (e.g. MobileNetV3's conv head): (B, width)."""
        pooled = _avg_pool(maps, self.backbone)
        return _timm(self.model).forward_head(pooled, pre_logits=True).flatten(1)

    def embed(self, x: Tensor) -> Tensor:
        """Pooled embedding (B, num_features); multiscale appends the pooled earlier stages."""
        if not self.extra_stages:
            return self.pool(self.forward_features(x))
        modules = {path: self.model.get_submodule(path) for path, _ in self.extra_stages}
        with _capture_outputs(modules) as stages:
            maps = self.forward_features(x)
        extras = [_avg_pool(stages[path], self.backbone).flatten(1) for path in modules]
        return torch.cat([self.pool(maps), *extras], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """Same as :meth:`embed`."""
        return self.embed(x)

    # Partial fine-tuning: the backbone split before its last ``tail_blocks`` blocks; the maps there are
    # cached once, the blocks after them and the conv head are trained.

    @property
    def staged(self) -> Staged:
        """The backbone as stem + blocks + head (partial fine-tuning and map fusion split it there)."""
        layout = staged_layout(self.model)
        if layout is None:
            raise ConfigError(
                f"train.mode='partial' and the map-fusion models need a backbone laid out as stem + blocks "
                f"(+ conv head): timm's EfficientNet and MobileNetV2 families (e.g. tf_efficientnet_lite0) and "
                f"ResNets; '{self.backbone}' is not"
            )
        return layout

    @property
    def maps_block(self) -> int:
        """Index in the backbone's blocks (:attr:`staged`) of the block whose output partial fine-tuning caches."""
        n = len(self.staged.blocks)
        if self.tail_blocks >= n:
            raise ConfigError(f"model.tail_blocks: backbone '{self.backbone}' has {n} blocks; use 0 to {n - 1}")
        return n - 1 - self.tail_blocks

    def check_partial(self) -> None:
        """Raise the ConfigError partial fine-tuning would meet later: a backbone or multiscale it cannot split."""
        first, blocks = self.maps_block, self.staged.blocks
        early = [path for path, _ in self.extra_stages if path in blocks and blocks.index(path) < first]
        if early:
            raise ConfigError(
                f"model.multiscale pools stage(s) {', '.join(early)}, before the cached maps ({blocks[first]}): "
                "set model.multiscale=false or a larger model.tail_blocks"
            )

    def _at(self, paths: Sequence[str]) -> list[nn.Module]:
        return [self.model.get_submodule(path) for path in paths]

    def forward_maps(self, x: Tensor) -> Tensor:
        """The maps (B, C, h, w) that partial fine-tuning caches: the stem and the blocks up to :attr:`maps_block`."""
        staged = self.staged
        for module in self._at(staged.stem + staged.blocks[: self.maps_block + 1]):
            x = module(x)
        return x

    def tail(self) -> list[nn.Module]:
        """The modules after the cached maps: the last ``tail_blocks`` blocks and the head (conv head, its norm)."""
        staged = self.staged
        return self._at(staged.blocks[self.maps_block + 1 :] + staged.head)

    def tail_points(self) -> int:
        """How many :meth:`tail` modules are convolutions (blocks, conv head): the inputs a map fusion conditions."""
        return self.tail_blocks + self.staged.conditioned_head

    def trainable_tail(self) -> list[nn.Module]:
        """The part of :meth:`tail` partial fine-tuning trains: all of it, or nothing when ``tail_blocks`` is 0."""
        return self.tail() if self.tail_blocks else []

    def tail_channels(self) -> tuple[list[int], int]:
        """(input channels of each :meth:`tail` module, channels of the last map), probed on a small image."""
        was_training = self.training
        channels = []
        with torch.no_grad():
            x = self.eval().forward_maps(torch.zeros(1, 3, 64, 64))
            for module in self.tail():
                channels.append(int(x.shape[1]))
                x = module(x)
        self.train(was_training)
        return channels, int(x.shape[1])

    def embed_from_maps(self, maps: Tensor) -> Tensor:
        """:meth:`embed` resumed from :meth:`forward_maps`' output: ``embed(x)`` for ``maps = forward_maps(x)``."""
        staged, first = self.staged, self.maps_block + 1
        paths = staged.blocks[first:] + staged.head
        stages = {staged.blocks[first - 1]: maps}
        x = maps
        for path, module in zip(paths, self.tail(), strict=True):
            x = module(x)
            stages[path] = x
        self.check_partial()
        extras = [_avg_pool(stages[path], self.backbone).flatten(1) for path, _ in self.extra_stages]
        return torch.cat([self.pool(x), *extras], dim=1)

    def default_target_layer(self) -> nn.Module:
        """The module whose output is the last feature map (Grad-CAM's default layer).

        ``layer4`` for ResNets (the last feature_info stage); for backbones with a conv head after
        the last stage (EfficientNet: ``conv_head`` -> ``bn2``), the module just before the pooling.
        """
        if _last_stage_is_final_map(self.model):
            return _get_module(self.model, _timm(self.model).feature_info[-1]["module"], self.backbone)
        names = [name for name, _ in self.model.named_children()]
        pool_at = next((i for i, n in enumerate(names) if n in _POOL_CHILDREN), 0)
        if pool_at == 0:
            raise ConfigError(
                f"cannot find the last feature stage of backbone '{self.backbone}'; name it with explain.target_layer"
            )
        return getattr(self.model, names[pool_at - 1])

    def target_layer(self, path: str = "") -> nn.Module:
        """The backbone module at dotted ``path`` (e.g. ``blocks.5``); empty = :meth:`default_target_layer`."""
        return _get_module(self.model, path, self.backbone) if path else self.default_target_layer()

    def extra_repr(self) -> str:
        return (
            f"backbone={self.backbone!r}, weights={self.weights!r}, multiscale={self.multiscale}, "
            f"num_features={self.num_features}"
        )


__all__ = ["MULTISCALE_EXTRA_STAGES", "ImageBranch"]


#: The four flips of an image batch (N, C, H, W): none, horizontal, vertical, both.
FLIPS: tuple[tuple[int, ...], ...] = ((), (3,), (2,), (2, 3))


def flipped_views(images: Tensor) -> Tensor:
    """The 4 :data:`FLIPS` of a batch (N, C, H, W) stacked into one batch (4N, C, H, W), flip-major."""
    return torch.cat([images.flip(d) if d else images for d in FLIPS])


def embed_images(branch: ImageBranch, images: Tensor, flip_average: bool) -> Tensor:
    """Pooled embedding of normalised images; ``flip_average`` averages over the 4 :data:`FLIPS`.

    The four flipped views go through the backbone as one batch (one pass, not four). The cached
    frozen path and every live use (prediction, explanation) go through this one function, so a
    head sees the same embedding of an image either way.
    """
    if not flip_average:
        return branch.embed(images)
    return branch.embed(flipped_views(images)).unflatten(0, (len(FLIPS), len(images))).mean(0)
