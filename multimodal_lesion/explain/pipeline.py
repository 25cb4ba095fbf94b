"""``mmlesion explain``: Grad-CAM + grouped SHAP + image-vs-metadata Shapley values for the cases of a
run, faithfulness measured against baselines, sanity checks, returned as a :class:`CohortExplanation`.

One number is explained per case: the displayed prediction, i.e. the run's temperature-scaled
probability of the predicted class computed from the same embedding the run evaluates (the frozen
path's cached, flip-averaged embedding; end-to-end runs embed the unflipped image). SHAP and the
modality split explain that probability (or its log-odds with ``explain.shap_scale``):
``shap_base_value + sum(shap) == model_output``, likewise for the modality split. Grad-CAM
differentiates the predicted class's temperature-scaled logit of the same function of the image
(the same flips), and the deletion / insertion / ROAD curves follow the same probability, so the
probability in the CAM's own pass equals the displayed one (``explained_probability``, to 1e-5).

This module computes; the report layer draws (figures, HTML, tables) and :func:`save_explanations`
writes the maps and ``explanations.json``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..config import replace
from ..data.constants import CLASS_NAMES
from ..data.images import load_mask
from ..data.schema import DatasetSchema
from ..errors import ConfigError, DataError
from ..io import atomic_write, safe_stem, write_json
from ..models import FLIPS
from ..models.inference import backend_available
from ..runs import LoadedRun, RunInputs, load_run, tta_spread, view_probabilities
from ..runs.embeddings import compiled_branch_pass
from .faithfulness import (
    HIGHER_IS_BETTER,
    MAP_NAMES,
    BaselineMaps,
    CasePredictor,
    CurveSettings,
    FaithfulnessCase,
    RoadImputer,
    baseline_maps,
    compare_to_baselines,
    faithfulness_reports,
)
from .gradcam import (
    NO_FLIP,
    LayerGeometry,
    ScoredMaps,
    flip_views,
    layer_geometry,
    preserved_state,
    shown_view,
    state_logits,
)
from .metadata_effect import MetadataEffect, fusion_kind, metadata_effect
from .modality import ModalityAttribution, modality_shapley
from .randomisation import CamSetup, StageResult, cascading_randomisation, random_logit_check
from .results import CaseExplanation, CohortExplanation, FaithfulnessRow
from .resume import ChunkStore, ReportStore, case_key
from .selection import NAMED, select_by_outcome
from .shap_groups import LINKS, MAX_EXACT_PLAYERS, GroupShapExplainer
from .whatif import WhatIf, cams_across_ages, what_if

CAM_BATCH = 8
CHUNK = 16  # cases of a report computed, drawn and kept together
PREDICT_BATCH = 256
ASSETS = Path("cases") / "assets"


def games_note(features: Sequence[str]) -> str:
    """Why a feature's SHAP value and its modality value differ, naming the run's own features."""
    n = len(features)
    return (
        "Why a feature's SHAP value and its modality value differ: they are Shapley values of two "
        f"different games. SHAP holds the image at the case's own embedding and lets only {_listed(features)} be "
        f"absent ({n} player{'s' if n != 1 else ''}); the modality split also lets the image be absent "
        f"({n + 1} players), so a patient feature is also credited for what it adds when the image is missing."
    )


def _listed(names: Sequence[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    names = list(names)
    return " and ".join(names) if len(names) <= 2 else f"{', '.join(names[:-1])} and {names[-1]}"


def _exactness(players: Sequence[str], what: str) -> str:
    """'SHAP is exact over the 8 coalitions of age / sex / localization', or sampled above the exact limit."""
    n = len(players)
    if n <= MAX_EXACT_PLAYERS:
        return f"{what} is exact over the {2**n} coalitions of {' / '.join(players)}"
    listed = " / ".join(players)
    return f"{what} is sampled over orders of its {n} players ({listed}; too many for all {2**n} coalitions)"


@dataclass
class CaseBatch:
    """The selected cases: row numbers, normalised images, metadata, image states, probabilities, targets.

    ``states`` are ``model.image_state`` of the images as the run evaluates them: the (cached) embedding
    of a late model, the maps at the fusion point of a model that fuses on the maps.
    """

    rows: np.ndarray
    images: torch.Tensor
    meta: torch.Tensor
    states: torch.Tensor | None
    probs: np.ndarray
    targets: list[int]
    selection: list[str]


def shown_flip_average(inputs: RunInputs) -> bool:
    """Whether the displayed probability averages the embedding over flips (the frozen path's cache)."""
    return inputs.cfg.train.mode == "frozen" and inputs.cfg.train.flip_average


STATE_BATCH = 32  # images per image_state pass of a model that fuses on the maps


def shown_states(inputs: RunInputs, rows: np.ndarray) -> torch.Tensor | None:
    """``model.image_state`` of ``rows`` behind the displayed prediction: a late model's embeddings as
    before (cached on the frozen path, else live), a map model's maps computed live from the unflipped
    images (float32, like the Grad-CAM pass, not partial mode's float16 cache); None without an image."""
    model = inputs.model
    if model.image_branch is None:
        return None
    if not model.fuses_on_maps:
        return inputs.embeddings_of(rows)
    with preserved_state(model), torch.no_grad():
        model.eval()
        parts = [
            model.image_state(inputs.normalized_images(rows[i : i + STATE_BATCH]))
            for i in range(0, len(rows), STATE_BATCH)
        ]
    return torch.cat(parts)


def displayed_probabilities(run: LoadedRun, rows: np.ndarray) -> np.ndarray:
    """Calibrated class probabilities (N, C) of ``rows``: the model on the image states the run evaluates."""
    inputs = run.inputs
    out = []
    step = PREDICT_BATCH if not inputs.model.fuses_on_maps else STATE_BATCH
    for i in range(0, len(rows), step):
        part = rows[i : i + step]
        states = shown_states(inputs, part)
        meta = torch.from_numpy(inputs.meta[part]).to(inputs.device)
        with preserved_state(inputs.model), torch.no_grad():
            inputs.model.eval()
            logits = state_logits(inputs.model, states, meta) / run.temperature
        out.append(torch.softmax(logits.double(), 1).cpu().numpy())
    return np.concatenate(out) if out else np.empty((0, inputs.schema.n_classes))


def select_cases(
    run: LoadedRun, split: str, cases: Sequence[str] | None, n: int, seed: int
) -> tuple[np.ndarray, list[str]]:
    """Rows to explain and why: the named image ids, else ``n`` cases of ``split`` by outcome
    (:func:`~.selection.select_by_outcome`: a correct case per class, errors, least confident)."""
    inputs = run.inputs
    ids = inputs.dataset.metadata["image_id"]
    if cases:
        lookup = pd.Series(np.arange(len(ids)), index=ids.to_numpy())
        unknown = [c for c in cases if c not in lookup.index]
        if unknown:
            raise DataError(f"--cases: image id(s) not in the data: {', '.join(map(repr, unknown[:5]))}")
        rows = lookup[list(dict.fromkeys(cases))].to_numpy()
        return rows, [NAMED] * len(rows)
    rows = inputs.indices(split)
    picked, why = select_by_outcome(inputs.targets[rows], displayed_probabilities(run, rows), n, seed)
    return rows[picked], why


def load_cases(run: LoadedRun, rows: np.ndarray, selection: list[str]) -> CaseBatch:
    """Images, metadata, image states and the displayed (calibrated) prediction of each selected case."""
    inputs = run.inputs
    emb = shown_states(inputs, rows)
    meta = torch.from_numpy(inputs.meta[rows]).to(inputs.device)
    probs = displayed_probabilities(run, rows)
    images = inputs.normalized_images(rows) if inputs.model.uses_image else torch.empty(0)
    return CaseBatch(rows, images, meta, emb, probs, probs.argmax(1).tolist(), selection)


def background(inputs: RunInputs, size: int, seed: int) -> tuple[torch.Tensor | None, np.ndarray]:
    """A seeded sample of training cases: their image states (or None) and encoded metadata, row by row.

    An absent image in the modality split takes these states paired with their case's metadata: the
    embeddings of a late model, the maps of a map model (one backbone pass per background case).
    """
    train = inputs.indices("train")
    rows = np.sort(np.random.default_rng(seed).choice(train, size=min(size, len(train)), replace=False))
    return shown_states(inputs, rows), inputs.meta[rows]


def cam_setup(run: LoadedRun) -> CamSetup:
    """The CAM method and layer of the run, with the displayed prediction's flips and temperature."""
    cfg = run.inputs.cfg.explain
    return CamSetup(cfg.method, cfg.target_layer, shown_flip_average(run.inputs), run.temperature)


def compute_cams(run: LoadedRun, images: torch.Tensor, meta: torch.Tensor, targets: list[int]) -> ScoredMaps:
    """Maps (B, H, W) of ``targets`` and their explained probabilities, in batches."""
    setup = cam_setup(run)
    model = run.inputs.model
    with setup.explainer(model) as cam:
        parts = [
            cam.explain_scored(images[i : i + CAM_BATCH], meta[i : i + CAM_BATCH], targets[i : i + CAM_BATCH])
            for i in range(0, len(targets), CAM_BATCH)
        ]
    return ScoredMaps(np.concatenate([p.maps for p in parts]), np.concatenate([p.probabilities for p in parts]))


def lesion_mask(inputs: RunInputs, row: int) -> np.ndarray | None:
    """The case's lesion mask at the model's input size, when the data has one."""
    path = inputs.dataset.metadata["mask_path"].iloc[row]
    if not path:
        return None
    with Image.open(inputs.dataset.metadata["path"].iloc[row]) as img:
        original = img.size  # a mask must match its image before both are resized
    height, width = inputs.cfg.data.image_size
    return load_mask(path, size=(width, height), expected_size=original)


def training_masks(inputs: RunInputs, limit: int, seed: int) -> np.ndarray | None:
    """Up to ``limit`` lesion masks of the training split (a seeded sample), (N, H, W) bool; None without."""
    train = inputs.indices("train")
    with_mask = train[inputs.dataset.metadata["mask_path"].iloc[train].astype(bool).to_numpy()]
    if not len(with_mask) or not limit:
        return None
    rows = np.random.default_rng(seed).choice(with_mask, size=min(limit, len(with_mask)), replace=False)
    masks = [lesion_mask(inputs, int(r)) for r in np.sort(rows)]
    return np.stack([m for m in masks if m is not None])


def case_predictor(run: LoadedRun) -> CasePredictor:
    """The shown prediction of many cases at once (images + metadata rows -> calibrated logits), on the
    exported backend where the run's embedding pass uses one (``train.embed_backend``), else eager torch.

    The exported graph is the image branch's ``embed`` (as in the embedding pass) over the same flips;
    the head runs in torch. Its probabilities agree with the eager model's to about 1e-5. A model that
    fuses on the maps runs eagerly: its metadata-conditioned part is not the exported graph.
    """
    inputs, setup = run.inputs, cam_setup(run)
    model, branch = inputs.model, inputs.model.image_branch
    flips = FLIPS if setup.flip_average else NO_FLIP
    backend = inputs.cfg.train.embed_backend
    eager = backend == "torch" or inputs.device.type != "cpu" or not backend_available(backend)
    if branch is None or model.fuses_on_maps or eager:
        return lambda images, meta: shown_view(model, setup.flip_average, setup.temperature, meta)(images)
    height, width = inputs.cfg.data.image_size
    example = torch.zeros(len(flips), 3, height, width)
    with preserved_state(model):
        embed = compiled_branch_pass(branch, "embed", example, inputs.device, backend, "float32")

    def predict(images: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        views = embed(flip_views(images.cpu(), flips).contiguous())
        embedding = views.reshape(len(flips), len(images), -1).mean(0)
        return model.forward_head(embedding, meta) / setup.temperature

    return predict


def faithfulness(
    run: LoadedRun,
    batch: CaseBatch,
    cams: np.ndarray,
    masks: list[np.ndarray | None],
    baselines: BaselineMaps,
    predict: CasePredictor | None = None,
    store: ReportStore | None = None,
    offset: int = 0,
    progress: bool = True,
    imputer: RoadImputer | None = None,
) -> list[dict[str, dict[str, float]]]:
    """Every measure of the CAM and each baseline map for the report's first ``explain.faithfulness_cases``
    cases; ``batch`` holds the report's cases from number ``offset`` on (a chunk of a longer report).
    The chunks of a report share one ROAD ``imputer`` (its cached factors).

    The curves of all cases go through ``predict`` (default :func:`case_predictor`) in shared batches,
    with a progress bar and its ETA on stderr (``progress``). Cases already in ``store`` (a killed run's
    finished cases) are read back, not measured again; each newly measured one is added as it finishes.
    """
    cfg = run.inputs.cfg.explain
    shape = (int(cams.shape[-2]), int(cams.shape[-1]))
    k = max(0, min(cfg.faithfulness_cases - offset, len(batch.rows)))
    store = store or ReportStore(None)
    ids = run.inputs.dataset.metadata["image_id"].iloc[batch.rows[:k]].astype(str).tolist()
    seeds = [cfg.seed + offset + i for i in range(k)]  # the random baseline map of the report's case number
    keys = [case_key(ids[i], batch.targets[i], cams[i], _store_settings(run, baselines, seeds[i])) for i in range(k)]
    todo = [i for i in range(k) if keys[i] not in store.reports]
    cases = (
        FaithfulnessCase(
            batch.images[i],
            batch.meta[i],
            batch.targets[i],
            {"cam": cams[i], **baselines.maps(shape, seeds[i])},
            masks[i],
        )
        for i in todo
    )
    settings = CurveSettings(cfg.steps, tuple(cfg.road_percentiles), None, cfg.seed)
    quiet = not progress or k < 2
    with tqdm(total=k, initial=k - len(todo), desc="faithfulness", unit="case", disable=quiet, leave=False) as bar:

        def finished(j: int, report: dict[str, dict[str, float]]) -> None:
            store.add(keys[todo[j]], report)
            bar.update(1)

        if todo:
            faithfulness_reports(predict or case_predictor(run), cases, settings, on_case=finished, imputer=imputer)
    return [store.reports[key] for key in keys]


def _store_settings(run: LoadedRun, baselines: BaselineMaps, map_seed: int) -> dict[str, Any]:
    """What a stored faithfulness report depends on besides its case and CAM."""
    cfg = run.inputs.cfg.explain
    return {
        "run": str(run.run_dir),
        "temperature": run.temperature,
        "backend": run.inputs.cfg.train.embed_backend,
        "steps": cfg.steps,
        "road": list(cfg.road_percentiles),
        "seed": cfg.seed,
        "map_seed": map_seed,
        "baselines": [baselines.n_masks, baselines.centre_sigma, baselines.smooth_sigma],
    }


def sanity_checks(run: LoadedRun, batch: CaseBatch, cams: np.ndarray) -> tuple[list[StageResult], StageResult | None]:
    """Cascading randomisation (from the head down) and the random-logit check on the first cases."""
    cfg = run.inputs.cfg.explain
    k = min(cfg.randomisation_cases, len(batch.rows))
    if not k:
        return [], None
    args = (run.inputs.model, batch.images[:k], batch.meta[:k], batch.targets[:k], cams[:k], cam_setup(run))
    stages = cascading_randomisation(*args, randomiser=cfg.randomiser, seed=cfg.seed)
    return stages, random_logit_check(*args, num_classes=run.inputs.schema.n_classes, seed=cfg.seed)


def _patient(meta_row: pd.Series, features: Sequence[str]) -> dict[str, str]:
    """The case's patient features as shown: a missing value reads ``unknown``, numbers compactly."""
    return {f: _shown(meta_row.get(f)) for f in features}


def _shown(value: Any) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return "unknown"
    return f"{value:g}" if isinstance(value, (int, float, np.number)) and not isinstance(value, bool) else str(value)


def patient_features(inputs: RunInputs) -> list[str]:
    """The patient features the run's encoder reads, in its group order (the SHAP players)."""
    return list(inputs.encoder.feature_groups_)


class _Stopwatch:
    """Seconds per named stage, summed over the chunks of a report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        t = time.perf_counter()
        result = fn(*args)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t
        return result


@dataclass
class PixelSetup:
    """What the image side of every chunk of a report shares: the CAM layer, the baseline maps and the
    predictor of the faithfulness curves (exported once, on first use)."""

    geometry: LayerGeometry
    baselines: BaselineMaps
    predict: CasePredictor | None = None
    imputer: RoadImputer = dataclasses.field(default_factory=RoadImputer)  # ROAD's factors, kept across chunks

    def predictor(self, run: LoadedRun) -> CasePredictor:
        if self.predict is None:
            self.predict = case_predictor(run)
        return self.predict


def pixel_setup(run: LoadedRun, rows: np.ndarray, timed: _Stopwatch) -> PixelSetup | None:
    """The CAM layer's geometry and the baseline maps fitted on training masks (None: no image)."""
    inputs, cfg = run.inputs, run.inputs.cfg.explain
    if not inputs.model.uses_image:
        return None
    height, width = inputs.cfg.data.image_size
    meta = torch.from_numpy(inputs.meta[rows[:1]]).to(inputs.device)
    geometry = layer_geometry(inputs.model, cfg.target_layer or None, (height, width), meta)
    priors = timed("baselines", baseline_maps, training_masks(inputs, cfg.prior_masks, cfg.seed), geometry.stride)
    return PixelSetup(geometry, priors)


@dataclass
class PixelSide:
    """What the image side of a chunk of cases computed: maps, masks, faithfulness."""

    cams: ScoredMaps
    runner_up: np.ndarray | None
    masks: list[np.ndarray | None]
    reports: list[dict[str, dict[str, float]]]
    effect: MetadataEffect | None = None  # the CAMs with every patient feature absent, and their correlation
    age_cams: list[dict[str, np.ndarray]] | None = None  # per case: age -> the map at that age


def metadata_on_maps(
    run: LoadedRun, batch: CaseBatch, cams: np.ndarray
) -> tuple[MetadataEffect, list[dict[str, np.ndarray]]]:
    """What the metadata does to each case's map: the CAM with every feature absent (the encoder's
    missing row) beside ``cams``, and the map at a few ages (:data:`~.whatif.MAP_AGES`)."""
    inputs, setup = run.inputs, cam_setup(run)
    raw = inputs.dataset.metadata.iloc[batch.rows][patient_features(inputs)].reset_index(drop=True)
    with setup.explainer(inputs.model) as cam:
        effect = metadata_effect(cam, batch.images, batch.meta, inputs.encoder.missing_row(), batch.targets, cams)
        ages = [
            cams_across_ages(cam, inputs.encoder, raw.iloc[[i]].reset_index(drop=True), batch.images[i : i + 1], t)
            if inputs.model.uses_meta
            else {}
            for i, t in enumerate(batch.targets)
        ]
    return effect, ages


def explain_pixels(
    run: LoadedRun,
    batch: CaseBatch,
    timed: _Stopwatch,
    setup: PixelSetup | None,
    store: ReportStore | None = None,
    offset: int = 0,
) -> PixelSide | None:
    """Grad-CAM of the explained and runner-up classes and faithfulness against the baselines of the
    report's cases ``offset``, ``offset + 1``, ... in ``batch``."""
    inputs, cfg = run.inputs, run.inputs.cfg.explain
    if setup is None or not inputs.model.uses_image:
        return None
    cams = timed("gradcam", compute_cams, run, batch.images, batch.meta, batch.targets)
    runner_up = None
    if cfg.runner_up:
        seconds = [int(np.argsort(-p)[1]) for p in batch.probs]
        runner_up = timed("gradcam runner-up", compute_cams, run, batch.images, batch.meta, seconds).maps
    masks = [lesion_mask(inputs, int(r)) for r in batch.rows]
    effect, age_cams = timed("metadata on map", metadata_on_maps, run, batch, cams.maps)
    predict = setup.predictor(run) if offset < cfg.faithfulness_cases else None
    args = (run, batch, cams.maps, masks, setup.baselines, predict, store, offset, False, setup.imputer)
    reports = timed("faithfulness", faithfulness, *args)
    return PixelSide(cams, runner_up, masks, reports, effect, age_cams)


def explain_run(
    run_dir: str | Path,
    *,
    data: str | Path | None = None,
    split: str = "test",
    cases: Sequence[str] | None = None,
    n: int | None = None,
    settings: Mapping[str, Any] | None = None,
    resume: str | Path | None = None,
    on_chunk: ChunkCallback | None = None,
    chunk_size: int = CHUNK,
) -> CohortExplanation:
    """Explain cases of a trained run: maps, SHAP and modality values, faithfulness, sanity checks, provenance.

    ``n`` cases (default: the run's ``explain.n_cases``) unless ``cases`` names them; ``settings``
    overrides keys of the run's ``explain`` section (e.g. ``{"faithfulness_cases": 100}``).

    The cases are computed ``chunk_size`` at a time (memory stays flat, the time grows linearly) with a
    progress bar and its ETA; ``on_chunk`` (a :class:`ChunkView`) is called as each chunk finishes (the
    report layer draws and writes those cases' pages there).
    With a ``resume`` folder each finished chunk (and each case's faithfulness as it finishes,
    :mod:`.resume`) is kept there, and a rerun into the same folder reads them back instead of
    computing them again.
    """
    if n is not None and n < 1:
        raise ConfigError(f"n: the number of cases to explain must be >= 1, got {n}")
    run = load_run(run_dir, data)
    if settings:
        run.inputs.cfg = replace(run.inputs.cfg, explain=dict(settings))
    if run.inputs.device.type == "cpu":  # the eager passes (CAMs, flipped views): faster convolutions on the CPU
        run.inputs.model.to(memory_format=torch.channels_last)
    cfg = run.inputs.cfg.explain
    timed = _Stopwatch()
    rows, why = timed("selection", select_cases, run, split, cases, cfg.n_cases if n is None else n, cfg.seed)
    ids = run.inputs.dataset.metadata["image_id"].iloc[rows].astype(str).tolist()
    classes, names = list(run.inputs.schema.classes), _class_names(run.inputs.schema)
    chunks = ChunkStore(resume, _chunk_settings(run, split))
    shared = _SharedSetup(run, rows, timed, ReportStore(resume))
    parts: list[ChunkResult] = []
    with tqdm(total=len(rows), desc="explain", unit="case", disable=len(rows) < 2) as bar:
        for start in range(0, len(rows), chunk_size):
            part_rows, part_why = rows[start : start + chunk_size], why[start : start + chunk_size]
            key = chunks.key("cases", part_rows.tolist(), start)
            part = chunks.get(key)
            if part is None:
                part = explain_chunk(run, part_rows, part_why, start, shared, timed)
                chunks.put(key, part)
            if on_chunk is not None:
                on_chunk(ChunkView(start, part.cases, part.shap, ids, classes, names))
            parts.append(part)
            bar.update(len(part.cases))
    sanity = _sanity(run, rows, why, parts, chunks, timed)
    return _cohort(run, split, parts, shared.pixel_setup(), sanity, timed.seconds)


@dataclass
class ChunkView:
    """A finished chunk as ``explain_run``'s ``on_chunk`` sees it: the report's cases ``offset``,
    ``offset + 1``, ... with their SHAP rows, the image ids of all of the report's cases in order, the
    run's classes."""

    offset: int
    cases: list[CaseExplanation]
    shap: ShapRows  # the SHAP rows of these cases (``ShapRows.joined([shap])``: a ``shap.Explanation``)
    ids: list[str]
    classes: list[str]
    class_names: dict[str, str]


#: Called with each finished chunk (kept in the resume folder before the call).
ChunkCallback = Callable[[ChunkView], None]


@dataclass
class ChunkResult:
    """A chunk of finished cases: their results, SHAP rows and faithfulness reports."""

    cases: list[CaseExplanation]
    shap: ShapRows
    reports: list[dict[str, dict[str, float]]]


@dataclass
class ShapRows:
    """Rows of a ``shap.Explanation`` as plain arrays (what a chunk keeps and the cohort joins)."""

    values: np.ndarray
    base_values: np.ndarray
    data: np.ndarray | None
    error_std: np.ndarray
    feature_names: list[str]

    @classmethod
    def of(cls, exp: Any) -> ShapRows:
        return cls(exp.values, exp.base_values, exp.data, exp.error_std, list(exp.feature_names))

    @staticmethod
    def joined(parts: Sequence[ShapRows]) -> Any:
        """One ``shap.Explanation`` of every row of ``parts``, in order."""
        import shap

        data = None if any(p.data is None for p in parts) else np.concatenate([p.data for p in parts])
        return shap.Explanation(
            values=np.concatenate([p.values for p in parts]),
            base_values=np.concatenate([p.base_values for p in parts]),
            data=data,
            feature_names=parts[0].feature_names,
            error_std=np.concatenate([p.error_std for p in parts]),
        )


class _SharedSetup:
    """What every chunk of a report shares, each part built on first use: the pixel side's layer, baselines
    and predictor, the SHAP game over the background, the faithfulness store."""

    def __init__(self, run: LoadedRun, rows: np.ndarray, timed: _Stopwatch, store: ReportStore) -> None:
        self.run, self.rows, self.timed, self.store = run, rows, timed, store
        self._pixels: PixelSetup | None = None
        self._pixels_built = False
        self._game: FeatureGame | None = None

    def pixel_setup(self) -> PixelSetup | None:
        if not self._pixels_built:
            self._pixels, self._pixels_built = pixel_setup(self.run, self.rows, self.timed), True
        return self._pixels

    def game(self) -> FeatureGame:
        if self._game is None:
            self._game = feature_game(self.run)
        return self._game


def explain_chunk(
    run: LoadedRun, rows: np.ndarray, why: list[str], offset: int, shared: _SharedSetup, timed: _Stopwatch
) -> ChunkResult:
    """The report's cases ``offset``, ``offset + 1``, ... (``rows``): everything but the cohort's sanity checks."""
    batch = load_cases(run, rows, why)
    pixels = explain_pixels(run, batch, timed, shared.pixel_setup(), shared.store, offset)
    shap_exp, modality = feature_attributions(run, batch, timed, shared.game())
    spreads = timed("tta spread", tta_spreads, run, batch)
    what_ifs = timed("what-if", case_what_ifs, run, batch)
    case_list = [_case(run, batch, i, pixels, shap_exp, modality) for i in range(len(rows))]
    embeddings = alarm_embeddings(run, batch)
    for i, case in enumerate(case_list):
        case.tta_spread = None if spreads is None else float(spreads[i])
        case.what_if = what_ifs[i]
        case.embedding = None if embeddings is None else embeddings[i]
    return ChunkResult(case_list, ShapRows.of(shap_exp), [] if pixels is None else pixels.reports)


Sanity = tuple[list[StageResult], StageResult | None]


def _sanity(
    run: LoadedRun, rows: np.ndarray, why: list[str], parts: list[ChunkResult], chunks: ChunkStore, timed: _Stopwatch
) -> Sanity:
    """The cascading randomisation and random-logit checks on the report's first cases (kept like a chunk)."""
    k = min(run.inputs.cfg.explain.randomisation_cases, len(rows))
    if not run.inputs.model.uses_image or not k:
        return [], None
    key = chunks.key("sanity", rows[:k].tolist(), 0)
    kept = chunks.get(key)
    if kept is None:
        cams = np.stack([c.cam for part in parts for c in part.cases if c.cam is not None][:k])
        kept = timed("randomisation", sanity_checks, run, load_cases(run, rows[:k], why[:k]), cams)
        chunks.put(key, kept)
    return kept


def _chunk_settings(run: LoadedRun, split: str) -> dict[str, Any]:
    """What a kept chunk depends on besides its cases: the run (its checkpoint's size and time), its
    whole config with the explain settings, the data and the split."""
    checkpoint = run.run_dir / "best.pt"
    stat = checkpoint.stat() if checkpoint.is_file() else None
    return {
        "run": str(Path(run.run_dir).resolve()),
        "checkpoint": None if stat is None else [stat.st_size, stat.st_mtime_ns],
        "temperature": run.temperature,
        "config": dataclasses.asdict(run.inputs.cfg),
        "data": run.inputs.dataset.fingerprint,
        "split": split,
    }


def alarm_embeddings(run: LoadedRun, batch: CaseBatch) -> np.ndarray | None:
    """The cases' pooled image embeddings as the shift alarm reads them (None without an image branch).

    A late model's image state is that embedding; a map model's state is its maps at the fusion point,
    pooled here through the tail without the metadata (as the alarm's reference of the run's images).
    """
    model, states = run.inputs.model, batch.states
    if states is None or model.image_branch is None:
        return None
    if model.fuses_on_maps:
        with torch.no_grad():
            states = model.image_branch.embed_from_maps(states.float())
    return states.float().cpu().numpy()


@dataclass
class FeatureGame:
    """The SHAP game every chunk of a report shares: the explainer and the background's states and rows."""

    explainer: GroupShapExplainer
    states: torch.Tensor | None
    meta: np.ndarray
    settings: dict[str, Any]


def feature_game(run: LoadedRun) -> FeatureGame:
    """The run's SHAP game from its ``explain`` settings (background, scale, resamples, seed, permutations)."""
    inputs, cfg = run.inputs, run.inputs.cfg.explain
    bg_emb, bg_meta = background(inputs, cfg.background_size, cfg.seed)
    settings: dict[str, Any] = {
        "scale": cfg.shap_scale,
        "resamples": cfg.background_resamples,
        "seed": cfg.seed,
        "permutations": cfg.shap_permutations,
    }
    groups = inputs.encoder.feature_groups_
    explainer = GroupShapExplainer(inputs.model, bg_meta, groups, temperature=run.temperature, **settings)
    return FeatureGame(explainer, bg_emb, bg_meta, settings)


def feature_attributions(
    run: LoadedRun, batch: CaseBatch, timed: Callable[..., Any] | None = None, game: FeatureGame | None = None
) -> tuple[Any, ModalityAttribution]:
    """Grouped SHAP of the patient features and the image-vs-features Shapley split of ``batch``'s cases.

    One game for both, from the run's ``explain`` settings (background, scale, resamples, seed,
    permutations); each case explains its ``batch.targets`` class. ``timed`` (a stopwatch) records
    the two stages as ``shap`` and ``modality``; ``game`` is built from the settings when not given.
    """
    inputs = run.inputs
    timed = timed or (lambda _name, fn, *args: fn(*args))
    game = game or feature_game(run)
    groups = inputs.encoder.feature_groups_
    raw = inputs.dataset.metadata.iloc[batch.rows][patient_features(inputs)].reset_index(drop=True)
    shap_exp = timed("shap", lambda: game.explainer.explain(batch.states, batch.meta, batch.targets, raw=raw))
    modality = timed(
        "modality",
        lambda: modality_shapley(
            inputs.model,
            batch.states,
            batch.meta,
            game.states,
            game.meta,
            groups,
            batch.targets,
            temperature=run.temperature,
            **game.settings,
        ),
    )
    return shap_exp, modality


def tta_spreads(run: LoadedRun, batch: CaseBatch) -> np.ndarray | None:
    """Per case, the spread over its flipped views of the predicted class's probability (None: no image)."""
    if not run.inputs.model.uses_image or len(batch.rows) == 0:
        return None
    return tta_spread(view_probabilities(run.inputs.model, batch.images, batch.meta, run.temperature))


def case_what_ifs(run: LoadedRun, batch: CaseBatch) -> list[WhatIf | None]:
    """Per case, its calibrated prediction across each patient feature's values (None: no metadata)."""
    inputs = run.inputs
    if not inputs.model.uses_meta:
        return [None] * len(batch.rows)
    raw = inputs.dataset.metadata.iloc[batch.rows][patient_features(inputs)].reset_index(drop=True)
    states = batch.states
    return [
        what_if(
            inputs.model,
            inputs.encoder,
            raw.iloc[[i]].reset_index(drop=True),
            None if states is None else states[i : i + 1],
            run.temperature,
            inputs.schema.classes,
        )
        for i in range(len(batch.rows))
    ]


def _flat(report: Mapping[str, Mapping[str, float]]) -> dict[str, float | bool]:
    """A case's faithfulness as flat keys: ``energy_inside`` (the CAM), ``energy_inside_centre`` ..."""
    return {f"{k}{'' if name == 'cam' else '_' + name}": v for name, d in report.items() for k, v in d.items()}


def _case(
    run: LoadedRun,
    batch: CaseBatch,
    i: int,
    pixels: PixelSide | None,
    shap_exp: Any,
    modality: ModalityAttribution,
) -> CaseExplanation:
    """The typed result of case ``i``."""
    row = int(batch.rows[i])
    row_meta = run.inputs.dataset.metadata.iloc[row]
    target = batch.targets[i]
    classes = run.inputs.schema.classes
    runner_up = int(np.argsort(-batch.probs[i])[1])
    scale = run.inputs.cfg.explain.shap_scale
    errors = np.zeros_like(modality.values) if modality.values_se is None else modality.values_se
    effect = None if pixels is None else pixels.effect
    return CaseExplanation(
        image_id=str(row_meta["image_id"]),
        target_class=classes[target],
        true_label=str(row_meta["dx"]),
        selection=batch.selection[i],
        probabilities=dict(zip(classes, map(float, batch.probs[i]), strict=True)),
        explained_probability=None if pixels is None else float(pixels.cams.probabilities[i]),
        patient=_patient(row_meta, patient_features(run.inputs)),
        shap=dict(zip(shap_exp.feature_names, map(float, shap_exp.values[i]), strict=True)),
        shap_error=dict(zip(shap_exp.feature_names, map(float, shap_exp.error_std[i]), strict=True)),
        shap_base_value=float(shap_exp.base_values[i]),
        model_output=float(LINKS[scale](np.float64(batch.probs[i][target]))),
        modality=dict(zip(modality.players, map(float, modality.values[i]), strict=True)),
        modality_error=dict(zip(modality.players, map(float, errors[i]), strict=True)),
        modality_base_value=float(modality.base_values[i]),
        faithfulness=_flat(pixels.reports[i]) if pixels is not None and i < len(pixels.reports) else {},
        runner_up_class=classes[runner_up] if pixels is not None and pixels.runner_up is not None else None,
        pixels=np.array(run.inputs.images()[row]),
        original_pixels=np.array(run.inputs.original_images()[row]) if run.inputs.color.active else None,
        cam=None if pixels is None else pixels.cams.maps[i],
        runner_up_cam=None if pixels is None or pixels.runner_up is None else pixels.runner_up[i],
        mask=None if pixels is None else pixels.masks[i],
        metadata_map_spearman=None if effect is None else float(effect.spearman[i]),
        fusion=fusion_kind(run.inputs.model),
        cam_without_metadata=None if effect is None else effect.without_metadata[i],
        age_cams={} if pixels is None or pixels.age_cams is None else pixels.age_cams[i],
    )


def _mean_abs(cases: list[CaseExplanation], key: str) -> dict[str, dict[str, float]]:
    """Mean |value| per feature, per explained class and over all cases."""
    frame = pd.DataFrame([{**{k: abs(v) for k, v in getattr(c, key).items()}, "cls": c.target_class} for c in cases])
    table = {str(k): g.drop(columns="cls").mean().to_dict() for k, g in frame.groupby("cls")}
    table["all"] = frame.drop(columns="cls").mean().to_dict()
    return table


def _shares(table: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {k: {p: v / max(sum(row.values()), 1e-12) for p, v in row.items()} for k, row in table.items()}


def _faith_rows(reports: Sequence[Mapping[str, Mapping[str, float]]]) -> list[FaithfulnessRow]:
    """Mean of each measure for the CAM and each baseline, with the number of cases."""
    notes = {
        "energy_inside": "share of map mass inside the lesion; higher is better",
        "pointing_game": "share of cases with the map's maximum inside the lesion; higher is better",
        "deletion_auc": "probability left as the most salient pixels turn the image's mean colour; lower is better",
        "insertion_auc": "probability as the most salient pixels return into a blurred image; higher is better",
        "road": "ROAD (imputed removal): least- minus most-relevant-first drop, halved; higher is better",
    }
    rows = []
    for metric in HIGHER_IS_BETTER:
        with_metric = [r for r in reports if metric in r.get("cam", {})]
        if not with_metric:
            continue
        names = [b for b in MAP_NAMES[1:] if all(b in r for r in with_metric)]
        rows.append(
            FaithfulnessRow(
                metric,
                float(np.mean([r["cam"][metric] for r in with_metric])),
                {b: float(np.mean([r[b][metric] for r in with_metric])) for b in names},
                f"{notes[metric]} (mean over {len(with_metric)} cases)",
            )
        )
    return rows


def _mean_map_correlation(cases: list[CaseExplanation]) -> dict[str, float]:
    """Mean rank correlation of the CAM with and without the metadata, per explained class and over all
    cases with one (NaN where every map was constant)."""
    frame = pd.DataFrame(
        [{"cls": c.target_class, "rho": c.metadata_map_spearman} for c in cases if c.metadata_map_spearman is not None]
    )
    if frame.empty:
        return {}
    table = {str(k): float(g["rho"].mean()) for k, g in frame.groupby("cls")}
    table["all"] = float(frame["rho"].mean())
    return table


def _class_counts(cases: list[CaseExplanation]) -> dict[str, int]:
    counts = pd.Series([c.target_class for c in cases]).value_counts()
    return {**{str(k): int(v) for k, v in counts.items()}, "all": len(cases)}


def _provenance(run: LoadedRun, split: str, n_cases: int, pixels: PixelSetup | None) -> dict[str, str]:
    """Where the numbers come from: run, model, data, split, calibration, CAM layer, baselines, background."""
    inputs = run.inputs
    cfg = inputs.cfg
    out = {
        "run": str(run.run_dir),
        "model": cfg.model.name,
        "backbone": cfg.model.backbone,
        "weights": cfg.model.weights,
        "training": cfg.train.mode,
        "data root": str(inputs.dataset.root),
        "data fingerprint": inputs.dataset.fingerprint[:16],
        "split": split,
        "cases": str(n_cases),
        "temperature": f"{run.temperature:.3f}",
        "flip-averaged embedding": "yes (4 flips)" if shown_flip_average(inputs) else "no",
        "CAM method": cfg.explain.method,
        "SHAP background": (
            f"{min(cfg.explain.background_size, len(inputs.indices('train')))} training cases (seed "
            f"{cfg.explain.seed}), ± = sd over {cfg.explain.background_resamples} bootstrap redraws"
        ),
        "SHAP scale": cfg.explain.shap_scale,
        "fusion": fusion_kind(inputs.model),
    }
    if pixels is not None:
        b = pixels.baselines
        out["CAM layer"] = f"{pixels.geometry} at {cfg.data.image_size[0]}x{cfg.data.image_size[1]}"
        out["baselines"] = (
            f"mean of {b.n_masks} training masks; centre Gaussian sigma {b.centre_sigma:.2f} of each side "
            f"({'fitted on those masks' if b.n_masks else 'default: no training masks'}); smooth random map "
            f"(sigma {b.smooth_sigma:g} px = the layer's stride)"
        )
    return out


def _notes(run: LoadedRun, cases: list[CaseExplanation]) -> list[str]:
    """What is explained, how exactly, and the measured gaps and errors."""
    scale = run.inputs.cfg.explain.shap_scale
    features = patient_features(run.inputs)
    output = "probability" if scale == "probability" else "log-odds of the probability"
    notes = [
        f"Explained output: the calibrated (temperature {run.temperature:.3f}) {output} of the predicted class, "
        f"computed from {'the 4-flip-averaged embedding' if shown_flip_average(run.inputs) else 'the image'} as "
        "displayed. Grad-CAM differentiates that class's temperature-scaled logit of the same function of the "
        "image; the deletion / insertion / ROAD curves follow the same probability.",
        f"{_exactness(features, 'SHAP')}; {_exactness(['image', *features], 'the modality split')}; ± is the "
        "background's sampling error.",
        games_note(features),
    ]
    gaps = [
        abs(c.explained_probability - c.probabilities[c.target_class])
        for c in cases
        if c.explained_probability is not None
    ]
    if gaps:
        notes.append(
            "Largest gap between the explained and the displayed probability: "
            f"{'<0.00001' if max(gaps) < 1e-5 else f'{max(gaps):.5f}'} (over {len(gaps)} cases)."
        )
    spearman = [c.metadata_map_spearman for c in cases if c.metadata_map_spearman is not None]
    if spearman:
        notes.append(metadata_note(np.asarray(spearman), fusion_kind(run.inputs.model)))
    errors = [v for c in cases for v in [*c.shap_error.values(), *c.modality_error.values()]]
    if errors:
        notes.append(f"Largest background sampling error of a SHAP or modality value: ±{max(errors):.3f}.")
    return notes


#: What the metadata can do to the map, by where the model fuses (:func:`~.metadata_effect.fusion_kind`).
FUSION_NOTES: Mapping[str, str] = {
    "maps": "This model fuses the metadata into the feature maps and the CAM layer is after the fusion: "
    "the metadata changes the layer's activations as well as their weights.",
    "late": "This model fuses the metadata after the pooling: the CAM layer's activations do not depend on "
    "it, so it moves the map only through the gradient weights of the channels.",
    "image only": "This model ignores the metadata: the map without it is the same map (rank correlation 1 "
    "by construction).",
}


def metadata_note(spearman: np.ndarray, kind: str) -> str:
    """The note on what the metadata does to the maps: the fusion kind and the mean rank correlation of
    each case's map with and without its metadata (``spearman``, NaN where undefined)."""
    valid = spearman[np.isfinite(spearman)]
    mean = f"{valid.mean():.3f} over {len(valid)} cases" if len(valid) else "undefined (constant maps)"
    return (
        "Metadata on the map: each case's CAM with its metadata beside the CAM with every patient feature "
        f"absent (the encoder's missing row, as metadata dropout trains on), same class; mean Spearman rank "
        f"correlation over pixels {mean}. {FUSION_NOTES[kind]}"
    )


def _cohort(
    run: LoadedRun,
    split: str,
    parts: Sequence[ChunkResult],
    pixels: PixelSetup | None,
    sanity: Sanity,
    timings: dict[str, float],
) -> CohortExplanation:
    """The cohort summary: SHAP and modality tables, faithfulness with verdicts, sanity checks, provenance."""
    cfg = run.inputs.cfg
    cases = [c for part in parts for c in part.cases]
    reports = [r for part in parts for r in part.reports]
    shap_exp = ShapRows.joined([part.shap for part in parts])
    return CohortExplanation(
        title=f"Explanations: {cfg.model.name} on {split}",
        provenance=_provenance(run, split, len(cases), pixels),
        cases=cases,
        mean_abs_shap=_mean_abs(cases, "shap"),
        modality_share=_shares(_mean_abs(cases, "modality")),
        class_counts=_class_counts(cases),
        faithfulness=_faith_rows(reports),
        comparisons=compare_to_baselines(reports, n_boot=cfg.explain.bootstrap, seed=cfg.explain.seed),
        randomisation=sanity[0],
        random_logit=sanity[1],
        shap_scale=cfg.explain.shap_scale,
        notes=_notes(run, cases),
        timings=timings,
        shap_values=shap_exp,
        classes=list(run.inputs.schema.classes),
        class_names=_class_names(run.inputs.schema),
        fusion=fusion_kind(run.inputs.model),
        metadata_map_spearman=_mean_map_correlation(cases),
    )


def _class_names(schema: DatasetSchema) -> dict[str, str]:
    """The schema's long class names; a schema without any borrows HAM10000's for the codes they share."""
    if schema.class_names:
        return {c: schema.class_name(c) for c in schema.classes}
    return {c: CLASS_NAMES.get(c, c) for c in schema.classes}


def _save_map(out: Path, name: str, cam: np.ndarray) -> str:
    """Write ``cam`` as float32 to ``out/ASSETS/name``; returns its path relative to ``out``."""
    relative = ASSETS / name
    (out / relative).parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / relative, "wb") as fh:
        np.save(fh, cam.astype(np.float32))
    return str(relative)


def save_explanations(out: str | Path, cohort: CohortExplanation) -> Path:
    """Write each case's map (``cases/assets/<stem>_cam.npy``) and ``explanations.json``; returns the JSON path."""
    out = Path(out)
    for case in cohort.cases:
        if case.cam is not None:
            case.cam_file = _save_map(out, f"{safe_stem(case.image_id)}_cam.npy", case.cam)
        if case.cam_without_metadata is not None:
            name = f"{safe_stem(case.image_id)}_cam_without_metadata.npy"
            case.cam_without_metadata_file = _save_map(out, name, case.cam_without_metadata)
    return write_json(out / "explanations.json", cohort.to_json())
