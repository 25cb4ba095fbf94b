"""Predicting with a model: logits over dict batches, and one image of a loaded run."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.cache import resized
from ..data.constants import CLASSES
from ..data.datasets import Normalize
from ..data.ham10000 import load_rgb
from ..data.patient import read_patient
from ..errors import note
from ..models import FLIPS, LesionModel, embed_images
from .load import balanced_scaling, load_model


def to_device(batch: dict[str, Any], device: torch.device, channels_last: bool = False) -> dict[str, Any]:
    """Move the tensors of a batch dict to ``device``."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    if channels_last and "image" in out:
        out["image"] = out["image"].contiguous(memory_format=torch.channels_last)
    return out


@torch.no_grad()
def predict_logits(
    model: nn.Module, batches: Iterable[dict], device: torch.device, *, tta: bool = False, amp: bool = False
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Logits, targets and image ids over ``batches``; ``tta`` averages the logits over image flips."""
    model.eval()
    logits, targets, ids = [], [], []
    for batch in batches:
        batch = to_device(batch, device)
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            out = model(batch).float()
            if tta and "image" in batch:
                for dims in ((3,), (2,), (2, 3)):
                    out = out + model({**batch, "image": batch["image"].flip(dims)}).float()
                out = out / 4
        logits.append(out.cpu())
        targets.append(batch["target"].cpu())
        ids += list(batch["image_id"])
    return torch.cat(logits).numpy(), torch.cat(targets).numpy(), ids


@dataclass(frozen=True)
class CasePrediction:
    """One case's prediction: the probabilities shown and those of each flipped view (the TTA spread)."""

    probs: dict[str, float]
    view_probs: np.ndarray  # (views, classes): the image and its flips (models.FLIPS); (0, C) without image


def predict_image(
    run_dir: str | Path,
    image: str | Path,
    age: float | str | None = None,
    sex: str | None = None,
    localization: str | None = None,
    balanced: bool = False,
) -> dict[str, float]:
    """Calibrated class probabilities for one image and optional patient fields (None = unknown).

    The inputs follow the reader's rules (:func:`~multimodal_lesion.data.patient.read_patient`,
    :func:`~multimodal_lesion.data.ham10000.load_rgb`) and are checked before the model is loaded:
    an age outside 0-120 or a tiny, corrupt or missing image is a :class:`DataError` naming the field
    or file; an unrecognised sex or localization is read as unknown, with a note.

    ``balanced`` gives the probabilities of the balanced decision instead (uniform class prior,
    fitted on val; their arg-max is the decision the run's balanced accuracy was scored on).
    """
    return predict_case(run_dir, image, age, sex, localization, balanced).probs


@torch.no_grad()
def predict_case(
    run_dir: str | Path,
    image: str | Path,
    age: float | str | None = None,
    sex: str | None = None,
    localization: str | None = None,
    balanced: bool = False,
) -> CasePrediction:
    """:func:`predict_image` with the probabilities of each flipped view of the image as well."""
    row = read_patient(age, sex, localization)
    picture = load_rgb(image)
    cfg, encoder, model, temperature = load_model(run_dir)
    bias = np.zeros(len(CLASSES), dtype=np.float32)
    if balanced:
        temperature, bias = balanced_scaling(run_dir)
    device = next(model.parameters()).device
    meta = torch.from_numpy(encoder.transform(row).astype(np.float32)).to(device)
    offset = torch.from_numpy(bias).to(device)

    def probs_of(embedding: torch.Tensor | None) -> np.ndarray:
        logits = model.forward_head(embedding, meta.expand(len(embedding) if embedding is not None else 1, -1))
        return torch.softmax((logits / temperature + offset).float(), 1).cpu().numpy()

    if model.image_branch is None:
        note(f"model '{cfg.model.name}' does not look at the image: its prediction comes from the patient fields")
        shown, views = probs_of(None)[0], np.zeros((0, len(CLASSES)))
    else:
        pixels = torch.from_numpy(resized(picture, cfg.data.image_size)).permute(2, 0, 1)
        dc = model.image_branch.data_config
        x = Normalize(dc["mean"], dc["std"])(pixels).unsqueeze(0).to(device)
        shown = probs_of(embed_images(model.image_branch, x, cfg.train.flip_average and cfg.train.mode == "frozen"))[0]
        views = view_probabilities(model, x, meta, temperature, offset)[:, 0, :]
    return CasePrediction({c: round(float(p), 6) for c, p in zip(CLASSES, shown, strict=True)}, views)


def tta_spread(view_probs: np.ndarray) -> np.ndarray:
    """Per case, the standard deviation over views (V, N, C) of the probability of the mean-predicted class."""
    v = np.asarray(view_probs)
    top = v.mean(axis=0).argmax(axis=1)
    return v[:, np.arange(v.shape[1]), top].std(axis=0)


@torch.no_grad()
def view_probabilities(
    model: LesionModel, images: torch.Tensor, meta: torch.Tensor, temperature: float, bias: torch.Tensor | None = None
) -> np.ndarray:
    """Calibrated probabilities (V, N, C) of each flipped view (``models.FLIPS``) of normalised images.

    ``bias`` (per class, added after the temperature) gives the balanced decision's probabilities instead.
    """
    assert model.image_branch is not None  # callers check: a metadata-only model has no views
    out = []
    for dims in FLIPS:
        embedding = embed_images(model.image_branch, images.flip(dims) if dims else images, False)
        logits = model.forward_head(embedding, meta).float() / temperature
        out.append(torch.softmax(logits if bias is None else logits + bias, 1).cpu().numpy())
    return np.stack(out)
