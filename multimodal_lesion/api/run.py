""":class:`Run`: one trained model carried from training to prediction, evaluation and explanation.

A run is a folder (``config.toml``, ``best.pt``, ``metrics.json``, ``splits.csv``, ...; see
:mod:`multimodal_lesion.runs`). The object reads what it is asked for when it is asked, and loads the
model once, on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import ExperimentConfig
from ..errors import ConfigError
from ..io import output_folder
from .results import Attributions, Evaluation, ExplanationReport, Prediction, RunMetrics

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from ..data.dataset import LesionDataset
    from ..data.schema import DatasetSchema
    from ..runs import Fit, Predictor, RunFolder

#: The splits of a run's own data.
SPLITS = ("train", "val", "test")


class Run:
    """A trained run: its folder, config, schema, metrics and model, and what can be done with them.

    Get one from :func:`multimodal_lesion.train` or :func:`multimodal_lesion.load_run`; two ``Run``
    objects of the same folder are equal.

    Attributes:
        path: the run folder.
        device: where the model runs (None: the run's own; a GPU run runs on the CPU where there is none).
    """

    def __init__(self, path: str | Path, *, device: str | None = None) -> None:
        self.path = Path(path)
        self.device = device
        self._predictor: Predictor | None = None
        self._sets: Callable[[Mapping[str, float]], dict[str, list[str]]] | None = None

    # --- what the folder holds -------------------------------------------------------------------

    @property
    def folder(self) -> RunFolder:
        """The run folder's files (:class:`~multimodal_lesion.runs.RunFolder`)."""
        from ..runs import RunFolder

        return RunFolder(self.path)

    @property
    def config(self) -> ExperimentConfig:
        """The resolved config the run was trained with (``config.toml``)."""
        return self.folder.read_config()

    @property
    def schema(self) -> DatasetSchema:
        """The dataset schema of the run: classes, patient features, grouping (``schema.toml``)."""
        return self.folder.read_schema()

    @property
    def classes(self) -> tuple[str, ...]:
        """The run's classes, in the order of the model's outputs."""
        return tuple(self.schema.classes)

    @property
    def metrics(self) -> RunMetrics:
        """Validation and test scores written at training time (``metrics.json``); ``.to_frame()`` tabulates."""
        return RunMetrics(self.folder.read_metrics())

    @property
    def model(self) -> torch.nn.Module:
        """The trained torch module (eval mode, on :attr:`device`), loaded once."""
        return self.predictor.model

    @property
    def predictor(self) -> Predictor:
        """The run's model loaded once with its calibration (:class:`~multimodal_lesion.runs.Predictor`)."""
        if self._predictor is None:
            from ..runs import Predictor

            self._predictor = Predictor.load(self.path, self.device)
        return self._predictor

    def dataset(self) -> LesionDataset:
        """The run's data, read again from where the config says (its root, schema and image folder)."""
        from ..runs import resolve_data

        return resolve_data(self.config, False, self.schema)

    def cases(self, split: str = "test") -> pd.DataFrame:
        """The cases of one split of the run's data: ``image_id``, ``image`` (path), ``dx``, patient features.

        The table is what :meth:`predict_table` takes, and any row gives :meth:`predict` its arguments.
        """
        if split not in SPLITS:
            raise ConfigError(f"split '{split}': expected one of {', '.join(SPLITS)}")
        dataset, schema = self.dataset(), self.schema  # the canonical table: dx is the class code
        ids = set(self.folder.read_splits().query("split == @split")["image_id"])
        table = dataset.metadata[dataset.metadata["image_id"].isin(ids)]
        columns = ["image_id", "path", "dx", *schema.features.names]
        return table[columns].rename(columns={"path": "image"}).reset_index(drop=True)

    # --- using the model -------------------------------------------------------------------------

    def predict(
        self, image: str | Path, *, prior: str = "", shift_level: float = 0.01, **features: object
    ) -> Prediction:
        """Predict one image with its patient features (``age=52, sex="male", localization="back"``).

        Args:
            image: the image file (any aspect ratio: padded to the run's input, never stretched).
            prior: a clinic's class prevalence (file or ``"mel=0.015"``): adds the probabilities re-weighted to it.
            shift_level: the level at which the image's shift alarm flags it out of distribution.
            **features: the run's patient features by name; a feature left out or None is unknown.

        Returns:
            Calibrated and balanced-decision probabilities, both decisions, the conformal prediction
            sets fitted on val, and the spread of the prediction over the image's flips.
        """
        from ..runs import Case
        from ..workflows import conformal_sets, predict

        given = {k: v for k, v in features.items() if v is not None and not _is_nan(v)}
        case = Case(image, given)
        if prior:  # a bad prior is refused before the model is loaded
            from ..training.new_data import clinic_prior

            clinic_prior(self.folder, prior)
        if self._predictor is None:  # the inputs are checked before the model is loaded
            from ..data.images import load_rgb

            load_rgb(image)
            case.table(self.schema)
        if self._sets is None:
            self._sets = conformal_sets(self.path)
        out = predict(self.predictor, case, sets=self._sets, prior=prior, shift_level=shift_level)
        probs, balanced = out["calibrated"], out["balanced_probabilities"]
        return Prediction(
            image=str(image),
            probabilities=probs,
            predicted=max(probs, key=probs.get),
            balanced_probabilities=balanced,
            balanced_decision=None if balanced is None else max(balanced, key=balanced.get),
            prediction_sets=out["prediction_sets"],
            tta_spread=out["tta_spread"],
            shift=out["shift"],
            prior_probabilities=out["prior_probabilities"],
        )

    def predict_table(
        self,
        cases: pd.DataFrame | str | Path,
        *,
        fit: Fit = "pad",
        adapt_bn: bool = False,
        prior: str = "",
        shift_level: float = 0.01,
        shift: bool = True,
    ) -> pd.DataFrame:
        """Predict many cases with one model load: a table, a CSV file, or a folder of images.

        Args:
            cases: a DataFrame with an ``image`` column (paths) and patient-feature columns (as
                :meth:`cases` returns), a CSV file of the same (paths relative to it), or a folder whose
                every image is predicted with unknown patient features.
            fit: images of another aspect ratio: ``pad`` (default), ``crop`` or ``stretch``.
            adapt_bn: first re-estimate the run's batch-norm statistics on these images (AdaBN; a
                model loaded for this call only; end-to-end and partial runs, see ``docs/shift.md``).
                The shift alarm then compares the adapted embeddings with the unadapted run's.
            prior: the clinic's class prevalence (a CSV / TOML file of class, prevalence, or
                ``"mel=0.015,nv=0.7"``; classes left out keep their training proportions): adds the
                calibrated probabilities re-weighted to it and their arg-max.
            shift_level: the level of the per-image shift alarm (its false-alarm rate on images like
                the run's own).
            shift: compute the shift alarm (the first call embeds the run's own images once).

        Returns:
            One row per case, in order: ``image_id``, ``image``, ``p_<class>``, ``predicted``,
            ``balanced_p_<class>``, ``balanced_decision``, ``set_<level>`` and ``empty_set_<level>``
            (no class is plausible at this level: refer), ``shift_score``, ``shift_p`` and
            ``out_of_distribution`` (models that look at the image), and with ``prior``
            ``prior_p_<class>`` and ``prior_decision``.
        """
        import dataclasses

        from ..runs import Predictor, adapt_to_cases, cases_in_csv, cases_in_folder, predict_arrays, prediction_frame
        from ..training.new_data import NewDataOptions, annotate

        if isinstance(cases, str | Path):
            path = Path(cases)
            table, source = (cases_in_folder(path) if path.is_dir() else cases_in_csv(path)), str(cases)
        else:
            table, source = _frame_cases(cases), "the table"
        options = NewDataOptions(prior, shift_level=shift_level, shift=shift)
        if prior:  # a bad prior is refused before any image is read
            from ..training.new_data import clinic_prior

            clinic_prior(self.folder, prior)
        if adapt_bn:  # a model of its own: the run's loaded one keeps its statistics
            predictor = Predictor.load(self.path, self.device, fit=fit)
            adapt_to_cases(predictor, table, source)
        else:
            predictor = dataclasses.replace(self.predictor, fit=fit)
        probs = predict_arrays(predictor, table, source)
        frame = prediction_frame(table, self.classes, probs)
        return annotate(frame, self.path, probs.calibrated, probs.embeddings, options)[0]

    def evaluate(
        self,
        data: str | Path | None = None,
        split: str = "test",
        schema: str | None = None,
        *,
        tta: bool = False,
        key_vs_rest: bool = False,
        exclude_seen: bool = False,
        fit: Fit = "pad",
        images: str = "",
        duplicates: str = "",
        drop_missing: bool = False,
        show: bool = False,
        mlflow: str = "",
        adapt_bn: bool = False,
        prior: str = "",
        estimate_prior: bool = False,
        shift_level: float = 0.01,
    ) -> Evaluation:
        """Score the run on a split of its own data, or on a dataset it never saw (external validation).

        Args:
            data: None: the run's data. The run's data at another root: scored on ``split``. A dataset
                the run never saw (none of its images in the run's splits): scored whole, as external.
            split: ``train``, ``val`` or ``test`` of the run's own data.
            schema: the external data's schema (preset name or TOML file; default: the run's).
            tta: average over flips (own data).
            key_vs_rest: external: score the run's key class against the rest.
            exclude_seen: external: leave out images in the run's splits instead of refusing them.
            fit: external images of another aspect ratio: ``pad``, ``crop`` or ``stretch``.
            images: the folder the images are below, when not the data root.
            duplicates: a CSV of image pairs of one lesion (kept in one group).
            drop_missing: own data: drop listed images not found (reported).
            show: print progress.
            mlflow: an MLflow tracking URI (a bare path: a local file store); the evaluation is then
                also an MLflow run in the run's experiment.
            adapt_bn: external: first re-estimate the run's batch-norm statistics on the external
                images (AdaBN, no labels); the results go to their own ``...-adapt_bn`` folder.
            prior: external: OTHER's known class prevalence (file or ``"mel=0.015"``): the calibrated
                probabilities re-weighted to it are scored beside the run's (Saerens et al. 2002).
            estimate_prior: external: estimate OTHER's prevalence by EM and score it too (a
                diagnostic; warned against when the shift alarm fires).
            shift_level: external: the level of the per-image shift alarm.

        Returns:
            The split's metrics and the ``metrics.json`` written (in ``RUN/eval/<split>/`` or
            ``RUN/external/<name>/``, with its figures).
        """
        from ..workflows import is_external

        self.folder.check()
        explicit = key_vs_rest or exclude_seen
        if (explicit or schema or prior or estimate_prior) and data is None:
            raise ConfigError(
                "schema, key_vs_rest, exclude_seen, prior and estimate_prior score other data: give it as data"
            )
        if prior:  # a bad prior is refused before any image is read
            from ..training.new_data import clinic_prior

            clinic_prior(self.folder, prior)
        if data is not None and (explicit or is_external(self.path, data, schema, images)):
            from ..training.external import ExternalOptions

            options = ExternalOptions(
                schema,
                key_vs_rest,
                fit,
                self.device,
                exclude_seen,
                images=images,
                duplicates=str(Path(duplicates).resolve()) if duplicates else "",
                prior=prior,
                estimate_prior=estimate_prior,
                shift_level=shift_level,
                adapt_bn=adapt_bn,
            )
            return self._evaluate_external(data, options, show, mlflow)
        if adapt_bn:
            raise ConfigError("--adapt-bn adapts the run to data it never saw: give external data with --data")
        if prior or estimate_prior:
            raise ConfigError("prior and estimate_prior score other data; this data is the run's own")
        return self._evaluate_own(data, split, tta, images, duplicates, drop_missing, show, mlflow)

    def _evaluate_own(
        self,
        data: str | Path | None,
        split: str,
        tta: bool,
        images: str,
        duplicates: str,
        drop_missing: bool,
        show: bool,
        mlflow: str = "",
    ) -> Evaluation:
        from ..workflows import evaluate_run

        if split not in SPLITS:
            raise ConfigError(f"split '{split}': expected one of {', '.join(SPLITS)}")
        settings: dict[str, Any] = {}
        if images:
            settings["images"] = images if images == "none" else str(Path(images).resolve())
        if duplicates:
            settings["duplicates"] = str(Path(duplicates).resolve())
        if drop_missing:
            settings["drop_missing"] = True
        evaluation = self.folder.evaluation(split).path
        with output_folder(self.path, option="--run"), output_folder(evaluation, option="--run", lock=False):
            metrics, path = evaluate_run(
                self.path, split, data, tta=tta, device=self.device, data_settings=settings, show=show, mlflow=mlflow
            )
        return Evaluation(split, path, metrics[split], metrics)

    def _evaluate_external(self, data: str | Path, options: Any, show: bool, mlflow: str = "") -> Evaluation:
        from ..training.external import SPLIT, external_folder, other_schema, scores_key_vs_rest
        from ..workflows import evaluate_external_run

        own = self.schema
        other = other_schema(options.schema, own, options.duplicates)
        kvr = scores_key_vs_rest(other, own, options.key_vs_rest)
        out = external_folder(self.folder, data, other, kvr, options.adapt_bn).path
        with output_folder(self.path, option="--run"), output_folder(out, option="--run", lock=False):
            metrics, path = evaluate_external_run(self.path, data, options, show=show, mlflow=mlflow)
        return Evaluation(SPLIT, path, metrics[SPLIT], metrics)

    def explain(
        self,
        n: int | None = None,
        *,
        out: str | Path,
        cases: list[str] | None = None,
        split: str = "test",
        data: str | Path | None = None,
        settings: Mapping[str, Any] | None = None,
        show: bool = False,
    ) -> ExplanationReport:
        """Explain cases of the run: Grad-CAM, grouped SHAP, the image-vs-metadata split, faithfulness.

        Args:
            n: how many cases (default: the run's ``explain.n_cases``), spread over the true classes.
            out: the report folder (``index.html``, ``explanations.json``, maps, figures).
            cases: image ids to explain instead of choosing ``n``.
            split: the split the cases come from.
            data: the run's data at another root.
            settings: ``explain.*`` settings replacing the run's (e.g. ``{"faithfulness_cases": 100}``).
            show: print the timing line.

        Returns:
            The report's location and what it shows, in memory (``.cases``, ``.shap``, ``.to_frame()``).
        """
        from ..config import load_config
        from ..workflows import explain_cohort

        if settings:  # ranges and types checked like any config value, naming the key
            load_config(None, [f"explain.{k}={_toml(v)}" for k, v in settings.items()])
        with output_folder(out):
            index, cohort = explain_cohort(
                self.path, out, data=data, split=split, cases=cases, n=n, settings=settings, show=show
            )
        return ExplanationReport(index, Path(out), cohort.cases, cohort.shap_values, cohort.to_json())

    def attributions(self, split: str = "test", data: str | Path | None = None) -> Attributions:
        """Grouped SHAP values and the image-vs-features split of every case of ``split`` (no maps, nothing written).

        The numbers of :meth:`explain`'s report for the same cases, for the whole split: what shap's
        cohort plots (beeswarm, bar) need.
        """
        from ..workflows import attribute_split

        if split not in SPLITS:
            raise ConfigError(f"split '{split}': expected one of {', '.join(SPLITS)}")
        out = attribute_split(self.path, split, data)
        return Attributions(split, out["image_ids"], out["true"], out["predicted"], out["shap"], out["modality"])

    # --- printing and comparing ------------------------------------------------------------------

    def __repr__(self) -> str:
        try:
            cfg = self.config
            about = f"{cfg.model.name} on {cfg.model.backbone}, {cfg.train.mode}"
        except Exception:  # a folder being written, or not a run: the repr must not fail
            about = "not readable"
        return f"Run({str(self.path)!r}: {about})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Run):
            return NotImplemented
        return self.path.resolve() == other.path.resolve() and self.config == other.config

    def __hash__(self) -> int:
        return hash(self.path.resolve())


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and value != value


def _toml(value: Any) -> str:
    """A Python value as the TOML literal an override takes."""
    import json

    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _frame_cases(frame: pd.DataFrame) -> Any:
    """A table of cases (an ``image`` column, patient-feature columns) as the batch predictor's input."""
    from ..errors import DataError
    from ..runs import Cases

    if "image" not in frame.columns:
        raise DataError(f"the table has no column 'image' (the image of each case); has {', '.join(frame.columns[:6])}")
    images = [str(p) for p in frame["image"]]
    ids = [str(i) for i in frame["image_id"]] if "image_id" in frame.columns else [Path(p).stem for p in images]
    known = ("image", "image_id", "dx")  # the table of :meth:`Run.cases` predicts as it is
    patients = frame.drop(columns=[c for c in known if c in frame.columns]).reset_index(drop=True)
    patients = patients.astype(object).where(patients.notna(), None)
    patients = patients.map(lambda v: v if v is None else str(v))
    return Cases([Path(p).expanduser().resolve() for p in images], patients, ids)
