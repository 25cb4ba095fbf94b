"""``mmlesion explain``: Grad-CAM + grouped SHAP + image-vs-metadata Shapley values for the cases of a
run, faithfulness measured against baselines, written as ``explanations.json`` and an HTML report.

Every explained number is the run's calibrated probability of the explained class (the predicted
class): ``shap_base_value + sum(shap) == model_output`` and likewise for the modality split.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..data.constants import CLASSES, PATIENT_FEATURES
from ..data.ham10000 import load_mask
from ..errors import DataError
from ..io import atomic_write, write_json
from ..training.embeddings import embed_images
from ..training.runner import LoadedRun, Prepared, load_run
from .faithfulness import faithfulness_report, randomisation_check, randomised_cams
from ..report.explanation_figures import (beeswarm_png, modality_bar_png, modality_by_class_png, overlay_png,
                                          rgb_png, shap_bar_png, waterfall_png)
from .gradcam import GradCamExplainer
from .modality import modality_shapley
from .shap_groups import GroupShapExplainer

CAM_BATCH = 8


@dataclass
class CaseBatch:
    """The selected cases: row numbers, normalised images, metadata, embeddings and targets."""

    rows: np.ndarray
    images: torch.Tensor
    meta: torch.Tensor
    embeddings: torch.Tensor | None
    probs: np.ndarray
    targets: list[int]


def select_cases(prep: Prepared, split: str, cases: Sequence[str] | None, n: int, seed: int) -> np.ndarray:
    """Rows to explain: the named image ids, else ``n`` cases of ``split`` spread over the true classes."""
    ids = prep.ham.metadata["image_id"]
    if cases:
        lookup = pd.Series(np.arange(len(ids)), index=ids.to_numpy())
        unknown = [c for c in cases if c not in lookup.index]
        if unknown:
            raise DataError(f"--cases: image id(s) not in the data: {', '.join(map(repr, unknown[:5]))}")
        return lookup[list(dict.fromkeys(cases))].to_numpy()
    rows = prep.indices(split)
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(rows[prep.targets[rows] == k]).tolist() for k in range(len(CLASSES))]
    picked: list[int] = []
    while len(picked) < min(n, len(rows)):  # round-robin over classes: rare classes get cases too
        for queue in by_class:
            if queue and len(picked) < n:
                picked.append(queue.pop())
    return np.asarray(picked, dtype=np.int64)


def embeddings_of(prep: Prepared, rows: np.ndarray) -> torch.Tensor | None:
    """Image embeddings of ``rows``: the cached ones (frozen path) or computed live (end-to-end)."""
    model = prep.model
    if model.image_branch is None:
        return None
    if prep.cfg.train.mode == "frozen":
        return torch.from_numpy(prep.embeddings(show=False)[rows]).to(prep.device)
    with torch.no_grad():
        return torch.cat([embed_images(model.image_branch, _images(prep, rows[i:i + 32]), False)
                          for i in range(0, len(rows), 32)])


def _images(prep: Prepared, rows: np.ndarray) -> torch.Tensor:
    pixels = torch.from_numpy(np.array(prep.images()[rows])).permute(0, 3, 1, 2)
    return prep.normalize(pixels).to(prep.device)


def load_cases(run: LoadedRun, rows: np.ndarray) -> CaseBatch:
    """Images, metadata, embeddings and the calibrated prediction of each selected case."""
    prep = run.prep
    emb = embeddings_of(prep, rows)
    meta = torch.from_numpy(prep.meta[rows]).to(prep.device)
    with torch.no_grad():
        logits = prep.model.forward_head(emb, meta) / run.temperature
    probs = torch.softmax(logits.float(), 1).cpu().numpy()
    images = _images(prep, rows) if prep.model.uses_image else torch.empty(0)
    return CaseBatch(rows, images, meta, emb, probs, probs.argmax(1).tolist())


def background(prep: Prepared, size: int, seed: int) -> tuple[torch.Tensor | None, np.ndarray]:
    """A seeded sample of training cases: their embeddings (or None) and encoded metadata."""
    train = prep.indices("train")
    rows = np.sort(np.random.default_rng(seed).choice(train, size=min(size, len(train)), replace=False))
    return embeddings_of(prep, rows), prep.meta[rows]


def compute_cams(run: LoadedRun, batch: CaseBatch) -> np.ndarray | None:
    """Grad-CAM maps (B, H, W) of the explained classes, in batches."""
    prep = run.prep
    if not prep.model.uses_image:
        return None
    cfg = prep.cfg.explain
    with GradCamExplainer(prep.model, cfg.method, cfg.target_layer or None) as cam:
        return np.concatenate([cam.explain(batch.images[i:i + CAM_BATCH], batch.meta[i:i + CAM_BATCH],
                                           batch.targets[i:i + CAM_BATCH])
                               for i in range(0, len(batch.rows), CAM_BATCH)])


def lesion_mask(prep: Prepared, row: int) -> np.ndarray | None:
    """The case's lesion mask at the model's input size, when the data has one."""
    path = prep.ham.metadata["mask_path"].iloc[row]
    if not path:
        return None
    with Image.open(prep.ham.metadata["path"].iloc[row]) as img:
        original = img.size  # a mask must match its image before both are resized
    height, width = prep.cfg.data.image_size
    return load_mask(path, size=(width, height), expected_size=original)


def faithfulness(run: LoadedRun, batch: CaseBatch, cams: np.ndarray | None) -> list[dict[str, Any]]:
    """Deletion/insertion (and, with masks, pointing game and energy inside) for the first cases,
    plus the model-randomisation rank correlation; {} for cases beyond the configured counts."""
    prep, cfg = run.prep, run.prep.cfg.explain
    out: list[dict[str, Any]] = [{} for _ in batch.rows]
    if cams is None:
        return out
    for i in range(min(cfg.faithfulness_cases, len(batch.rows))):
        report = faithfulness_report(prep.model, batch.images[i], batch.meta[i], cams[i], batch.targets[i],
                                     mask=lesion_mask(prep, int(batch.rows[i])), steps=cfg.steps, seed=cfg.seed)
        out[i] = {f"{k}{'' if name == 'map' else '_' + name}": v for name, d in report.items() for k, v in d.items()}
    k = min(cfg.randomisation_cases, len(batch.rows))
    if k:
        random_cams = randomised_cams(prep.model, batch.images[:k], batch.meta[:k], batch.targets[:k],
                                      method=cfg.method, target_layer=cfg.target_layer or None, seed=cfg.seed)
        for i in range(k):
            out[i]["randomisation_spearman"] = randomisation_check(cams[i], random_cams[i])
    return out


def _patient(meta_row: pd.Series) -> dict[str, str]:
    age = meta_row["age"]
    return {"age": "unknown" if pd.isna(age) else f"{age:g}", "sex": str(meta_row["sex"]),
            "localization": str(meta_row["localization"])}


def explain_run(run_dir: str | Path, out: str | Path, *, data: str | Path | None = None, split: str = "test",
                cases: Sequence[str] | None = None, n: int | None = None, show: bool = True) -> Path:
    """Explain cases of a trained run and write ``explanations.json``, maps, figures and the HTML report."""
    from ..report.html import case_page_name, write_report

    t0 = time.perf_counter()
    out = Path(out)
    run = load_run(run_dir, data)
    prep, cfg = run.prep, run.prep.cfg.explain
    rows = select_cases(prep, split, cases, n or cfg.n_cases, cfg.seed)
    batch = load_cases(run, rows)
    timings: dict[str, float] = {}

    def timed(name: str, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        timings[name] = time.perf_counter() - t
        return result

    cams = timed("gradcam", compute_cams, run, batch)
    bg_emb, bg_meta = background(prep, cfg.background_size, cfg.seed)
    groups = prep.encoder.feature_groups_
    raw = prep.ham.metadata.iloc[rows][list(PATIENT_FEATURES)].reset_index(drop=True)
    shap_exp = timed("shap", lambda: GroupShapExplainer(prep.model, bg_meta, groups, temperature=run.temperature)
                     .explain(batch.embeddings, batch.meta, batch.targets, raw=raw))
    modality = timed("modality", lambda: modality_shapley(prep.model, batch.embeddings, batch.meta, bg_emb, bg_meta,
                                                          groups, batch.targets, temperature=run.temperature))
    faith = timed("faithfulness", faithfulness, run, batch, cams)
    case_dicts = timed("figures", _write_cases, out, run, batch, cams, shap_exp, modality, faith, case_page_name)
    cohort = _cohort(out, run, split, case_dicts, shap_exp, modality, timings)
    write_json(out / "explanations.json", {"provenance": cohort["provenance"], "timings_seconds": timings,
                                           "cases": [_json_case(c) for c in case_dicts]})
    index = write_report(out, cohort, case_dicts)
    if show:
        total = time.perf_counter() - t0
        per = ", ".join(f"{k} {v / len(rows):.3f}" for k, v in timings.items())
        print(f"explained {len(rows)} cases in {total:.1f} s ({total / len(rows):.2f} s per case; per case: {per})")
    return index


def _write_cases(out: Path, run: LoadedRun, batch: CaseBatch, cams, shap_exp, modality, faith, page_name
                 ) -> list[dict[str, Any]]:
    """Per case: the saved map, the figures and the dict that the report and the JSON need."""
    prep = run.prep
    meta = prep.ham.metadata
    cases = []
    for i, row in enumerate(batch.rows):
        row_meta = meta.iloc[int(row)]
        stem = page_name(str(row_meta["image_id"])).removesuffix(".html")
        folder = out / "cases" / "assets"
        figures: dict[str, Any] = {}
        pixels = np.array(prep.images()[row])
        figures["image"] = rgb_png(pixels, folder / f"{stem}_image.png")
        cam_path = None
        if cams is not None:
            cam_path = folder / f"{stem}_cam.npy"
            with atomic_write(cam_path, "wb") as fh:
                np.save(fh, cams[i].astype(np.float32))
            figures["overlay"] = overlay_png(pixels, cams[i], folder / f"{stem}_overlay.png")
        target = CLASSES[batch.targets[i]]
        shap_values = dict(zip(shap_exp.feature_names, map(float, shap_exp.values[i])))
        figures["waterfall"] = waterfall_png(shap_exp[i], folder / f"{stem}_waterfall.png", target)
        mod_values = dict(zip(modality.players, map(float, modality.values[i])))
        figures["modality"] = modality_bar_png(mod_values, folder / f"{stem}_modality.png", target)
        cases.append({
            "image_id": str(row_meta["image_id"]), "true_label": str(row_meta["dx"]), "target_class": target,
            "probabilities": dict(zip(CLASSES, map(float, batch.probs[i]))), "patient": _patient(row_meta),
            "shap": shap_values, "shap_base_value": float(shap_exp.base_values[i]),
            "model_output": float(batch.probs[i][batch.targets[i]]), "modality": mod_values,
            "modality_base_value": float(modality.base_values[i]), "faithfulness": faith[i],
            "cam": str(cam_path.relative_to(out)) if cam_path else None, "figures": figures})
    return cases


def _json_case(case: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in case.items() if k not in ("figures", "patient")} | {"patient": case["patient"]}


def _mean_abs(cases: list[dict[str, Any]], key: str) -> dict[str, dict[str, float]]:
    """Mean |value| per feature, per explained class and over all cases."""
    frame = pd.DataFrame([{**{k: abs(v) for k, v in c[key].items()}, "cls": c["target_class"]} for c in cases])
    table = {str(k): g.drop(columns="cls").mean().to_dict() for k, g in frame.groupby("cls")}
    table["all"] = frame.drop(columns="cls").mean().to_dict()
    return table


def _shares(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {p: v / max(sum(row.values()), 1e-12) for p, v in row.items()} for k, row in table.items()}


def _faith_rows(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean of each faithfulness figure for the CAM and its random / centre baselines."""
    frame = pd.DataFrame([c["faithfulness"] for c in cases if c["faithfulness"]])
    if frame.empty:
        return []
    notes = {"deletion_auc": "lower is better", "insertion_auc": "higher is better",
             "pointing_game": "share of cases with the maximum inside the lesion",
             "energy_inside": "share of map mass inside the lesion"}
    rows = [{"metric": m, "cam": frame[m].mean(), "random": frame.get(f"{m}_random", pd.Series(dtype=float)).mean(),
             "centre": frame.get(f"{m}_centre", pd.Series(dtype=float)).mean(),
             "note": f"{note} (mean over {frame[m].notna().sum()} cases)"}
            for m, note in notes.items() if m in frame]
    if "randomisation_spearman" in frame:
        rows.append({"metric": "randomisation_spearman", "cam": frame["randomisation_spearman"].mean(),
                     "random": None, "centre": None,
                     "note": "rank correlation with the CAM of a re-initialised backbone: low = the map depends on the weights"})
    return [{k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()} for r in rows]


def _cohort(out: Path, run: LoadedRun, split: str, cases, shap_exp, modality, timings) -> dict[str, Any]:
    """The cohort summary of the report: SHAP and modality tables, figures, faithfulness, provenance."""
    prep = run.prep
    cfg = prep.cfg
    folder = out / "figures"
    mean_shap, mean_mod = _mean_abs(cases, "shap"), _mean_abs(cases, "modality")
    figures = {"beeswarm": beeswarm_png(shap_exp, folder / "beeswarm.png"),
               "shap_bar": shap_bar_png(shap_exp, folder / "shap_bar.png"),
               "modality_by_class": modality_by_class_png(_shares(mean_mod), folder / "modality_by_class.png")}
    provenance = {"run": str(run.run_dir), "model": cfg.model.name, "backbone": cfg.model.backbone,
                  "weights": cfg.model.weights, "training": cfg.train.mode, "data root": str(prep.ham.root),
                  "data fingerprint": prep.ham.fingerprint[:16], "split": split, "cases": str(len(cases)),
                  "temperature": f"{run.temperature:.3f}", "CAM method": cfg.explain.method,
                  "SHAP background": f"{cfg.explain.background_size} training cases (seed {cfg.explain.seed})"}
    notes = [f"Explained output: the calibrated probability of the predicted class (temperature "
             f"{run.temperature:.3f}). SHAP is exact over the 8 coalitions of age / sex / localization; the "
             f"modality split is exact over the 16 coalitions of image / age / sex / localization.",
             "Seconds per case: " + ", ".join(f"{k} {v / len(cases):.3f}" for k, v in timings.items())]
    return {"title": f"Explanations: {cfg.model.name} on {split}", "provenance": provenance,
            "mean_abs_shap": mean_shap, "modality_share": _shares(mean_mod), "faithfulness": _faith_rows(cases),
            "figures": figures, "notes": notes}
