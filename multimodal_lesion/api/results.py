"""The small typed results of the public API: each prints readably and turns into a table or a dict.

They hold what the library computed (and where it wrote it); nothing here computes. ``pandas`` is
imported inside ``to_frame`` so that holding a result costs nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

#: The headline numbers of one split (``metrics.json``'s ``<split>.calibrated``), in table order.
HEADLINE = ("balanced_accuracy", "macro_auroc", "key_auroc", "ece", "n_images", "n_lesions")


def headline(split: Mapping[str, Any]) -> dict[str, Any]:
    """One split's headline: calibrated metrics plus the balanced decision's balanced accuracy, and each
    balanced accuracy's 95% lesion-bootstrap interval (``*_low`` / ``*_high``; None in runs made before it)."""
    calibrated = split["calibrated"]
    row = {k: calibrated.get(k, calibrated.get("melanoma_auroc") if k == "key_auroc" else None) for k in HEADLINE}
    balanced = split.get("balanced") or {}
    row["balanced_decision_accuracy"] = balanced.get("balanced_accuracy")
    for name, metrics in (("balanced_accuracy", calibrated), ("balanced_decision_accuracy", balanced)):
        ci = metrics.get("balanced_accuracy_ci") or {}
        row[f"{name}_low"], row[f"{name}_high"] = ci.get("ci_low"), ci.get("ci_high")
    return row


def _with_interval(row: Mapping[str, Any], name: str) -> str:
    """'0.812' or '0.812 [0.760, 0.861]'."""
    low, high = row.get(f"{name}_low"), row.get(f"{name}_high")
    return f"{row[name]:.3f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")


def _describe(row: Mapping[str, Any]) -> str:
    """'balanced accuracy 0.812 [0.760, 0.861] (0.834 [...] with the balanced decision), macro AUROC 0.95, 150 images'.

    The brackets: 95% lesion-bootstrap intervals, where the run has them.
    """
    parts = [f"balanced accuracy {_with_interval(row, 'balanced_accuracy')}"]
    if row.get("balanced_decision_accuracy") is not None:
        parts[0] += f" ({_with_interval(row, 'balanced_decision_accuracy')} with the balanced decision)"
    if row.get("macro_auroc") is not None:
        parts.append(f"macro AUROC {row['macro_auroc']:.3f}")
    return ", ".join([*parts, f"{row['n_images']} images"])


@dataclass(frozen=True)
class RunMetrics:
    """A run's scores (``metrics.json``): the validation and test splits, calibrated and balanced decision.

    ``values`` is the whole file; :meth:`to_frame` is the headline table (one row per split).
    """

    values: Mapping[str, Any] = field(repr=False)

    @property
    def splits(self) -> list[str]:
        """The splits scored at training time, in order (``val``, ``test``)."""
        return [s for s in ("train", "val", "test") if isinstance(self.values.get(s), Mapping)]

    def __getitem__(self, split: str) -> Any:
        return self.values[split]

    def to_frame(self) -> pd.DataFrame:
        """The headline metrics, one row per split (index), one column per metric."""
        import pandas as pd

        return pd.DataFrame({s: headline(self.values[s]) for s in self.splits}).T.rename_axis("split")

    def to_dict(self) -> dict[str, Any]:
        """The whole ``metrics.json`` as a dict."""
        return dict(self.values)

    def __repr__(self) -> str:
        shown = "; ".join(f"{s}: {_describe(headline(self.values[s]))}" for s in self.splits)
        return f"RunMetrics({self.values.get('model', '?')}: {shown})"


@dataclass(frozen=True)
class Prediction:
    """One case's prediction: probabilities, both decisions, conformal prediction sets and the TTA spread.

    Attributes:
        image: the image predicted.
        probabilities: calibrated probability per class (temperature fitted on val).
        predicted: the class of highest calibrated probability.
        balanced_probabilities: the balanced decision's probabilities (uniform class prior, fitted on
            val; None for runs trained before it existed).
        balanced_decision: the class the run's balanced accuracy was scored on (None without it).
        prediction_sets: per coverage level (``"0.90"``), the classes of the conformal set that holds
            the true class with that probability.
        tta_spread: standard deviation of the predicted class's probability over the image's flips
            (None for a model that does not look at the image).
        shift: the image's shift alarm: ``shift_score`` (distance to its k-th nearest training image),
            ``shift_p`` (conformal p-value against the validation images), ``out_of_distribution``
            (``shift_p <= level``) and ``level``; None without an image branch or the run's data.
        prior_probabilities: the calibrated probabilities re-weighted to a clinic's prevalence
            (``prior``), else None.
    """

    image: str
    probabilities: Mapping[str, float]
    predicted: str
    balanced_probabilities: Mapping[str, float] | None
    balanced_decision: str | None
    prediction_sets: Mapping[str, Sequence[str]]
    tta_spread: float | None
    shift: Mapping[str, Any] | None = None
    prior_probabilities: Mapping[str, float] | None = None

    @property
    def empty_sets(self) -> dict[str, str]:
        """Per level whose set is empty, what that means (no class is plausible at this level: refer)."""
        from ..training.uncertainty import EMPTY_SET_MEANING

        return {level: EMPTY_SET_MEANING for level, members in self.prediction_sets.items() if not members}

    def to_json(self, balanced: bool = False) -> dict[str, Any]:
        """What ``mmlesion predict --image`` prints (``balanced``: the balanced decision's probabilities)."""
        shown = self.balanced_probabilities if balanced and self.balanced_probabilities is not None else None
        out: dict[str, Any] = {
            "probabilities": dict(shown if shown is not None else self.probabilities),
            "prediction_sets": {k: list(v) for k, v in self.prediction_sets.items()},
            "tta_spread": self.tta_spread,
        }
        if self.empty_sets:
            out["empty_sets"] = self.empty_sets
        if self.shift is not None:
            out["shift"] = dict(self.shift)
        if self.prior_probabilities is not None:
            out["prior_probabilities"] = dict(self.prior_probabilities)
            out["prior_decision"] = max(self.prior_probabilities, key=self.prior_probabilities.__getitem__)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain Python values."""
        return {
            "image": self.image,
            "probabilities": dict(self.probabilities),
            "predicted": self.predicted,
            "balanced_probabilities": None
            if self.balanced_probabilities is None
            else dict(self.balanced_probabilities),
            "balanced_decision": self.balanced_decision,
            "prediction_sets": {k: list(v) for k, v in self.prediction_sets.items()},
            "tta_spread": self.tta_spread,
            "shift": None if self.shift is None else dict(self.shift),
            "prior_probabilities": None if self.prior_probabilities is None else dict(self.prior_probabilities),
        }

    def to_frame(self) -> pd.DataFrame:
        """One row per class: its probabilities and whether each prediction set holds it."""
        import pandas as pd

        classes = list(self.probabilities)
        table = pd.DataFrame({"probability": [self.probabilities[c] for c in classes]}, index=classes)
        if self.balanced_probabilities is not None:
            table["balanced_probability"] = [self.balanced_probabilities[c] for c in classes]
        for level, members in self.prediction_sets.items():
            table[f"in_set_{level}"] = [c in members for c in classes]
        return table.rename_axis("class")

    def __repr__(self) -> str:
        sets = ", ".join(
            f"{k}: {{{', '.join(v)}}}" if v else f"{k}: {{}} (refer)" for k, v in self.prediction_sets.items()
        )
        balanced = f", balanced decision {self.balanced_decision}" if self.balanced_decision else ""
        spread = f", TTA spread {self.tta_spread:.3f}" if self.tta_spread is not None else ""
        return f"Prediction({self.predicted} p={self.probabilities[self.predicted]:.3f}{balanced}; sets {sets}{spread})"


@dataclass(frozen=True)
class Evaluation:
    """A run scored on one split of its data or on a dataset it never saw (``split == "external"``).

    Attributes:
        split: ``train``, ``val``, ``test`` or ``external``.
        path: the ``metrics.json`` written (figures beside it).
        values: that split's metrics: ``calibrated`` and ``balanced`` (and ``key_vs_rest`` when scored so).
        metrics: the whole metrics file (its ``split`` entry is ``values``).
    """

    split: str
    path: Path
    values: Mapping[str, Any] = field(repr=False)
    metrics: Mapping[str, Any] = field(repr=False)

    def to_frame(self) -> pd.DataFrame:
        """The headline metrics as a one-row table (index: the split)."""
        import pandas as pd

        return pd.DataFrame({self.split: headline(self.values)}).T.rename_axis("split")

    def to_dict(self) -> dict[str, Any]:
        """The split's metrics as a dict."""
        return dict(self.values)

    def __repr__(self) -> str:
        return f"Evaluation({self.split}: {_describe(headline(self.values))}; {self.path})"


@dataclass(frozen=True)
class ExplanationReport:
    """The explanation report of a run: where it was written and what was computed, in memory.

    Attributes:
        index: the report's ``index.html``.
        folder: the report folder (``explanations.json``, maps, figures, faithfulness tables).
        cases: one :class:`~multimodal_lesion.explain.results.CaseExplanation` per case, with its
            pixels, Grad-CAM map and lesion mask in memory.
        shap: the grouped SHAP values of the cases as a ``shap.Explanation`` (every shap plot takes it).
        values: the content of ``explanations.json``.
    """

    index: Path
    folder: Path
    cases: Sequence[Any] = field(repr=False)
    shap: Any = field(repr=False)
    values: Mapping[str, Any] = field(repr=False)

    def to_frame(self) -> pd.DataFrame:
        """One row per case: id, true and explained class, output, SHAP per feature, image-vs-feature split."""
        import pandas as pd

        rows = []
        for case in self.values["cases"]:
            row = {k: case[k] for k in ("image_id", "true_label", "target_class", "model_output", "shap_base_value")}
            row |= {f"shap.{k}": v for k, v in case["shap"].items()}
            row |= {f"modality.{k}": v for k, v in case["modality"].items()}
            rows.append(row)
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        """``explanations.json`` as a dict."""
        return dict(self.values)

    def __repr__(self) -> str:
        return f"ExplanationReport({len(self.cases)} cases; {self.index})"


@dataclass(frozen=True)
class Attributions:
    """Grouped SHAP values and the image-vs-features split of every case of a split (no maps).

    Each case explains its predicted class, with the run's ``explain`` settings (the report's game).

    Attributes:
        split: the split explained.
        image_ids: the cases, in order.
        true_labels: each case's class code.
        predicted: each case's explained (predicted) class.
        shap: a ``shap.Explanation`` (cases x patient features): ``shap.plots.beeswarm(a.shap)``.
        modality: Shapley values over {image, each patient feature}: ``.players``, ``.values`` (cases x players).
    """

    split: str
    image_ids: Sequence[str] = field(repr=False)
    true_labels: Sequence[str] = field(repr=False)
    predicted: Sequence[str] = field(repr=False)
    shap: Any = field(repr=False)
    modality: Any = field(repr=False)

    def to_frame(self) -> pd.DataFrame:
        """One row per case: id, true and explained class, SHAP per feature, the modality split."""
        import pandas as pd

        table = pd.DataFrame(
            {"image_id": self.image_ids, "true_label": self.true_labels, "target_class": self.predicted}
        )
        for k, name in enumerate(self.shap.feature_names):
            table[f"shap.{name}"] = self.shap.values[:, k]
        for k, player in enumerate(self.modality.players):
            table[f"modality.{player}"] = self.modality.values[:, k]
        return table

    def __repr__(self) -> str:
        return f"Attributions({self.split}: {len(self.image_ids)} cases, features {list(self.shap.feature_names)})"


@dataclass(frozen=True)
class Embeddings:
    """The frozen image branch's embeddings of every image of a dataset, and how they were obtained.

    Attributes:
        values: (images, features) float32, in the dataset's row order.
        backend: ``torch``, ``onnxruntime`` or ``openvino``; ``cache`` when read from the package cache.
        seconds: wall time of the embedding pass alone (0 when read from the cache).
        views: views averaged per image (4 flips with ``train.flip_average``, else 1).
        image_size: (height, width) fed to the backbone.
    """

    values: Any = field(repr=False)
    backend: str
    seconds: float
    views: int
    image_size: tuple[int, int]

    def __repr__(self) -> str:
        rate = f", {len(self.values) / self.seconds:.1f} images/s" if self.seconds else ""
        return f"Embeddings({self.values.shape} by {self.backend}, {self.views} view(s){rate})"


@dataclass(frozen=True)
class AblationResult:
    """An ablation's output folder and its files by name (``summary_md``, ``comparison``, ``results``, ...).

    :meth:`to_frame` is the per-cell table (model x fold x seed); :meth:`comparison` the paired
    comparison with the baseline; :attr:`summary` the markdown summary.
    """

    folder: Path
    paths: Mapping[str, Path] = field(repr=False)

    @property
    def summary(self) -> str:
        """``summary.md``: mean, spread and CIs per model, the comparison and per-class sensitivity."""
        return self.paths["summary_md"].read_text()

    def to_frame(self) -> pd.DataFrame:
        """One row per cell (model, fold, seed) with its test metrics (``results.csv``)."""
        import pandas as pd

        return pd.read_csv(self.paths["results"])

    def comparison(self) -> pd.DataFrame:
        """Each model minus the baseline on the same cells: mean difference, CI, p-values (``comparison.csv``)."""
        import pandas as pd

        return pd.read_csv(self.paths["comparison"])

    def to_dict(self) -> dict[str, str]:
        """The written files by name."""
        return {k: str(v) for k, v in self.paths.items()}

    def __repr__(self) -> str:
        return f"AblationResult({self.folder}: {', '.join(sorted(self.paths))})"
