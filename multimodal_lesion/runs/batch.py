"""Predicting many images with one model load: a folder of images or a CSV of cases -> a CSV of probabilities.

``mmlesion predict --run RUN --data DIR`` predicts every image below ``DIR`` (patient fields unknown);
``--csv FILE`` predicts the cases of a table whose ``image`` column names each image (relative to the
table's folder, or absolute) and whose other columns named like the run's patient features give them
(absent features are unknown, said so in a note). The model is loaded once; images are decoded, fitted
to the run's input size (:func:`~multimodal_lesion.runs.predict.fit_image`) and predicted in batches,
as the run was scored. The output has one row per image: ``p_<class>`` (calibrated), ``predicted``,
``balanced_p_<class>`` and ``balanced_decision`` (the balanced decision fitted on val), in input order.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data.images import IMAGE_EXTENSIONS, load_rgb
from ..data.patient import typed_column
from ..data.schema import Features
from ..errors import DataError, note
from .predict import Fit, Predictor, Probabilities, aspect_differs

#: The column of a ``--csv`` table that names each image.
IMAGE_COLUMN = "image"


@dataclass(frozen=True)
class Cases:
    """Images to predict and their raw patient fields (one row per image; columns: the features given)."""

    paths: list[Path]
    patients: pd.DataFrame
    ids: list[str]


def cases_in_folder(folder: str | Path) -> Cases:
    """Every image (jpg, jpeg, png) below ``folder``, sorted by relative path; no patient fields."""
    root = Path(folder).expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"{folder}: not a folder of images")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DataError(f"{root}: no images (.jpg, .jpeg, .png) found below it")
    ids = [str(p.relative_to(root).with_suffix("")) for p in paths]
    return Cases(paths, pd.DataFrame(index=range(len(paths))), ids)


def cases_in_csv(table: str | Path) -> Cases:
    """The cases of a CSV with an ``image`` column (paths relative to the CSV's folder, or absolute)."""
    path = Path(table).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"{table}: no such CSV file")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(
            f"{path}: file is empty (expected a header with an '{IMAGE_COLUMN}' column and one row per case)"
        ) from None
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV ({str(exc).splitlines()[0][:160]})") from None
    if IMAGE_COLUMN not in frame.columns:
        raise DataError(
            f"{path}: no column '{IMAGE_COLUMN}' (the image of each case); has {', '.join(frame.columns[:6])}"
        )
    if frame.empty:  # else the encoder would refuse an empty table without naming the file
        raise DataError(f"{path}: has a header but no rows (expected one row per case)")
    empty = np.flatnonzero(frame[IMAGE_COLUMN].str.strip().eq("").to_numpy())
    if len(empty):
        raise DataError(f"{path}: row {empty[0] + 1} (line {empty[0] + 2}), column '{IMAGE_COLUMN}': empty")
    paths = [(path.parent / p.strip()).resolve() for p in frame[IMAGE_COLUMN]]
    ids = [Path(p.strip()).with_suffix("").as_posix() for p in frame[IMAGE_COLUMN]]
    patients = frame.drop(columns=[IMAGE_COLUMN]).replace("", None).reset_index(drop=True)
    return Cases(paths, patients, ids)


def patient_table(cases: Cases, features: Features, source: str) -> pd.DataFrame:
    """The run's patient features of every case, typed by the reader's rules (an age from 0 to 120, numbers,
    booleans; a bad cell is an error naming its row and column); features ``source`` lacks are missing,
    with a note."""
    absent = [f for f in features.names if f not in cases.patients.columns]
    ignored = [c for c in cases.patients.columns if c not in features.names]
    if absent:
        note(f"{source}: no column for patient feature(s) {', '.join(absent)}: read as missing for every image")
    if ignored:
        note(f"{source}: column(s) {', '.join(map(str, ignored[:6]))} are not features of this run; ignored")
    table = pd.DataFrame(
        {f: cases.patients[f] if f in cases.patients.columns else None for f in features.names},
        index=range(len(cases.paths)),
    )
    for name in (*features.numeric, *features.boolean):
        if name in cases.patients.columns:
            table[name] = typed_column(table[name], name, features, functools.partial(_cell, source, name))
        elif name in features.numeric:
            table[name] = np.nan
    return table


def _cell(source: str, column: str, row: int) -> str:
    """'FILE: row N (line L), column C' of a ``--csv`` cell (line 1 is the header)."""
    return f"{source}: row {row + 1} (line {row + 2}), column '{column}'"


def decoded(predictor: Predictor, paths: list[Path], source: str, notes: bool = True) -> Iterator[np.ndarray]:
    """Chunks of fitted uint8 images (B, H, W, 3), decoded by the reader's rules; one note for odd shapes."""
    size = predictor.run.cfg.data.image_size
    odd = 0
    for i in range(0, len(paths), predictor.batch_size):
        chunk = []
        for p in paths[i : i + predictor.batch_size]:
            img = load_rgb(p)
            odd += aspect_differs(img, size)
            chunk.append(predictor.pixels(img))
        yield np.stack(chunk)
    if odd and notes:
        how = {"pad": "padded", "crop": "centre-cropped", "stretch": "stretched"}[predictor.fit]
        note(f"{source}: {odd} image(s) of another aspect ratio than the run's {size[1]}x{size[0]}: {how} to fit")


def predict_arrays(predictor: Predictor, cases: Cases, source: str) -> Probabilities:
    """Calibrated (and balanced) probabilities of every case, in order, predicted in batches."""
    meta = predictor.encode(patient_table(cases, predictor.schema.features, source))
    if predictor.model.image_branch is None:
        return predictor.predict(None, meta)
    chunks = [
        predictor.predict(px, meta[i : i + len(px)]) for i, px in _offsets(decoded(predictor, cases.paths, source))
    ]
    balanced = [c.balanced for c in chunks if c.balanced is not None]
    embeddings = [c.embeddings for c in chunks if c.embeddings is not None]
    return Probabilities(
        np.concatenate([c.calibrated for c in chunks]),
        np.concatenate(balanced) if len(balanced) == len(chunks) else None,
        None,
        np.concatenate(embeddings) if len(embeddings) == len(chunks) else None,
    )


def adapt_to_cases(predictor: Predictor, cases: Cases, source: str) -> dict[str, Any]:
    """AdaBN on the images of ``cases`` (:meth:`Predictor.adapt_batchnorm`); what it did, for ``metrics.json``."""
    return predictor.adapt_batchnorm(decoded(predictor, cases.paths, source, notes=False))


def prediction_frame(cases: Cases, classes: tuple[str, ...], probs: Probabilities) -> pd.DataFrame:
    """One row per case: id, image path, calibrated and balanced probabilities and their arg-max decisions."""
    out = pd.DataFrame({"image_id": cases.ids, "image": [str(p) for p in cases.paths]})
    names = list(classes)
    for prefix, p, decision in (
        ("p_", probs.calibrated, "predicted"),
        ("balanced_p_", probs.balanced, "balanced_decision"),
    ):
        if p is not None:
            out[[f"{prefix}{c}" for c in names]] = p  # full precision, as predictions_<split>.csv
            out[decision] = [names[k] for k in p.argmax(1)]
    return out


def predict_cases(predictor: Predictor, cases: Cases, source: str) -> pd.DataFrame:
    """:func:`predict_arrays` as the CSV table of :func:`prediction_frame`."""
    return prediction_frame(cases, predictor.schema.classes, predict_arrays(predictor, cases, source))


def _offsets(chunks: Iterator[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    start = 0
    for chunk in chunks:
        yield start, chunk
        start += len(chunk)


def predict_table(
    run_dir: str | Path,
    *,
    folder: str | Path | None = None,
    table: str | Path | None = None,
    device: str | None = None,
    fit: Fit = "pad",
    adapt_bn: bool = False,
) -> pd.DataFrame:
    """Predict the images of ``folder`` or the cases of ``table`` (exactly one) with one model load.

    ``adapt_bn``: the run's batch-norm statistics are first re-estimated on these images (AdaBN).
    """
    if (folder is None) == (table is None):
        raise DataError("give a folder of images or a CSV of cases (exactly one)")
    cases = cases_in_folder(folder) if folder is not None else cases_in_csv(table)  # type: ignore[arg-type]
    source = str(folder if folder is not None else table)
    predictor = Predictor.load(run_dir, device, fit=fit)
    if adapt_bn:
        adapt_to_cases(predictor, cases, source)
    return predict_cases(predictor, cases, source)
