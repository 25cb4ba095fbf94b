"""Atomic, pickle-free checkpoints: ``torch.load(weights_only=True)`` refuses smuggled code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..io import temp_name


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write ``state`` to a temp file beside ``path`` and rename it: never a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; anything carrying a pickled payload is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{path}: refused, not a plain weights file ({_refusal_reason(exc)[:160]})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(exc).splitlines()[0][:160]})") from None


def _refusal_reason(exc: pickle.UnpicklingError) -> str:
    """The line of torch's refusal that names what was found (e.g. 'unsupported GLOBAL posix.system').

    Its first line is generic and goes on to suggest ``weights_only=False``: advice never to relay here.
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    named = [ln for ln in lines if "global" in ln.lower() or "unsupported" in ln.lower()]
    return (named or lines or ["unsupported content"])[0]


def load_model_state(model: torch.nn.Module, state: dict[str, Any], path: str | os.PathLike) -> None:
    """Load a model state dict, turning a key or shape mismatch into a one-line CheckpointError."""
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(f"{path}: checkpoint does not fit this model ({detail[:200]})") from None
