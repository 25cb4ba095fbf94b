"""The wiring that the CLI, the demo and the benchmark share: compute with one layer, draw with another.

Training and explanation return results; the report layer draws them; these functions run one
after the other so that ``mmlesion train`` / ``evaluate`` / ``explain`` write complete folders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import ExperimentConfig


def train_run(
    cfg: ExperimentConfig, out: str | Path, *, resume: bool = False, overwrite: bool = False, show: bool = True
) -> dict[str, Any]:
    """Train one model into the run folder ``out`` with its evaluation figures; returns ``metrics.json``.

    A folder that already holds a run needs ``resume`` or ``overwrite`` (see ``training.runner.train_run``).
    With ``tracking.mlflow_uri`` set, the run is also an MLflow run: the resolved config as params, every
    epoch's scores, every number of ``metrics.json``, and the config, metrics, history and figures as artefacts.
    """
    from .report.figures import save_evaluation_figures
    from .tracking import tracked
    from .training.runner import train_run as train

    main = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone tracks
    with tracked(cfg.tracking, Path(out).resolve().name, "train", enabled=main) as tracker:
        evaluation = train(cfg, out, resume=resume, overwrite=overwrite, show=show, tracker=tracker)
        figures = save_evaluation_figures(evaluation)
        if tracker is not None:
            folder = evaluation.folder
            tracker.set_tags({"mmlesion.out": folder.path.resolve()})
            files = [folder / name for name in ("config.toml", "schema.toml", "metrics.json", "history.csv")]
            tracker.log_artifacts([p for p in files if p.is_file()])
            tracker.log_artifacts(figures, under="figures")
    return evaluation.metrics


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    data: str | Path | None = None,
    tta: bool = False,
    show: bool = True,
    device: str | None = None,
    data_settings: Mapping[str, Any] | None = None,
    mlflow: str = "",
) -> tuple[dict[str, Any], Path]:
    """Evaluate a run on one split with figures; returns (metrics, path of ``eval/<split>/metrics.json``).

    ``mlflow``: a tracking URI; the evaluation is then also an MLflow run (see :func:`tracked_evaluation`).
    """
    from .report.figures import save_evaluation_figures
    from .training.runner import evaluate_run as evaluate

    params = {"eval.split": split, "eval.tta": tta, "eval.data": str(data or "")}
    with tracked_evaluation(run_dir, mlflow, f"eval {split}", params) as tracker:
        evaluation = evaluate(run_dir, split, data, tta=tta, show=show, device=device, data_settings=data_settings)
        figures = save_evaluation_figures(evaluation)
        log_evaluation(tracker, evaluation, figures)
    return evaluation.metrics, evaluation.folder.metrics_path


@contextlib.contextmanager
def tracked_evaluation(run_dir: str | Path, mlflow: str, name: str, params: Mapping[str, Any]) -> Iterator[Any]:
    """An MLflow run (kind ``evaluate``, in the run's experiment) for an evaluation of ``run_dir`` when
    ``mlflow`` is a URI, else None: the run's config and ``params`` as params, the run folder as a tag."""
    import dataclasses

    from .runs import RunFolder
    from .tracking import config_params, tracked

    if not mlflow:
        yield None
        return
    run_cfg, folder = RunFolder(run_dir).read_config(), Path(run_dir).resolve()
    settings = dataclasses.replace(run_cfg.tracking, mlflow_uri=mlflow)
    with tracked(settings, f"{folder.name} {name}", "evaluate") as tracker:
        if tracker is not None:
            tracker.set_tags({"mmlesion.run": folder})
            tracker.log_params({**config_params(run_cfg), **params})
        yield tracker


def log_evaluation(tracker: Any, evaluation: Any, figures: Sequence[Path]) -> None:
    """Every number of an evaluation's ``metrics.json`` as metrics; that file and the figures as artefacts."""
    from .tracking import numbers

    if tracker is None:
        return
    tracker.log_metrics(numbers(evaluation.metrics))
    tracker.log_artifacts([evaluation.folder.metrics_path])
    tracker.log_artifacts(figures, under="figures")


def is_external(run_dir: str | Path, data: str | Path, schema: str | None = None, images: str = "") -> bool:
    """Whether ``data`` (read with ``schema``, default the run's) is new to the run: none of its images in its splits.

    All of them in the splits, read with the run's own schema: the run's own data (perhaps moved),
    evaluated on its split. Otherwise any image in the splits is a DataError naming the overlap (an
    external score must not contain the run's images).
    """
    from .runs import RunFolder
    from .training.external import other_schema, read_other, unseen

    run = RunFolder(run_dir)
    own, other = run.read_schema(), other_schema(schema, run.read_schema())
    with warnings.catch_warnings():  # a quiet look: the evaluation that follows reads it again, with its notes
        warnings.simplefilter("ignore")
        table = read_other(data, other, images).metadata
    seen = table["image_id"].isin(set(run.read_splits()["image_id"]))
    if seen.all() and other.name == own.name:  # in another schema, the run's images are an overlap, not its data
        return False
    unseen(run, table, data, exclude=False)  # raises when some are seen
    return True


def evaluate_external_run(
    run_dir: str | Path, data: str | Path, options: Any = None, show: bool = True, mlflow: str = ""
) -> tuple[dict[str, Any], Path]:
    """Score a run on data it never saw, with figures and ``report.html``; returns (metrics,
    ``RUN/external/<name>/metrics.json``).

    ``options``: a :class:`~multimodal_lesion.training.external.ExternalOptions` (None: the defaults).
    ``mlflow``: a tracking URI; the evaluation is then also an MLflow run (see :func:`tracked_evaluation`).
    """
    from .report.external_page import write_external_page
    from .report.figures import save_evaluation_figures
    from .training.external import ExternalOptions, evaluate_external

    with tracked_evaluation(run_dir, mlflow, "external", {"eval.split": "external", "eval.data": str(data)}) as tracker:
        evaluation = evaluate_external(run_dir, data, options or ExternalOptions(), show=show)
        figures = save_evaluation_figures(evaluation)
        title = f"{Path(run_dir).resolve().name} on {Path(data).resolve().name}"
        write_external_page(evaluation.folder.path, evaluation.metrics, title)
        log_evaluation(tracker, evaluation, figures)
    return evaluation.metrics, evaluation.folder.metrics_path


def explain_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    data: str | Path | None = None,
    split: str = "test",
    cases: Sequence[str] | None = None,
    n: int | None = None,
    settings: Mapping[str, Any] | None = None,
    show: bool = True,
) -> Path:
    """Explain cases of a run, draw them, write ``explanations.json``, the faithfulness and randomisation
    tables (CSV + markdown) and the HTML report; returns the index. ``settings`` overrides ``explain.*``."""
    index, _ = explain_cohort(run_dir, out, data=data, split=split, cases=cases, n=n, settings=settings, show=show)
    return index


def explain_cohort(
    run_dir: str | Path,
    out: str | Path,
    *,
    data: str | Path | None = None,
    split: str = "test",
    cases: Sequence[str] | None = None,
    n: int | None = None,
    settings: Mapping[str, Any] | None = None,
    show: bool = True,
) -> tuple[Path, Any]:
    """:func:`explain_run` that also returns what it computed: (the index, the ``CohortExplanation``)."""
    from .explain.pipeline import CHUNK, save_explanations
    from .explain.pipeline import explain_run as explain
    from .explain.resume import CHUNK_DIR
    from .report.explanations import draw_cohort_figures
    from .report.faithfulness_tables import write_faithfulness_tables
    from .report.html import ReportFigures, write_report
    from .report.pages import CasePages

    t0 = time.perf_counter()
    count = len(cases) if cases else n or (settings or {}).get("n_cases", 0)
    long = count > CHUNK  # drawn in a worker while the next chunk is computed
    pages = CasePages(out, prepare=lambda chunk: add_prediction_sets(run_dir, chunk), parallel=long)
    try:
        cohort = explain(
            run_dir, data=data, split=split, cases=cases, n=n, settings=settings, resume=out, on_chunk=pages.write
        )
        figures = ReportFigures(cases=pages.finish())
    finally:
        pages.close()
    t1 = time.perf_counter()
    figures.cohort = draw_cohort_figures(out, cohort)
    cohort.timings["figures"] = pages.here + time.perf_counter() - t1  # the worker's drawing overlapped
    if long:
        cohort.timings["waiting for figures"] = pages.waited
    save_explanations(out, cohort)
    write_faithfulness_tables(out, cohort)
    index = write_report(out, cohort, figures)
    shutil.rmtree(Path(out) / CHUNK_DIR, ignore_errors=True)  # kept for a killed run only: ~1 MB a case
    if show:
        total, k = time.perf_counter() - t0, len(cohort.cases)
        per = ", ".join(f"{name} {v / k:.3f}" for name, v in cohort.timings.items())
        print(f"explained {k} cases in {total:.1f} s ({total / k:.2f} s per case; per case: {per})")
    return index, cohort


def attribute_split(run_dir: str | Path, split: str = "test", data: str | Path | None = None) -> dict[str, Any]:
    """Grouped SHAP and the image-vs-features Shapley split of every case of a split, as the report computes them.

    The same game as ``explain_run`` (the run's ``explain`` settings: background, scale, resamples,
    seed), each case explaining its predicted class; no maps, no figures. Returns ``image_ids``,
    ``true`` (class codes), ``shap`` (a ``shap.Explanation``) and ``modality`` (a ``ModalityAttribution``).
    """
    from .explain.pipeline import feature_attributions, load_cases
    from .runs import load_run

    run = load_run(run_dir, data)
    inputs = run.inputs
    rows = inputs.indices(split)
    batch = load_cases(run, rows, [""] * len(rows))
    shap_values, modality = feature_attributions(run, batch)
    meta = inputs.dataset.metadata.iloc[rows]
    return {
        "image_ids": meta["image_id"].tolist(),
        "true": meta["dx"].tolist(),
        "predicted": [inputs.schema.classes[t] for t in batch.targets],
        "shap": shap_values,
        "modality": modality,
    }


def add_prediction_sets(run_dir: str | Path, cases: Sequence[Any], shift_level: float = 0.01) -> None:
    """Give explained ``cases`` their conformal prediction sets, calibrated on the run's val predictions,
    and their shift alarm (how far each image sits from the run's training images)."""
    from .training.new_data import shift_alarm

    sets_of = conformal_sets(run_dir)
    for case in cases:
        case.prediction_sets = sets_of(case.probabilities)
    embedded = [case.embedding for case in cases]
    if not embedded or any(e is None for e in embedded):
        return
    flags = shift_alarm(run_dir, np.stack(embedded), shift_level)[0]
    if flags is None:
        return
    for i, case in enumerate(cases):
        case.shift = {name: _plain(values[i]) for name, values in flags.items()} | {"level": shift_level}


def conformal_sets(run_dir: str | Path) -> Callable[[Mapping[str, float]], dict[str, list[str]]]:
    """The run's conformal prediction sets, fitted once on its val predictions as ``[uncertainty]`` says:
    a function from one case's calibrated probabilities (class -> p) to level -> the classes in the set."""
    from .runs import RunFolder
    from .training.uncertainty import ConformalSets

    folder = RunFolder(run_dir)
    u = folder.read_config().uncertainty
    y_val, p_val = folder.read_predictions("val")
    conformal = ConformalSets(u.conformal_score, u.levels, u.class_conditional).fit(p_val, y_val)

    def sets_of(probabilities: Mapping[str, float]) -> dict[str, list[str]]:
        classes = list(probabilities)
        sets = conformal.predict(np.asarray([list(probabilities.values())]))[0]
        return _named_sets(sets, classes, u.levels)

    return sets_of


def _named_sets(sets: np.ndarray, classes: list[str], levels: Sequence[float]) -> dict[str, list[str]]:
    """One case's sets (C, L) as level -> the classes in the set."""
    return {
        f"{lv:.2f}": [c for c, keep in zip(classes, sets[:, k], strict=True) if keep] for k, lv in enumerate(levels)
    }


def predict(
    run_dir: str | Path | Any,
    case: Any,
    *,
    balanced: bool = False,
    device: str | None = None,
    sets: Callable[[Mapping[str, float]], dict[str, list[str]]] | None = None,
    prior: str = "",
    shift_level: float = 0.01,
) -> dict[str, Any]:
    """One case's probabilities, its conformal prediction sets and the spread of its flipped views.

    ``case`` is a :class:`~multimodal_lesion.runs.Case` (an image and its patient fields); ``run_dir``
    a run folder or a loaded :class:`~multimodal_lesion.runs.Predictor`. The model runs once: the
    result holds the calibrated (``calibrated``) and the balanced decision's (``balanced_probabilities``,
    None for runs without one) probabilities of the same pass; ``probabilities`` is the balanced one
    when ``balanced`` (which makes a run without it an error). The sets are calibrated on the run's
    validation predictions (``predictions_val.csv``) as configured in ``[uncertainty]`` (``sets``: the
    :func:`conformal_sets` already fitted); they hold the true class with the target probability.
    ``shift`` is the image's shift alarm (score, p-value, flagged at ``shift_level``; None for a model
    that does not look at the image); ``prior`` (a clinic's prevalence) adds ``prior_probabilities``.
    """
    from .runs import Predictor, RunFolder, predict_case, tta_spread
    from .runs.prior import reweight
    from .training.new_data import clinic_prior, shift_alarm

    prediction = predict_case(run_dir, case, need_balanced=balanced, device=device)
    folder = run_dir.run.folder.path if isinstance(run_dir, Predictor) else run_dir
    # the sets are calibrated on the calibrated probabilities, not the balanced ones
    prediction_sets = (sets or conformal_sets(folder))(prediction.probs)
    views = prediction.view_probs
    shown = prediction.balanced_probs if balanced and prediction.balanced_probs is not None else prediction.probs
    embedding = None if prediction.embedding is None else prediction.embedding[None]
    flags = shift_alarm(folder, embedding, shift_level)[0]
    priors = clinic_prior(RunFolder(folder), prior)
    adjusted = None
    if priors is not None:
        p = reweight(np.array([list(prediction.probs.values())]), *priors)[0]
        adjusted = {c: round(float(v), 6) for c, v in zip(prediction.probs, p, strict=True)}
    return {
        "probabilities": shown,
        "calibrated": prediction.probs,
        "balanced_probabilities": prediction.balanced_probs,
        "prediction_sets": prediction_sets,
        "tta_spread": round(float(tta_spread(views[:, None, :])[0]), 6) if len(views) else None,
        "shift": None if flags is None else {k: _plain(v[0]) for k, v in flags.items()} | {"level": shift_level},
        "prior_probabilities": adjusted,
    }


def _plain(value: Any) -> Any:
    """A numpy scalar as a plain Python value (JSON)."""
    return value.item() if hasattr(value, "item") else value


def duplicates_run(
    cfg: ExperimentConfig,
    first: Any,
    out: str | Path,
    *,
    second: Any = None,
    threshold: float | None = None,
    settings: Any = None,
    show: bool = True,
) -> dict[str, Any]:
    """Search near-duplicates (:func:`~multimodal_lesion.runs.duplicates.search_duplicates`) and write
    ``pairs.csv``, ``review.html``, ``summary.json`` and, within one dataset, ``duplicates.csv`` (the
    pairs at or above ``threshold``, plus the schema's own duplicates file, in the columns ``--duplicates``
    reads); returns the summary."""
    import pandas as pd

    from .io import atomic_write, write_json
    from .report.duplicates_page import write_review_page
    from .runs.duplicates import DEFAULT_THRESHOLD, THRESHOLDS, DuplicateSettings, duplicates_file, search_duplicates

    out = Path(out)
    threshold = DEFAULT_THRESHOLD if threshold is None else threshold
    settings = settings or DuplicateSettings()
    thresholds = sorted({*THRESHOLDS, threshold})
    found = search_duplicates(cfg, first, second, settings, thresholds, show)
    with atomic_write(out / "pairs.csv") as fh:
        found.pairs.to_csv(fh, index=False)
    names = [str(first.root)] + ([str(second.root)] if second is not None else [])
    summary: dict[str, Any] = {
        "data": names,
        "images": [len(first.metadata)] + ([len(second.metadata)] if second is not None else []),
        "pairs": len(found.pairs),
        "threshold": threshold,
        "above_threshold": int((found.pairs["score"] >= threshold).sum()),
        "labels_differ": int(found.pairs["labels_differ"].sum()),
        "merges": found.merges.to_dict(orient="records"),
        "settings": dataclasses.asdict(settings),
        "backbone": {"name": cfg.model.backbone, "weights": cfg.model.weights, "image_size": list(cfg.data.image_size)},
        "seconds": round(found.seconds, 1),
    }
    if second is None:
        columns = first.schema.duplicate_columns
        chosen = pd.concat(
            [_known_duplicates(first), duplicates_file(found.pairs, threshold, columns)], ignore_index=True
        )
        with atomic_write(out / "duplicates.csv") as fh:
            chosen.drop_duplicates().to_csv(fh, index=False)
        summary["duplicates_file"] = str(out / "duplicates.csv")
    title = " vs ".join(Path(n).name for n in names) if second is not None else f"{Path(names[0]).name} (groups differ)"
    facts = {"data": " ; ".join(names), **{k: v for k, v in summary.items() if k in ("images", "backbone", "seconds")}}
    write_review_page(
        out / "review.html",
        found.pairs,
        found.images,
        title=title,
        threshold=threshold,
        merges=found.merges,
        facts=facts,
    )
    write_json(out / "summary.json", summary)
    return summary


def _known_duplicates(dataset: Any) -> Any:
    """The pairs of the dataset's own duplicates file (kept in the written file: it replaces that one)."""
    import pandas as pd

    columns = list(dataset.schema.duplicate_columns)
    if not dataset.schema.duplicates:
        return pd.DataFrame(columns=columns)
    path = Path(dataset.schema.duplicates).expanduser()
    path = path if path.is_absolute() else Path(dataset.root) / path
    return pd.read_csv(path, dtype=str, keep_default_na=False)[columns]
