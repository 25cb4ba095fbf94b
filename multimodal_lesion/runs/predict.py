"""Predicting with a model: logits over dict batches, one image of a loaded run, and many images at once.

:class:`Predictor` loads a run's model once (on the device asked for; a run trained on a GPU runs on
a CPU-only machine) with its stored calibration: the temperature and the balanced decision fitted on
val. It predicts cases in batches as the run was scored (flip-averaged embeddings on the frozen path,
flip TTA when the run was evaluated with it), returning calibrated and balanced probabilities from
one forward pass. ``predict_case`` / ``predict_image`` (one image) and ``predict_table`` (a folder or
CSV of images, ``mmlesion predict --data/--csv``) are thin uses of it.

Images of another aspect ratio than the run's input are fitted by :func:`fit_image`: padded or centre
cropped (``fit``), never stretched unless asked (``"stretch"``, what the training cache does with
images of the run's own shape).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..data.color import color_constancy_of
from ..data.datasets import Normalize
from ..data.images import load_rgb
from ..data.patient import read_patient
from ..data.schema import DatasetSchema
from ..errors import ConfigError, note
from ..models import FLIPS, LesionModel, embed_images
from ..models.adapt import adapt_batchnorm, batchnorm_layers
from .folder import RunFolder
from .load import LoadedModel, load_model

#: How an image of another aspect ratio becomes the run's input size.
Fit = Literal["pad", "crop", "stretch"]
FITS: tuple[str, ...] = ("pad", "crop", "stretch")
#: Images per forward pass of :meth:`Predictor.predict`.
PREDICT_BATCH = 32


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


def fit_image(img: Image.Image, size: tuple[int, int], how: Fit = "pad") -> np.ndarray:
    """An RGB image as uint8 HWC of ``size`` = (height, width), its aspect ratio kept unless ``stretch``.

    ``pad``: scaled to fit inside and padded with black borders. ``crop``: scaled to cover and centre
    cropped. ``stretch``: resized to the size whatever its shape (bilinear, as the training cache does).
    An image already of the size's aspect ratio is resized the same way by all three.
    """
    if how not in FITS:
        raise ConfigError(f"image fit '{how}' is not one of {', '.join(FITS)}")
    height, width = size
    w, h = img.size
    if how == "stretch" or w * height == h * width:
        scaled = img if img.size == (width, height) else img.resize((width, height), Image.Resampling.BILINEAR)
        return np.array(scaled, dtype=np.uint8)
    scale = (min if how == "pad" else max)(width / w, height / h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    scaled = img.resize(new, Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (width, height))
    canvas.paste(scaled, ((width - new[0]) // 2, (height - new[1]) // 2))  # negative offsets crop the centre
    return np.array(canvas, dtype=np.uint8)


def aspect_differs(img: Image.Image, size: tuple[int, int]) -> bool:
    """Whether ``img`` has another aspect ratio than ``size`` = (height, width) (1% tolerance)."""
    w, h = img.size
    return abs((w / h) / (size[1] / size[0]) - 1) > 0.01


@dataclass(frozen=True)
class Probabilities:
    """What :meth:`Predictor.predict` returns for N cases, from one forward pass per view."""

    calibrated: np.ndarray  # (N, C) softmax(logits / temperature)
    balanced: np.ndarray | None  # (N, C) the balanced decision's probabilities; None for runs without one
    views: np.ndarray | None  # (V, N, C) calibrated probabilities of each flipped view; None without image
    embeddings: np.ndarray | None = (
        None  # (N, F) the image embeddings the head read (unflipped view); None without image
    )


@dataclass
class Predictor:
    """A run's model, loaded once, that predicts cases as the run was scored (see the module docstring)."""

    run: LoadedModel
    fit: Fit = "pad"
    batch_size: int = PREDICT_BATCH
    views: bool = False  # also return each flipped view's probabilities (the TTA spread)
    _normalize: Normalize | None = field(default=None, init=False, repr=False)

    @classmethod
    def load(cls, run_dir: str | Path, device: str | None = None, **kwargs: Any) -> Predictor:
        """Load the run in ``run_dir`` on ``device`` (None: the run's own, the CPU where it has no GPU)."""
        return cls(load_model(run_dir, device), **kwargs)

    @property
    def schema(self) -> DatasetSchema:
        return self.run.schema

    @property
    def model(self) -> LesionModel:
        return self.run.model

    def pixels(self, img: Image.Image) -> np.ndarray:
        """One decoded image as the model's uint8 input (H, W, 3): fitted, then the run's colour constancy."""
        return color_constancy_of(self.run.cfg.data)(fit_image(img, self.run.cfg.data.image_size, self.fit))

    def encode(self, patients: pd.DataFrame) -> np.ndarray:
        """The patient table (one row per case) encoded by the run's encoder (float32 (N, D))."""
        return self.run.encoder.transform(patients).astype(np.float32)

    @torch.no_grad()
    def predict(self, pixels: np.ndarray | None, meta: np.ndarray) -> Probabilities:
        """Probabilities of N cases: uint8 images (N, H, W, 3) (None for a metadata-only model) and encoded meta."""
        n = len(meta)
        parts = [
            self._predict(None if pixels is None else pixels[i : i + self.batch_size], meta[i : i + self.batch_size])
            for i in range(0, n, self.batch_size)
        ]
        logits = np.concatenate([p[0] for p in parts]) if parts else np.zeros((0, self.schema.n_classes))
        views = np.concatenate([p[1] for p in parts], axis=1) if parts and parts[0][1] is not None else None
        embeddings = np.concatenate([p[2] for p in parts]) if parts and parts[0][2] is not None else None
        cal = _softmax(logits / self.run.temperature)
        balanced = None
        if self.run.balanced is not None:
            temperature, bias = self.run.balanced
            balanced = _softmax(logits / temperature + bias)
        return Probabilities(cal, balanced, views, embeddings)

    def _predict(
        self, pixels: np.ndarray | None, meta: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(logits (B, C) as the run scores them, calibrated view probabilities (V, B, C) or None, the
        embeddings (B, F) of the unflipped view, flip-averaged as the run was trained, or None)."""
        model, device = self.model, self.run.device
        meta_t = torch.from_numpy(meta).to(device)
        branch = model.image_branch
        if branch is None:
            return model.forward_head(None, meta_t).float().cpu().numpy(), None, None
        if pixels is None:
            raise ConfigError(f"model '{self.run.cfg.model.name}' looks at the image: give the images")
        x = self.normalize(torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)).to(device)
        t = self.run.cfg.train
        if t.mode == "frozen":
            embedding = embed_images(branch, x, t.flip_average)
            logits = model.forward_head(embedding, meta_t).float()
        else:  # partial, end2end: flip TTA when the run was evaluated with it
            dims = FLIPS if self.run.tta else ((),)
            states = [model.image_state(x.flip(d) if d else x) for d in dims]
            logits = torch.stack([model.from_image_state(s, meta_t).float() for s in states]).mean(0)
            # the shift alarm's embedding: a map model's state is its maps, pooled here without the metadata
            embedding = branch.embed_from_maps(states[0]) if model.fuses_on_maps else states[0]
        views = None
        if self.views:
            views = view_probabilities(model, x, meta_t, self.run.temperature)
        return logits.cpu().numpy(), views, embedding.float().cpu().numpy()

    def adapt_batchnorm(self, chunks: Iterable[np.ndarray]) -> dict[str, Any]:
        """AdaBN: the batch-norm statistics the run learned on its training data re-estimated on new images.

        ``chunks`` are uint8 image batches (B, H, W, 3) as :meth:`pixels` makes them (colour constancy
        included). Which layers (:func:`adaptable_batchnorm`): end-to-end runs all of the backbone's,
        partial runs those of the fine-tuned tail (the frozen prefix's are ImageNet's and made the cached
        training maps: they stay); frozen and image-less runs are refused. Returns what ``metrics.json``
        records: the method, the layers' scope and count, and the images seen.
        """
        scope, layers = adaptable_batchnorm(self.run)
        branch = self.model.image_branch
        assert branch is not None  # adaptable_batchnorm refuses image-less models
        device = self.run.device
        batches = (
            self.normalize(torch.from_numpy(np.ascontiguousarray(px)).permute(0, 3, 1, 2)).to(device) for px in chunks
        )
        seen = adapt_batchnorm(self.model, layers, lambda x: embed_images(branch, x, False), batches)
        return {"method": "adabn", "scope": scope, "layers": len(layers), "images": seen}

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> the backbone's normalised float input."""
        if self._normalize is None:
            assert self.model.image_branch is not None
            dc = self.model.image_branch.data_config
            self._normalize = Normalize(dc["mean"], dc["std"])
        return self._normalize(pixels)


def adaptable_batchnorm(run: LoadedModel) -> tuple[str, list[_BatchNorm]]:
    """(scope, layers): the batch-norm layers whose statistics a run learned on its training data.

    A ConfigError (one line, exit 2) where there are none: a frozen run (its backbone keeps ImageNet's
    statistics, and its heads learned on embeddings made with them) or a model without an image branch.
    """
    branch, mode, name = run.model.image_branch, run.cfg.train.mode, run.cfg.model.name
    if branch is None:
        raise ConfigError(f"--adapt-bn: model '{name}' has no image branch: no batch-norm statistics to adapt")
    if mode == "frozen":
        raise ConfigError(
            f"--adapt-bn: {run.folder.path} is a frozen run: its backbone keeps ImageNet's batch-norm statistics "
            "(its heads learned on embeddings made with them), none learned on its training data to re-estimate; "
            "adapt an end2end or partial run"
        )
    scope, modules = ("tail", branch.tail()) if mode == "partial" else ("backbone", [branch])
    return scope, batchnorm_layers(modules)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class Case:
    """One case to predict: an image and its patient fields (feature -> raw value; absent = unknown)."""

    image: str | Path
    patient: Mapping[str, object] = field(default_factory=dict)

    def table(self, schema: DatasetSchema) -> pd.DataFrame:
        """The patient fields as a one-row table by the reader's rules (HAM10000's for its features)."""
        dataset = {"age", "sex", "localization"}
        unknown = sorted(set(self.patient) - set(schema.features.names) - dataset)
        if unknown:
            raise ConfigError(
                f"unknown patient field(s) {', '.join(unknown)} (this run reads {', '.join(schema.features.names)})"
            )
        if set(schema.features.names) <= dataset:
            return read_patient(**{k: self.patient.get(k) for k in ("age", "sex", "localization")})
        return pd.DataFrame([{f: self.patient.get(f) for f in schema.features.names}])


@dataclass(frozen=True)
class CasePrediction:
    """One case's prediction: calibrated (and balanced) probabilities and those of each flipped view."""

    probs: dict[str, float]
    view_probs: np.ndarray  # (views, classes): the image and its flips (models.FLIPS); (0, C) without image
    balanced_probs: dict[str, float] | None = None  # the balanced decision's; None for runs without one
    embedding: np.ndarray | None = None  # (F,) the image embedding the head read; None without image


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
    :func:`~multimodal_lesion.data.images.load_rgb`) and are checked before the model is loaded:
    an age outside 0-120 or a tiny, corrupt or missing image is a :class:`DataError` naming the field
    or file; an unrecognised sex or localization is read as unknown, with a note.

    ``balanced`` gives the probabilities of the balanced decision instead (uniform class prior,
    fitted on val; their arg-max is the decision the run's balanced accuracy was scored on).
    """
    fields = {k: v for k, v in (("age", age), ("sex", sex), ("localization", localization)) if v is not None}
    prediction = predict_case(run_dir, Case(image, fields), need_balanced=balanced)
    if balanced:
        assert prediction.balanced_probs is not None  # need_balanced raised otherwise
        return prediction.balanced_probs
    return prediction.probs


@torch.no_grad()
def predict_case(
    run_dir: str | Path | Predictor, case: Case, *, need_balanced: bool = False, device: str | None = None
) -> CasePrediction:
    """One case's calibrated and balanced probabilities and its flipped views, from one model load.

    ``run_dir`` may be a loaded :class:`Predictor` (its view setting is overridden for this case).
    ``need_balanced`` makes a run without a balanced decision an error (CheckpointError) rather than None.
    """
    picture = load_rgb(case.image)  # the inputs are checked before the model is loaded
    folder = run_dir.run.folder if isinstance(run_dir, Predictor) else RunFolder(run_dir)
    row = case.table(folder.read_schema())
    if isinstance(run_dir, Predictor):
        predictor = Predictor(run_dir.run, run_dir.fit, run_dir.batch_size, views=True)
    else:
        predictor = Predictor.load(run_dir, device, views=True)
    if need_balanced:
        predictor.run.require_balanced()
    classes = predictor.schema.classes
    if predictor.model.image_branch is None:
        name = predictor.run.cfg.model.name
        note(f"model '{name}' does not look at the image: its prediction comes from the patient fields")
        out = predictor.predict(None, predictor.encode(row))
        views = np.zeros((0, len(classes)))
    else:
        out = predictor.predict(predictor.pixels(picture)[None], predictor.encode(row))
        assert out.views is not None
        views = out.views[:, 0, :]
    balanced = None if out.balanced is None else _named(classes, out.balanced[0])
    embedding = None if out.embeddings is None else out.embeddings[0]
    return CasePrediction(_named(classes, out.calibrated[0]), views, balanced, embedding)


def _named(classes: Sequence[str], probs: np.ndarray) -> dict[str, float]:
    return {c: round(float(p), 6) for c, p in zip(classes, probs, strict=True)}


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
        logits = model.from_image_state(model.image_state(images.flip(dims) if dims else images), meta).float()
        logits = logits / temperature
        out.append(torch.softmax(logits if bias is None else logits + bias, 1).cpu().numpy())
    return np.stack(out)
