"""External validation: score a trained run on a dataset it never saw, with its stored calibration.

``mmlesion evaluate --run RUN --data OTHER [--schema S] [--key-vs-rest]`` reads OTHER with its own
schema (default: the run's), and then:

- refuses images that are in the run's own ``splits.csv`` (``exclude_seen`` leaves them out instead,
  with a note): an external score must not contain training, stopping or test images of the run;
- maps OTHER's classes onto the run's (:func:`~multimodal_lesion.data.schema.map_classes`, e.g.
  ISIC 2019 ``AK`` -> ``akiec``); images of classes the run does not know are reported and left out,
  unless the run is scored as key class vs rest (``key_vs_rest``: every image counts, positive when
  its class maps to the run's key class);
- encodes the run's patient features from OTHER's columns of the same name; a feature OTHER lacks is
  missing for every image, and said so;
- fits each image to the run's input size keeping its aspect ratio (``fit``: pad or centre crop;
  ``stretch`` only when asked), with a note counting the images of another shape;
- predicts as the run was scored (frozen embeddings flip-averaged, TTA as evaluated, the run's colour
  constancy) and applies the run's temperature and balanced decision: nothing is fitted on OTHER's labels;
  with ``adapt_bn`` the run's batch-norm statistics are first re-estimated on OTHER's images (AdaBN,
  no labels; results in a ``-adapt_bn`` folder of their own, recorded in ``metrics.json``).

Results go to ``RUN/external/<OTHER's folder name>[-<key>_vs_rest]/`` (``metrics.json``,
``predictions.csv``, ``figures/``), never over the run's own evaluation. The metrics name the
images, lesions and patients scored, and the key-vs-rest AUROC comes with a patient-grouped
bootstrap CI.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data.color import color_constancy_of
from ..data.dataset import LesionDataset
from ..data.reader import read_dataset
from ..data.schema import DatasetSchema, map_classes
from ..data.schema_file import resolve_schema
from ..errors import DataError, note
from ..io import atomic_write, safe_stem
from ..runs import Cases, Predictor, RunFolder, adapt_to_cases, predict_arrays, prediction_frame
from ..runs.duplicates import DEFAULT_THRESHOLD, training_near_duplicates
from ..runs.prior import reweight
from ..runs.shift import DEFAULT_LEVEL
from .metrics import binary_metrics, classification_metrics, key_vs_rest
from .new_data import (
    NewDataOptions,
    annotate,
    clinic_prior,
    estimated_prior,
    fitted_sets,
    paired_difference_ci,
    run_prior,
)
from .runner import Evaluation, SplitScores
from .stats import grouped_auroc_ci
from .uncertainty import EMPTY_SET_MEANING, set_metrics

#: A folder name used as it is for the results (others get a sanitised stem).
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,79}")
#: Sub-folder of a run that holds its external evaluations.
EXTERNAL = "external"
#: The split name under which ``metrics.json`` files an external score (as ``test`` for the run's own).
SPLIT = "external"


@dataclass(frozen=True)
class ExternalOptions:
    """How to score a run on other data (the ``mmlesion evaluate`` options of the same names)."""

    schema: str | None = None  # OTHER's schema (preset name); None: the run's own
    key_vs_rest: bool = False  # score a multi-class run as key class vs rest
    fit: str = "pad"  # images of another aspect ratio: pad, crop or stretch
    device: str | None = None  # None: the run's device (the CPU where it has no GPU)
    exclude_seen: bool = False  # leave out (with a note) images in the run's splits instead of refusing
    n_boot: int = 2000  # bootstrap draws of the grouped AUROC and balanced-accuracy CIs
    images: str = ""  # where OTHER's images are, when not below its data root ("none": no images)
    duplicates: str = ""  # OTHER's duplicates file, replacing its schema's (pairs share a group in the CI)
    adapt_bn: bool = False  # re-estimate the run's batch-norm statistics on OTHER's images first (AdaBN)
    prior: str = ""  # OTHER's known class prevalence (FILE or class=value,...): probabilities re-weighted to it
    estimate_prior: bool = False  # the EM estimate of OTHER's prevalence and its scores, as a diagnostic
    shift_level: float = DEFAULT_LEVEL  # level of the per-image shift alarm


def read_other(root: str | Path, schema: DatasetSchema, images: str = "") -> LesionDataset:
    """OTHER's images in the canonical table; listed images that are absent are left out (a partial download)."""
    return read_dataset(root, schema, images=images, drop_missing=True)


def other_schema(name: str | None, run_schema: DatasetSchema, duplicates: str = "") -> DatasetSchema:
    """OTHER's schema: the preset or schema file named, else the run's own (``duplicates`` replaces its file)."""
    schema = run_schema if name is None else resolve_schema(name)
    return dataclasses.replace(schema, duplicates=duplicates) if duplicates else schema


def external_folder(
    run: RunFolder, data: str | Path, schema: DatasetSchema, key_vs_rest: bool, adapt_bn: bool = False
) -> RunFolder:
    """``RUN/external/<OTHER's folder name>[-<key>_vs_rest][-adapt_bn]``: never the run's own ``eval/``."""
    name = Path(data).expanduser().resolve().name
    name = name if _PLAIN.fullmatch(name) else safe_stem(name or schema.name)
    name = f"{name}-{schema.key_class}_vs_rest" if key_vs_rest else name
    return RunFolder(run.path / EXTERNAL / (f"{name}-adapt_bn" if adapt_bn else name))


def unseen(run: RunFolder, table: pd.DataFrame, root: str | Path, exclude: bool) -> tuple[pd.DataFrame, int]:
    """``table`` without images of the run's splits; refused (DataError) unless ``exclude``."""
    seen = table["image_id"].isin(set(run.read_splits()["image_id"])).to_numpy()
    if not seen.any():
        return table, 0
    shown = ", ".join(table.loc[seen, "image_id"].head(3))
    if not exclude:
        raise DataError(
            f"{root}: {int(seen.sum())} of {len(table)} images are in the run's own splits ({run.path / 'splits.csv'}: "
            f"{shown}, ...); an external score must not contain them (evaluate the run's own split without "
            "--schema / --key-vs-rest, or pass --exclude-seen to leave them out)"
        )
    note(f"{root}: {int(seen.sum())} image(s) in the run's own splits left out ({shown}, ...)")
    if seen.all():
        raise DataError(f"{root}: every image is in the run's own splits; nothing external to score")
    return table[~seen].reset_index(drop=True), int(seen.sum())


def scored_targets(
    table: pd.DataFrame, other: DatasetSchema, run: DatasetSchema, key_vs_rest: bool, root: str | Path
) -> tuple[pd.DataFrame, np.ndarray, dict[str, Any]]:
    """(the rows scored, their targets, the class mapping record): see the module docstring."""
    classes = map_classes(other, run)
    mapping = dict(classes.mapping)
    counts = table["dx"].value_counts()
    record: dict[str, Any] = {"mapping": mapping, "unmapped": list(classes.unmapped)}
    if other.name != run.name or classes.unmapped or any(a != b for a, b in mapping.items()):
        note(classes.note(other.name, run.name))
    if key_vs_rest or classes.key_vs_rest:
        keys = [c for c, m in mapping.items() if m == run.key_class]
        if not keys:
            raise DataError(
                f"{root}: no class of schema '{other.name}' ({', '.join(other.classes)}) means the run's key class "
                f"'{run.key_class}'; cannot score key vs rest"
            )
        record["key_classes"] = keys
        return table, table["dx"].isin(keys).to_numpy().astype(np.int64), record
    known = table["dx"].map(mapping).notna().to_numpy()
    left_out = {str(c): int(counts.get(c, 0)) for c in classes.unmapped if counts.get(c, 0)}
    if left_out:
        note(
            f"{root}: class(es) the run does not know left out: "
            + ", ".join(f"{c} ({n} images)" for c, n in left_out.items())
            + (" (score key vs rest with --key-vs-rest to keep them)" if run.key_class in run.classes else "")
        )
    if not known.any():
        raise DataError(f"{root}: no image of a class the run knows ({', '.join(run.classes)}); try --key-vs-rest")
    record["left_out"] = left_out
    rows = table[known].reset_index(drop=True)
    index = {c: i for i, c in enumerate(run.classes)}
    return rows, rows["dx"].map(mapping).map(index).to_numpy(np.int64), record


def scores_key_vs_rest(other: DatasetSchema, run: DatasetSchema, asked: bool) -> bool:
    """Whether the run is scored as key class vs rest: asked, or OTHER is a binary task and the run is not."""
    if asked and run.key_class not in run.classes:
        raise DataError(f"schema {run.name}: the run has no key class to score against the rest")
    return asked or map_classes(other, run).key_vs_rest


def patient_columns(
    table: pd.DataFrame, other: DatasetSchema, run: DatasetSchema, source: str
) -> tuple[pd.DataFrame, dict[str, str | None]]:
    """The run's patient features from OTHER's columns: same name, or OTHER's age for the run's age.

    A feature OTHER lacks is missing for every image (the encoder's missing flag / ``unknown``), said in a note.
    """
    found: dict[str, str | None] = {}
    for feature in run.features.names:
        if feature in table.columns:
            found[feature] = feature
        elif feature == run.features.age_feature and other.features.age_feature in table.columns:
            found[feature] = other.features.age_feature
        else:
            found[feature] = None
    absent = [f for f, column in found.items() if column is None]
    if absent:
        note(f"{source}: no column for the run's patient feature(s) {', '.join(absent)}: missing for every image")
    renamed = [f"{column} as {f}" for f, column in found.items() if column is not None and column != f]
    if renamed:
        note(f"{source}: read {', '.join(renamed)}")
    frame = pd.DataFrame({f: table[c].to_numpy() if c else None for f, c in found.items()}, index=table.index)
    return frame.reset_index(drop=True), found


def _groups(table: pd.DataFrame) -> tuple[str, np.ndarray]:
    """The unit of independence of the bootstrap: patients when the data name them, else lesions."""
    if "patient_id" in table.columns and table["patient_id"].notna().all():
        return "patient", table["patient_id"].astype(str).to_numpy()
    return "lesion", table["lesion_id"].astype(str).to_numpy()


def evaluate_external(
    run_dir: str | Path, data: str | Path, options: ExternalOptions = ExternalOptions(), show: bool = True
) -> Evaluation:
    """Score the run in ``run_dir`` on the dataset at ``data``; writes ``RUN/external/<name>/``."""
    run = RunFolder(run_dir)
    run.check()
    run_schema = run.read_schema()
    schema = other_schema(options.schema, run_schema, options.duplicates)
    kvr = scores_key_vs_rest(schema, run_schema, options.key_vs_rest)
    dataset = read_other(data, schema, options.images)
    table, n_seen = unseen(run, dataset.metadata, data, options.exclude_seen)
    table, y, record = scored_targets(table, schema, run_schema, kvr, data)
    predictor = Predictor.load(run_dir, options.device, fit=options.fit)
    features, record["features"] = patient_columns(table, schema, run_schema, str(data))
    cases = Cases([Path(p) for p in table["path"]], features, table["image_id"].tolist())
    adapted = adapt_to_cases(predictor, cases, str(data)) if options.adapt_bn else None
    if show:
        print(f"scoring {len(cases.ids)} images of {data} with {run.path} ({predictor.run.device})", flush=True)
    probs = predict_arrays(predictor, cases, str(data))
    cal = probs.calibrated
    bal = probs.balanced if probs.balanced is not None else cal  # runs from before the balanced decision
    new_data = NewDataOptions(options.prior, options.estimate_prior, options.shift_level)
    predicted, found = annotate(
        prediction_frame(cases, run_schema.classes, probs), run_dir, cal, probs.embeddings, new_data, show
    )
    out = external_folder(run, data, schema, kvr, options.adapt_bn)
    scored = scored_schema(run_schema, kvr)
    score, cal_scored = external_scores(table, y, (cal, bal), run_schema, kvr, options.n_boot)
    metrics: dict[str, Any] = {
        SPLIT: score,
        "data_root": str(dataset.root),
        "schema": schema.name,
        "run_schema": run_schema.name,
        "key_vs_rest": kvr,
        "key_class": scored.key_class,
        "groups": schema.group_noun,
        "image_fit": options.fit,
        "tta": predictor.run.tta,
        "adapt_bn": adapted,  # None, or what AdaBN re-estimated on OTHER's images (docs/shift.md)
        "color_constancy": color_constancy_of(predictor.run.cfg.data).key() or None,
        "temperature": predictor.run.temperature,
        "n_listed": len(dataset.metadata),
        "n_seen_left_out": n_seen,
        "classes": record,
        "missing_features": [f for f, source in record["features"].items() if source is None],
        "notes": list(dataset.notes),
    }
    flagged = predicted["out_of_distribution"].to_numpy(bool) if "out_of_distribution" in predicted else None
    metrics.update(trust_on_other(run, table, y, (cal, bal), found, kvr, options))
    score["uncertainty"] = conformal_on_other(run, y, cal, kvr, flagged)
    near = near_duplicates_of_training(run_dir, dataset, table, show)
    if near is not None:
        keep = ~table["image_id"].isin(set(near["image_id_1"])).to_numpy()
        without = external_scores(table[keep], y[keep], (cal[keep], bal[keep]), run_schema, kvr, options.n_boot)[0]
        metrics["near_duplicates_of_training"] = {
            "threshold": DEFAULT_THRESHOLD,
            "n_images": int((~keep).sum()),
            "images": sorted(set(near["image_id_1"])),
            "without_them": without if keep.any() else None,
        }
    targets = [scored.classes[k] for k in y]
    out.path.mkdir(parents=True, exist_ok=True)
    if near is not None:
        with atomic_write(out.path / "near_duplicates.csv") as fh:
            near.to_csv(fh, index=False)
    out.write_metrics(metrics)
    with atomic_write(out.path / "predictions.csv") as fh:
        predicted.assign(target=targets).to_csv(fh, index=False)
    scores = SplitScores(SPLIT, cases.ids, y, cal_scored, cal_scored)  # the run's temperature: the one calibration
    return Evaluation(out, metrics, {SPLIT: scores}, scored)


def near_duplicates_of_training(
    run_dir: str | Path, dataset: LesionDataset, table: pd.DataFrame, show: bool
) -> pd.DataFrame | None:
    """OTHER's scored images that are near-duplicates of the run's training images (pairs at or above
    the default threshold, one row per pair), or None where the run cannot be checked (no image branch)."""
    pairs = cached_training_near_duplicates(run_dir, dataset, show)
    if pairs is None:
        return None
    pairs = pairs[pairs["image_id_1"].isin(set(table["image_id"]))].reset_index(drop=True)
    if len(pairs):
        shown = ", ".join(pairs["image_id_1"].drop_duplicates().head(3))
        note(
            f"{dataset.root}: {pairs['image_id_1'].nunique()} of {len(table)} scored images are near-duplicates of the "
            f"run's training images (score >= {DEFAULT_THRESHOLD:g}: {shown}, ...); metrics without them are in "
            "metrics.json (near_duplicates_of_training)"
        )
    return pairs


def cached_training_near_duplicates(run_dir: str | Path, dataset: LesionDataset, show: bool) -> pd.DataFrame | None:
    """:func:`training_near_duplicates` at the default threshold, from the package cache when the same search
    was made before (it reads the images only: runs of other seeds on the same split, ``--adapt-bn`` or
    ``--prior`` share it, and the keypoint check is minutes on a CPU).

    The key holds both image lists, the run's data and backbone settings, the detector's settings and its
    source, so a changed detector or split searches again.
    """
    from ..data.cache import cache_home, cache_key
    from ..runs import duplicates as detector
    from ..runs.duplicates import DuplicateSettings

    run = RunFolder(run_dir)
    cfg = run.read_config()
    key = cache_key(
        sorted(run.read_splits().query("split == 'train'")["image_id"]),
        cfg.data.root,
        dataclasses.asdict(cfg.data),
        (cfg.model.backbone, cfg.model.weights, cfg.train.embed_backend, cfg.train.embed_precision),
        Path(dataset.root).resolve(),
        sorted(dataset.metadata["image_id"]),
        DEFAULT_THRESHOLD,
        DuplicateSettings(),
        Path(detector.__file__).read_bytes(),
    )
    path = cache_home() / "near_duplicates" / f"{key}.csv"
    if path.is_file():
        if show:
            print(f"near-duplicates of the run's training images: the search made before ({path})", flush=True)
        return pd.read_csv(path, dtype={"image_id_1": str, "image_id_2": str, "group_1": str, "group_2": str})
    pairs = training_near_duplicates(run_dir, dataset, DEFAULT_THRESHOLD, show)
    if pairs is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as fh:
            pairs.to_csv(fh, index=False)
    return pairs


def external_scores(
    table: pd.DataFrame,
    y: np.ndarray,
    probs: tuple[np.ndarray, np.ndarray],
    run: DatasetSchema,
    key_vs_rest: bool,
    n_boot: int,
) -> tuple[dict[str, Any], np.ndarray]:
    """The metrics of the calibrated and balanced probabilities (N, C) of the run's classes, and the
    calibrated probabilities as scored ((rest, key) when key vs rest)."""
    cal, bal = probs
    scored = scored_schema(run, key_vs_rest)
    k = run.key_index
    cal_scored, bal_scored = (key_vs_rest_probs(cal, k), key_vs_rest_probs(bal, k)) if key_vs_rest else (cal, bal)
    score: dict[str, Any] = {
        "calibrated": _score(y, cal_scored, scored, table, n_boot),
        "balanced": _score(y, bal_scored, scored, table, n_boot),
        "n_patients": int(table["patient_id"].nunique()) if "patient_id" in table.columns else None,
    }
    if key_vs_rest:  # the run's own decisions: key class when it is the arg-max of all classes
        group_kind, groups = _groups(table)
        score["key_vs_rest"] = {
            "calibrated": binary_metrics(y == 1, cal[:, k], cal.argmax(1) == k),
            "balanced": binary_metrics(y == 1, bal[:, k], bal.argmax(1) == k),
            "auroc_ci": {"grouped_by": group_kind, **grouped_auroc_ci(y == 1, cal[:, k], groups, n_boot)},
        }
    return score, cal_scored


def key_vs_rest_probs(probs: np.ndarray, key: int) -> np.ndarray:
    """(rest, key) probabilities of a multi-class prediction (N, C)."""
    return key_vs_rest(np.zeros(len(probs)), probs, key)[1]


def scored_schema(run: DatasetSchema, key_vs_rest: bool) -> DatasetSchema:
    """The classes scored: the run's, or (rest, key class) when scored as key class vs rest."""
    if not key_vs_rest:
        return run
    return dataclasses.replace(
        run, classes=("rest", run.key_class), class_names=("rest", run.class_name(run.key_class)), binary=True
    )


def _score(y: np.ndarray, probs: np.ndarray, scored: DatasetSchema, table: pd.DataFrame, n_boot: int) -> dict[str, Any]:
    """The metrics of one decision; the balanced accuracy's interval resamples patients where they are named."""
    group_kind, groups = _groups(table)
    out = classification_metrics(
        y,
        probs,
        classes=scored.classes,
        key_class=scored.key_class,
        lesion_ids=table["lesion_id"].tolist(),
        n_boot=n_boot,
        ci_groups=list(groups),
    )
    if "balanced_accuracy_ci" in out:
        out["balanced_accuracy_ci"]["grouped_by"] = group_kind
    return out


# --- what the external report adds: prevalence, sets, shift, a known or estimated prior, sources ----------


def trust_on_other(
    run: RunFolder,
    table: pd.DataFrame,
    y: np.ndarray,
    probs: tuple[np.ndarray, np.ndarray],
    found: dict[str, Any],
    key_vs_rest: bool,
    options: ExternalOptions,
) -> dict[str, Any]:
    """The shift alarm, empty sets, predicted against true prevalence, the prior's effect and the
    breakdown by source of OTHER's scored images."""
    cal, bal = probs
    schema = run.read_schema()
    out: dict[str, Any] = {"empty_sets": found["empty_sets"], "shift": found.get("shift")}
    out["prevalence"] = prevalence_table(y, cal, bal, schema, key_vs_rest)
    groups = _groups(table)[1]
    priors = clinic_prior(run, options.prior)
    if priors is not None:
        adjusted = reweight(cal, *priors)
        out["prior"] = {
            **found["prior"],
            "prevalence": prevalence_table(y, adjusted, bal, schema, key_vs_rest),
            "effect": prior_effect(y, cal, adjusted, schema.key_index if key_vs_rest else None, groups, options.n_boot),
        }
    if options.estimate_prior:
        estimate = estimated_prior(cal, run, found.get("shift"))
        moved = reweight(cal, run_prior(run), np.array(list(estimate["estimated"].values())))
        key = schema.key_index if key_vs_rest else None
        out["estimated_prior"] = {**estimate, "effect": prior_effect(y, cal, moved, key, groups, options.n_boot)}
    if "source" in table.columns:
        out["by_source"] = by_source(table, y, cal, found, schema, key_vs_rest)
    return out


def conformal_on_other(
    run: RunFolder, y: np.ndarray, cal: np.ndarray, key_vs_rest: bool, flagged: np.ndarray | None
) -> dict[str, Any]:
    """The run's conformal sets on OTHER: coverage (the run's classes only), size and empty sets per level."""
    conformal, levels = fitted_sets(run)
    sets = conformal.predict(cal)
    classes = run.read_schema().classes
    if key_vs_rest:  # OTHER's classes are (rest, key): the set's coverage of the true class is not defined
        per_level = {
            f"{lv:.2f}": {
                "mean_size": float(sets[:, :, k].sum(1).mean()),
                "empty": float((~sets[:, :, k].any(1)).mean()),
                "n_empty": int((~sets[:, :, k].any(1)).sum()),
                "n_images": len(y),
            }
            for k, lv in enumerate(levels)
        }
        return {"conformal": {"fitted_on": "val", "empty_set_meaning": EMPTY_SET_MEANING, **per_level}}
    per_level = set_metrics(sets, y, classes, levels)
    if flagged is not None:
        for k, lv in enumerate(levels):
            empty = np.logical_not(np.asarray(sets[:, :, k]).any(axis=1))
            per_level[f"{lv:.2f}"]["empty_flagged"] = float(empty[flagged].mean()) if flagged.any() else float("nan")
    return {"conformal": {"fitted_on": "val", "empty_set_meaning": EMPTY_SET_MEANING, **per_level}}


def prevalence_table(
    y: np.ndarray, cal: np.ndarray, bal: np.ndarray, schema: DatasetSchema, key_vs_rest: bool
) -> list[dict[str, Any]]:
    """Per scored class: its true share of OTHER, the share of images decided as it (calibrated arg-max and
    the balanced decision) and its mean calibrated probability. Key vs rest: the key class against the rest."""
    n = len(y)
    if key_vs_rest:
        k = schema.key_index
        rows = [("rest", y == 0, cal.argmax(1) != k, bal.argmax(1) != k, 1 - cal[:, k])]
        rows.append((schema.key_class, y == 1, cal.argmax(1) == k, bal.argmax(1) == k, cal[:, k]))
    else:
        rows = [(c, y == i, cal.argmax(1) == i, bal.argmax(1) == i, cal[:, i]) for i, c in enumerate(schema.classes)]
    return [
        {
            "class": c,
            "true": float(t.mean()),
            "n_true": int(t.sum()),
            "predicted": float(d.mean()),
            "n_predicted": int(d.sum()),
            "balanced_decision": float(b.mean()),
            "n_balanced_decision": int(b.sum()),
            "mean_probability": float(p.mean()),
            "n_images": n,
        }
        for c, t, d, b, p in rows
    ]


def prior_effect(
    y: np.ndarray, before: np.ndarray, after: np.ndarray, key: int | None, groups: np.ndarray, n_boot: int
) -> dict[str, Any]:
    """How re-weighting changes NLL, Brier, accuracy and balanced accuracy (key vs rest: sensitivity and
    specificity of the key-class decision): after minus before, with a 95% CI over resampled groups."""
    if key is not None:
        is_key = (y == 1).astype(np.int64)
        pb, pa = before[:, key], after[:, key]
        binary = {
            "nll": lambda t, p: float(-np.mean(np.log(np.clip(np.where(t == 1, p, 1 - p), 1e-12, 1)))),
            "brier": lambda t, p: float(np.mean((p - t) ** 2)),
        }
        out = {name: paired_difference_ci(f, is_key, pb, pa, groups, n_boot) for name, f in binary.items()}
        decided = {
            "sensitivity": lambda t, d: float(d[t == 1].mean()) if (t == 1).any() else float("nan"),
            "specificity": lambda t, d: float((~d[t == 0]).mean()) if (t == 0).any() else float("nan"),
        }
        db, da = before.argmax(1) == key, after.argmax(1) == key
        out |= {name: paired_difference_ci(f, is_key, db, da, groups, n_boot) for name, f in decided.items()}
        return out
    multi = {
        "nll": lambda t, p: float(-np.mean(np.log(np.clip(p[np.arange(len(t)), t], 1e-12, 1)))),
        "brier": lambda t, p: float(np.mean(((p - np.eye(p.shape[1])[t]) ** 2).sum(1))),
        "accuracy": lambda t, p: float((p.argmax(1) == t).mean()),
        "balanced_accuracy": _balanced_accuracy,
    }
    return {name: paired_difference_ci(f, y, before, after, groups, n_boot) for name, f in multi.items()}


def _balanced_accuracy(t: np.ndarray, p: np.ndarray) -> float:
    hits = p.argmax(1) == t
    return float(np.mean([hits[t == c].mean() for c in np.unique(t)]))


def by_source(
    table: pd.DataFrame, y: np.ndarray, cal: np.ndarray, found: dict[str, Any], schema: DatasetSchema, kvr: bool
) -> list[dict[str, Any]]:
    """Per value of OTHER's ``source`` column: images, the key class's true and predicted share, its AUROC,
    and the shares flagged by the shift alarm and with an empty 90%-or-lowest-level set."""
    from sklearn.metrics import roc_auc_score

    k = schema.key_index
    is_key = (y == 1) if kvr else (y == k)
    source = table["source"].fillna("(none)").astype(str).to_numpy()
    out = []
    for value in sorted(set(source)):
        rows = source == value
        t, p = is_key[rows], cal[rows, k]
        out.append(
            {
                "source": value,
                "n_images": int(rows.sum()),
                "key_true": float(t.mean()),
                "key_predicted": float((cal[rows].argmax(1) == k).mean()),
                "key_auroc": float(roc_auc_score(t, p)) if 0 < t.sum() < len(t) else float("nan"),
                **_source_flags(found, rows),
            }
        )
    return out


def _source_flags(found: dict[str, Any], rows: np.ndarray) -> dict[str, float]:
    """The shares of ``rows`` flagged out of distribution and with an empty set (when computed)."""
    flags = found.get("per_image", {})
    return {name: float(np.asarray(values)[rows].mean()) for name, values in flags.items()}
