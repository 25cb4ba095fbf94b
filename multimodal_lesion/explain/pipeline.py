"""``mmlesion explain``: Grad-CAM + grouped SHAP + image-vs-metadata Shapley values for the cases of a
run, faithfulness measured against baselines, returned as a :class:`CohortExplanation`.

Every explained number is the run's calibrated probability of the explained class (the predicted
class): ``shap_base_value + sum(shap) == model_output`` and likewise for the modality split. This
module computes; the report layer draws (figures, HTML) and :func:`save_explanations` writes the
maps and ``explanations.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..data.constants import CLASSES, PATIENT_FEATURES
from ..data.ham10000 import load_mask
from ..errors import ConfigError, DataError
from ..io import atomic_write, safe_stem, write_json
from ..runs import LoadedRun, RunInputs, load_run
from .faithfulness import faithfulness_report, randomisation_check, randomised_cams
from .gradcam import GradCamExplainer
from .modality import ModalityAttribution, modality_shapley
from .results import CaseExplanation, CohortExplanation, FaithfulnessRow
from .shap_groups import GroupShapExplainer

CAM_BATCH = 8
ASSETS = Path("cases") / "assets"


@dataclass
class CaseBatch:
    """The selected cases: row numbers, normalised images, metadata, embeddings and targets."""

    rows: np.ndarray
    images: torch.Tensor
    meta: torch.Tensor
    embeddings: torch.Tensor | None
    probs: np.ndarray
    targets: list[int]


def select_cases(inputs: RunInputs, split: str, cases: Sequence[str] | None, n: int, seed: int) -> np.ndarray:
    """Rows to explain: the named image ids, else ``n`` cases of ``split`` spread over the true classes."""
    ids = inputs.ham.metadata["image_id"]
    if cases:
        lookup = pd.Series(np.arange(len(ids)), index=ids.to_numpy())
        unknown = [c for c in cases if c not in lookup.index]
        if unknown:
            raise DataError(f"--cases: image id(s) not in the data: {', '.join(map(repr, unknown[:5]))}")
        return lookup[list(dict.fromkeys(cases))].to_numpy()
    rows = inputs.indices(split)
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(rows[inputs.targets[rows] == k]).tolist() for k in range(len(CLASSES))]
    picked: list[int] = []
    while len(picked) < min(n, len(rows)):  # round-robin over classes: rare classes get cases too
        for queue in by_class:
            if queue and len(picked) < n:
                picked.append(queue.pop())
    return np.asarray(picked, dtype=np.int64)


def load_cases(run: LoadedRun, rows: np.ndarray) -> CaseBatch:
    """Images, metadata, embeddings and the calibrated prediction of each selected case."""
    inputs = run.inputs
    emb = inputs.embeddings_of(rows)
    meta = torch.from_numpy(inputs.meta[rows]).to(inputs.device)
    with torch.no_grad():
        logits = inputs.model.forward_head(emb, meta) / run.temperature
    probs = torch.softmax(logits.float(), 1).cpu().numpy()
    images = inputs.normalized_images(rows) if inputs.model.uses_image else torch.empty(0)
    return CaseBatch(rows, images, meta, emb, probs, probs.argmax(1).tolist())


def background(inputs: RunInputs, size: int, seed: int) -> tuple[torch.Tensor | None, np.ndarray]:
    """A seeded sample of training cases: their embeddings (or None) and encoded metadata."""
    train = inputs.indices("train")
    rows = np.sort(np.random.default_rng(seed).choice(train, size=min(size, len(train)), replace=False))
    return inputs.embeddings_of(rows), inputs.meta[rows]


def compute_cams(run: LoadedRun, batch: CaseBatch) -> np.ndarray | None:
    """Grad-CAM maps (B, H, W) of the explained classes, in batches."""
    inputs = run.inputs
    if not inputs.model.uses_image:
        return None
    cfg = inputs.cfg.explain
    with GradCamExplainer(inputs.model, cfg.method, cfg.target_layer or None) as cam:
        return np.concatenate(
            [
                cam.explain(
                    batch.images[i : i + CAM_BATCH], batch.meta[i : i + CAM_BATCH], batch.targets[i : i + CAM_BATCH]
                )
                for i in range(0, len(batch.rows), CAM_BATCH)
            ]
        )


def lesion_mask(inputs: RunInputs, row: int) -> np.ndarray | None:
    """The case's lesion mask at the model's input size, when the data has one."""
    path = inputs.ham.metadata["mask_path"].iloc[row]
    if not path:
        return None
    with Image.open(inputs.ham.metadata["path"].iloc[row]) as img:
        original = img.size  # a mask must match its image before both are resized
    height, width = inputs.cfg.data.image_size
    return load_mask(path, size=(width, height), expected_size=original)


def faithfulness(run: LoadedRun, batch: CaseBatch, cams: np.ndarray | None) -> list[dict[str, Any]]:
    """Deletion/insertion (and, with masks, pointing game and energy inside) for the first cases,
    plus the model-randomisation rank correlation; {} for cases beyond the configured counts."""
    inputs, cfg = run.inputs, run.inputs.cfg.explain
    out: list[dict[str, Any]] = [{} for _ in batch.rows]
    if cams is None:
        return out
    for i in range(min(cfg.faithfulness_cases, len(batch.rows))):
        report = faithfulness_report(
            inputs.model,
            batch.images[i],
            batch.meta[i],
            cams[i],
            batch.targets[i],
            mask=lesion_mask(inputs, int(batch.rows[i])),
            steps=cfg.steps,
            seed=cfg.seed,
        )
        out[i] = {f"{k}{'' if name == 'map' else '_' + name}": v for name, d in report.items() for k, v in d.items()}
    k = min(cfg.randomisation_cases, len(batch.rows))
    if k:
        random_cams = randomised_cams(
            inputs.model,
            batch.images[:k],
            batch.meta[:k],
            batch.targets[:k],
            method=cfg.method,
            target_layer=cfg.target_layer or None,
            seed=cfg.seed,
        )
        for i in range(k):
            out[i]["randomisation_spearman"] = randomisation_check(cams[i], random_cams[i])
    return out


def _patient(meta_row: pd.Series) -> dict[str, str]:
    age = meta_row["age"]
    return {
        "age": "unknown" if pd.isna(age) else f"{age:g}",
        "sex": str(meta_row["sex"]),
        "localization": str(meta_row["localization"]),
    }


class _Stopwatch:
    """Seconds per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        t = time.perf_counter()
        result = fn(*args)
        self.seconds[name] = time.perf_counter() - t
        return result


def explain_run(
    run_dir: str | Path,
    *,
    data: str | Path | None = None,
    split: str = "test",
    cases: Sequence[str] | None = None,
    n: int | None = None,
) -> CohortExplanation:
    """Explain cases of a trained run: maps, SHAP and modality values, faithfulness and provenance.

    ``n`` cases (default: the run's ``explain.n_cases``) unless ``cases`` names them.
    """
    if n is not None and n < 1:
        raise ConfigError(f"n: the number of cases to explain must be >= 1, got {n}")
    run = load_run(run_dir, data)
    inputs, cfg = run.inputs, run.inputs.cfg.explain
    rows = select_cases(inputs, split, cases, cfg.n_cases if n is None else n, cfg.seed)
    batch = load_cases(run, rows)
    timed = _Stopwatch()
    cams = timed("gradcam", compute_cams, run, batch)
    bg_emb, bg_meta = background(inputs, cfg.background_size, cfg.seed)
    groups = inputs.encoder.feature_groups_
    raw = inputs.ham.metadata.iloc[rows][list(PATIENT_FEATURES)].reset_index(drop=True)
    shap_exp = timed(
        "shap",
        lambda: GroupShapExplainer(inputs.model, bg_meta, groups, temperature=run.temperature).explain(
            batch.embeddings, batch.meta, batch.targets, raw=raw
        ),
    )
    modality = timed(
        "modality",
        lambda: modality_shapley(
            inputs.model,
            batch.embeddings,
            batch.meta,
            bg_emb,
            bg_meta,
            groups,
            batch.targets,
            temperature=run.temperature,
        ),
    )
    faith = timed("faithfulness", faithfulness, run, batch, cams)
    case_list = [_case(run, batch, i, cams, shap_exp, modality, faith[i]) for i in range(len(rows))]
    return _cohort(run, split, case_list, shap_exp, timed.seconds)


def _case(
    run: LoadedRun,
    batch: CaseBatch,
    i: int,
    cams: np.ndarray | None,
    shap_exp: Any,
    modality: ModalityAttribution,
    faith: dict[str, Any],
) -> CaseExplanation:
    """The typed result of case ``i``."""
    row = int(batch.rows[i])
    row_meta = run.inputs.ham.metadata.iloc[row]
    target = batch.targets[i]
    return CaseExplanation(
        image_id=str(row_meta["image_id"]),
        target_class=CLASSES[target],
        true_label=str(row_meta["dx"]),
        probabilities=dict(zip(CLASSES, map(float, batch.probs[i]), strict=True)),
        patient=_patient(row_meta),
        shap=dict(zip(shap_exp.feature_names, map(float, shap_exp.values[i]), strict=True)),
        shap_base_value=float(shap_exp.base_values[i]),
        model_output=float(batch.probs[i][target]),
        modality=dict(zip(modality.players, map(float, modality.values[i]), strict=True)),
        modality_base_value=float(modality.base_values[i]),
        faithfulness=faith,
        pixels=np.array(run.inputs.images()[row]),
        cam=None if cams is None else cams[i],
    )


def _mean_abs(cases: list[CaseExplanation], key: str) -> dict[str, dict[str, float]]:
    """Mean |value| per feature, per explained class and over all cases."""
    frame = pd.DataFrame([{**{k: abs(v) for k, v in getattr(c, key).items()}, "cls": c.target_class} for c in cases])
    table = {str(k): g.drop(columns="cls").mean().to_dict() for k, g in frame.groupby("cls")}
    table["all"] = frame.drop(columns="cls").mean().to_dict()
    return table


def _shares(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {p: v / max(sum(row.values()), 1e-12) for p, v in row.items()} for k, row in table.items()}


def _mean_or_none(frame: pd.DataFrame, column: str) -> float | None:
    value = frame[column].mean() if column in frame else float("nan")
    return None if np.isnan(value) else float(value)


def _faith_rows(cases: list[CaseExplanation]) -> list[FaithfulnessRow]:
    """Mean of each faithfulness figure for the CAM and its random / centre baselines."""
    frame = pd.DataFrame([c.faithfulness for c in cases if c.faithfulness])
    if frame.empty:
        return []
    notes = {
        "deletion_auc": "lower is better",
        "insertion_auc": "higher is better",
        "pointing_game": "share of cases with the maximum inside the lesion",
        "energy_inside": "share of map mass inside the lesion",
    }
    rows = [
        FaithfulnessRow(
            m,
            _mean_or_none(frame, m),
            _mean_or_none(frame, f"{m}_random"),
            _mean_or_none(frame, f"{m}_centre"),
            f"{note} (mean over {frame[m].notna().sum()} cases)",
        )
        for m, note in notes.items()
        if m in frame
    ]
    if "randomisation_spearman" in frame:
        rows.append(
            FaithfulnessRow(
                "randomisation_spearman",
                _mean_or_none(frame, "randomisation_spearman"),
                note="rank correlation with the CAM of a re-initialised backbone: low = the map depends on the weights",
            )
        )
    return rows


def _cohort(
    run: LoadedRun, split: str, cases: list[CaseExplanation], shap_exp: Any, timings: dict[str, float]
) -> CohortExplanation:
    """The cohort summary: SHAP and modality tables, faithfulness, provenance."""
    inputs = run.inputs
    cfg = inputs.cfg
    provenance = {
        "run": str(run.run_dir),
        "model": cfg.model.name,
        "backbone": cfg.model.backbone,
        "weights": cfg.model.weights,
        "training": cfg.train.mode,
        "data root": str(inputs.ham.root),
        "data fingerprint": inputs.ham.fingerprint[:16],
        "split": split,
        "cases": str(len(cases)),
        "temperature": f"{run.temperature:.3f}",
        "CAM method": cfg.explain.method,
        "SHAP background": f"{cfg.explain.background_size} training cases (seed {cfg.explain.seed})",
    }
    notes = [
        f"Explained output: the calibrated probability of the predicted class (temperature "
        f"{run.temperature:.3f}). SHAP is exact over the 8 coalitions of age / sex / localization; the "
        f"modality split is exact over the 16 coalitions of image / age / sex / localization."
    ]
    return CohortExplanation(
        title=f"Explanations: {cfg.model.name} on {split}",
        provenance=provenance,
        cases=cases,
        mean_abs_shap=_mean_abs(cases, "shap"),
        modality_share=_shares(_mean_abs(cases, "modality")),
        faithfulness=_faith_rows(cases),
        notes=notes,
        timings=timings,
        shap_values=shap_exp,
    )


def save_explanations(out: str | Path, cohort: CohortExplanation) -> Path:
    """Write each case's map (``cases/assets/<stem>_cam.npy``) and ``explanations.json``; returns the JSON path."""
    out = Path(out)
    for case in cohort.cases:
        if case.cam is not None:
            relative = ASSETS / f"{safe_stem(case.image_id)}_cam.npy"
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(out / relative, "wb") as fh:
                np.save(fh, case.cam.astype(np.float32))
            case.cam_file = str(relative)
    return write_json(out / "explanations.json", cohort.to_json())
