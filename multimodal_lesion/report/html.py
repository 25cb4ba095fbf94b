"""Self-contained HTML explanation report: ``index.html`` (the cohort) and ``cases/<name>.html``.

The pages open from disk without a server: every figure is embedded as a base64 data URI, the
CSS is inline, there is no JavaScript and no external URL, and a Content-Security-Policy meta tag
(``default-src 'none'; img-src data:``) forbids anything else as a second line of defence.
Strings that come from data (image ids, labels, patient values, provenance, notes) are data, never
markup: Jinja2 renders with ``autoescape=True`` and every value is first turned into a plain
``str`` (so a ``markupsafe.Markup`` or an object with ``__html__`` cannot smuggle markup in).
Case page file names are a sanitised prefix of the id plus a hash of the full id, so a hostile
``image_id`` (``../x``, ``a/b``, HTML) never reaches a path. Files are written atomically, case
pages before the index, so the index never links to a page that is not there.

Input: a :class:`~multimodal_lesion.explain.results.CohortExplanation` (typed; explain builds it)
and the :class:`ReportFigures` drawn for it (PNG paths on disk, embedded as data URIs). Parts may be
absent: an ``image_only`` model has no SHAP, a ``metadata_only`` model no Grad-CAM. Values are still
checked as they are rendered (a non-number where a number belongs is a DataError naming the case).

Class rows follow the run's class order and show its long names (``CohortExplanation.classes`` /
``class_names``, from the run's schema; HAM10000's ``CLASS_NAMES`` for a cohort that names none).
"""

from __future__ import annotations

import base64
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..data.constants import CLASS_NAMES, CLASSES
from ..errors import DataError
from ..explain.faithfulness import PairedComparison
from ..explain.randomisation import StageResult
from ..explain.results import CaseExplanation, CohortExplanation, FaithfulnessRow
from ..io import atomic_write, safe_stem
from ..training.uncertainty import EMPTY_SET_MEANING

#: Figure names in the order they appear, with their captions; other names follow, humanised.
CASE_FIGURES: dict[str, str] = {
    "image": "Dermoscopic image, as the model saw it",
    "original": "The image as it was, before the run's colour constancy",
    "overlay": "Grad-CAM of the explained class",
    "runner_up": "Grad-CAM of the runner-up class: the differential",
    "waterfall": "SHAP waterfall of the patient features",
    "modality": "Image versus patient features (exact Shapley values)",
    "what_if": "What if: the explained class's probability across each patient feature's values (the rest fixed)",
    "metadata_map": "What the patient's metadata does to the map: the Grad-CAM with the case's metadata, with "
    "every patient feature absent, and their difference",
    "age_maps": "What if: the Grad-CAM of the explained class at a few ages (the image and the other features fixed)",
}
#: What the metadata can do to the map, by where the model fuses (``CaseExplanation.fusion``).
FUSION_TEXT: dict[str, str] = {
    "maps": "This model fuses the metadata into the feature maps, before the Grad-CAM layer: the metadata "
    "changes the layer's activations as well as the weight of each channel.",
    "late": "This model fuses the metadata after the image is pooled: the Grad-CAM layer's activations are the "
    "same with or without it; it can move the map only through the weight of each channel.",
    "image only": "This model ignores the metadata: the map is the same without it (rank correlation 1 by "
    "construction).",
}
COHORT_FIGURES: dict[str, str] = {
    "cohort_grid": "Every explained case: the image and its Grad-CAM",
    "randomisation": "Cascading model randomisation: similarity of each stage's maps to the trained maps",
    "beeswarm": "SHAP beeswarm of the patient features",
    "shap_bar": "Mean |SHAP| per patient feature",
    "modality_by_class": "Image versus metadata share of |attribution|, per class",
}
#: Said after the caption of a figure that draws the lesion's contour, only when the data has masks.
CONTOUR_CAPTIONS: dict[str, str] = {
    "overlay": " (white line: the lesion's contour)",
    "cohort_grid": " (white line: lesion contour, where the case has a mask)",
}
#: Names of the baseline maps, as the faithfulness tables show them.
BASELINE_LABELS: dict[str, str] = {
    "mean_mask": "Mean training mask",
    "centre": "Centre prior (fitted)",
    "smooth_random": "Smooth random map",
}
#: Image formats accepted for embedding, by file signature (the MIME type never comes from data).
IMAGE_SIGNATURES: dict[bytes, str] = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}
ALL_KEY = "all"
CASES_DIR = "cases"


@dataclass
class ReportFigures:
    """The PNG files drawn for a report: cohort figures by name, case figures by image id then name."""

    cohort: dict[str, Path | None] = field(default_factory=dict)
    cases: dict[str, dict[str, Path | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class ClassVocabulary:
    """A run's classes in logit order with their long names: how class rows are ordered and labelled.

    Built from the cohort (``CohortExplanation.classes`` / ``class_names``, the run's schema); a cohort
    that names none (older explanations) falls back on HAM10000's table.
    """

    order: tuple[str, ...] = CLASSES
    names: Mapping[str, str] = field(default_factory=lambda: dict(CLASS_NAMES))

    @classmethod
    def of(cls, cohort: CohortExplanation) -> ClassVocabulary:
        """The cohort's own vocabulary, else HAM10000's."""
        if not isinstance(cohort, CohortExplanation) or not cohort.classes:
            return cls()
        classes = tuple(_text(c) for c in cohort.classes)
        return cls(classes, {c: _text(cohort.class_names.get(c, c)) for c in classes})

    def label(self, code: Any) -> str:
        """The long name of a class code, else the value itself; None -> a dash."""
        if code is None:
            return "\u2014"
        return self.names.get(_text(code), _text(code))

    def ordered(self, keys: Iterable[Any]) -> list[str]:
        """Class keys in the run's class order, then unknown ones as given, ``"all"`` last."""
        keys = [_text(k) for k in keys]
        known = [c for c in self.order if c in keys]
        rest = [k for k in keys if k not in self.order and k != ALL_KEY]
        return known + rest + ([ALL_KEY] if ALL_KEY in keys else [])

    def row_label(self, key: str) -> str:
        """Row heading of a per-class table."""
        return "All cases" if key == ALL_KEY else self.label(key)


def write_report(out: str | Path, cohort: CohortExplanation, figures: ReportFigures | None = None) -> Path:
    """Render ``out/index.html`` and one ``out/cases/<name>.html`` per case; returns the index path."""
    out = Path(out)
    figures = figures or ReportFigures()
    env = _environment()
    vocab = ClassVocabulary.of(cohort)
    cases = cohort.cases
    pages = _page_names(cases)
    views = [
        _case_view(case, figures.cases.get(_text(case.image_id)), pages[i], i, len(cases), pages, vocab)
        for i, case in enumerate(cases)
    ]
    cohort_view = _cohort_view(cohort, figures.cohort, views, vocab)  # all validated before the first file is written
    for view in views:
        _write(out / CASES_DIR / view["page"], env.get_template("case.html").render(case=view, **_common()))
    index = out / "index.html"
    _write(index, env.get_template("index.html").render(cohort=cohort_view, cases=views, **_common()))
    return index


def write_case_pages(
    out: str | Path,
    cases: Sequence[CaseExplanation],
    figures: Mapping[str, Mapping[str, Path | None]],
    ids: Sequence[str],
    offset: int,
    vocab: ClassVocabulary,
) -> None:
    """Render the pages of the report's cases ``offset``, ``offset + 1``, ... (``cases``) as soon as they are
    finished, linked to their neighbours among all of the report's cases (``ids``, in order);
    :func:`write_report` renders them again with the index at the end."""
    out = Path(out)
    env = _environment()
    _page_names(cases)
    pages = [case_page_name(_text(i)) for i in ids]
    for j, case in enumerate(cases):
        i = offset + j
        view = _case_view(case, figures.get(_text(case.image_id)), pages[i], i, len(ids), pages, vocab)
        _write(out / CASES_DIR / view["page"], env.get_template("case.html").render(case=view, **_common()))


def case_page_name(image_id: str) -> str:
    """File name of a case page: a sanitised, bounded prefix of the id plus a hash of the full id."""
    return f"{safe_stem(image_id)}.html"


def _environment() -> Any:
    """A Jinja2 environment over the packaged templates; autoescape on, undefined names fail."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("multimodal_lesion.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _common() -> dict[str, Any]:
    """Values every template sees."""
    return {"version": __version__}


def _write(path: Path, text: str) -> None:
    """Write one page atomically, UTF-8, readable by all (a report is meant to be shared)."""
    with atomic_write(path, "wb") as fh:
        fh.write(text.encode("utf-8"))
        os.fchmod(fh.fileno(), 0o644)  # mkstemp creates 0600


# ----------------------------------------------------------------------------- plain values


def _text(value: Any) -> str:
    """Any value as a plain ``str`` (never Markup); None -> "", mappings -> ``k: v; ...``."""
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return "; ".join(f"{_text(k)}: {_text(v)}" for k, v in value.items())
    text = str(value)
    return text if type(text) is str else str.__str__(text)


def _float(value: Any, where: str) -> float:
    """A number from the data, or DataError naming where it was."""
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected a number, got {_text(value)[:60]!r}") from None


def _num(value: Any, signed: bool = False) -> str:
    """A number for display: 3 decimals, never scientific (a positive value below 0.001 reads
    ``<0.001``), bools as yes/no, None as a dash."""
    if value is None:
        return "\u2014"
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):+d}" if signed else str(int(value))
    if not isinstance(value, numbers.Real):
        return _text(value)
    x = float(value)
    if math.isnan(x):
        return "n/a"
    if signed:
        return f"{x:+.3f}"
    return "<0.001" if 0 < x < 1e-3 else f"{x:.3f}"


def _plus_minus(value: Any) -> str:
    """A sampling error as ``±0.004`` (empty when unknown)."""
    return "" if value is None else f"±{_num(abs(float(value)))}"


def _clip01(x: float) -> float:
    """``x`` clipped to [0, 1]; NaN -> 0 (so data can never break a bar's layout)."""
    return min(max(x, 0.0), 1.0) if math.isfinite(x) else (1.0 if x == math.inf else 0.0)


def _percent(share: float) -> str:
    """A share in [0, 1] as a CSS width in percent."""
    return f"{_clip01(share) * 100:.1f}"


def _union(mappings: Iterable[Mapping[str, Any]]) -> list[str]:
    """Keys of several mappings in order of first appearance."""
    seen: dict[str, None] = {}
    for mapping in mappings:
        seen.update((_text(k), None) for k in mapping)
    return list(seen)


# ----------------------------------------------------------------------------- figures


def _data_uri(path: Any, where: str) -> str:
    """Read an image file and return it as a base64 data URI; DataError when missing or not an image."""
    file = Path(_text(path))
    try:
        payload = file.read_bytes()
    except OSError as exc:
        raise DataError(f"{where}: cannot read figure {file}: {exc.strerror or exc}") from None
    mime = next((m for sig, m in IMAGE_SIGNATURES.items() if payload.startswith(sig)), None)
    if mime is None:
        raise DataError(f"{where}: figure {file} is not a PNG or JPEG file")
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def _figures(figures: Mapping[str, Any] | None, captions: Mapping[str, str], where: str) -> list[dict]:
    """Embedded figures, known names first in caption order, the rest humanised; None paths skipped."""
    figures = {_text(k): v for k, v in (figures or {}).items() if v is not None}
    names = [n for n in captions if n in figures] + [n for n in figures if n not in captions]
    return [
        {
            "name": n,
            "caption": captions.get(n) or n.replace("_", " ").capitalize(),
            "src": _data_uri(figures[n], f"{where}: figures[{n!r}]"),
        }
        for n in names
    ]


# ----------------------------------------------------------------------------- cases


def _page_names(cases: Sequence[CaseExplanation]) -> list[str]:
    """Validate the cases and their unique ids; return each case's page file name."""
    seen: dict[str, int] = {}
    for i, case in enumerate(cases):
        if not isinstance(case, CaseExplanation):
            raise DataError(f"case {i}: expected a CaseExplanation, got {type(case).__name__}")
        image_id = _text(case.image_id)
        if image_id in seen:
            raise DataError(f"case {i}: duplicate image_id {image_id[:60]!r} (also case {seen[image_id]})")
        seen[image_id] = i
    return [case_page_name(_text(case.image_id)) for case in cases]


def _case_view(
    case: CaseExplanation,
    figures: Mapping[str, Any] | None,
    page: str,
    i: int,
    n: int,
    pages: Sequence[str],
    vocab: ClassVocabulary,
) -> dict:
    """Everything a case page and its index row show, as plain strings and numbers."""
    class_label = vocab.label
    where = f"case {i} ({_text(case.image_id)[:40]!r})"
    probs = _probabilities(case.probabilities, where)
    predicted = max(probs, key=probs.__getitem__) if probs else None
    true_label = None if case.true_label is None else _text(case.true_label)
    shap_rows = _shap_rows(case.shap or {}, case.patient or {}, where, case.shap_error or {})
    modality = _share_rows(case.modality or {}, where, case.modality_error or {})
    return {
        "page": page,
        "image_id": _text(case.image_id),
        "target": class_label(case.target_class),
        "predicted": class_label(predicted),
        "probability": _num(probs.get(predicted)) if predicted else "\u2014",
        "probability_width": _percent(probs.get(predicted, 0.0) if predicted is not None else 0.0),
        "true_label": class_label(true_label),
        "selection": _text(case.selection),
        "explained_probability": _num(case.explained_probability),
        "runner_up": class_label(case.runner_up_class) if case.runner_up_class else None,
        "prediction_sets": [
            {
                "level": _percent_label(level, where),
                "classes": ", ".join(class_label(c) for c in classes) or f"(empty: {EMPTY_SET_MEANING})",
                "empty": not classes,
            }
            for level, classes in (case.prediction_sets or {}).items()
        ],
        "shift": _shift_view(case.shift),
        "tta_spread": _num(case.tta_spread),
        "known_truth": true_label is not None,
        "correct": true_label is not None and true_label == predicted,
        "prob_rows": _prob_rows(probs, predicted, true_label, vocab),
        "patient": [{"name": _text(k), "value": _text(v)} for k, v in (case.patient or {}).items()],
        "shap": shap_rows,
        "top_feature": _top_feature(shap_rows),
        "shap_base": _num(case.shap_base_value),
        "model_output": _num(case.model_output),
        "shap_sum": _shap_total(case, where),
        "modality": modality,
        "image_share": _player_share(modality, "image"),
        "faithfulness": [{"name": _text(k), "value": _num(v)} for k, v in (case.faithfulness or {}).items()],
        "metadata_map": _metadata_map(case),
        "figures": _figures(figures, _captions(CASE_FIGURES, _has_mask(case)), where),
        "prev": pages[i - 1] if i > 0 else None,
        "next": pages[i + 1] if i + 1 < n else None,
        "position": f"{i + 1} of {n}",
    }


def _metadata_map(case: CaseExplanation) -> dict | None:
    """The case's "metadata on the map" card: the rank correlation and what the fusion kind allows."""
    if case.cam_without_metadata is None and case.metadata_map_spearman is None:
        return None
    rho = case.metadata_map_spearman
    return {
        "spearman": "undefined (a constant map)" if rho is None or not math.isfinite(rho) else f"{rho:.3f}",
        "fusion": _text(case.fusion) or "\u2014",
        "text": FUSION_TEXT.get(case.fusion, ""),
    }


def _shift_view(shift: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The case's shift alarm as the page shows it (None when not computed)."""
    if not shift:
        return None
    return {
        "flagged": bool(shift.get("out_of_distribution")),
        "p": f"{float(shift['shift_p']):.3g}",
        "score": f"{float(shift['shift_score']):.3f}",
        "level": f"{float(shift['level']):g}",
    }


def _percent_label(level: Any, where: str) -> str:
    """A coverage level ("0.90") as "90%"."""
    return f"{_float(level, where) * 100:g}%"


def _probabilities(probs: Any, where: str) -> dict[str, float]:
    """The class probabilities as {class: float}, validated."""
    if not isinstance(probs, Mapping):
        raise DataError(f"{where}: 'probabilities' must map class -> probability")
    return {_text(k): _float(v, f"{where}: probabilities[{_text(k)!r}]") for k, v in probs.items()}


def _prob_rows(
    probs: Mapping[str, float], predicted: str | None, true_label: str | None, vocab: ClassVocabulary
) -> list[dict]:
    """One bar per class, in class order, marking the predicted and the true class."""
    return [
        {
            "label": vocab.label(c),
            "value": _num(probs[c]),
            "width": _percent(probs[c]),
            "predicted": c == predicted,
            "true": c == true_label,
        }
        for c in vocab.ordered(probs)
    ]


def _shap_rows(
    shap: Mapping[str, Any], patient: Mapping[str, Any], where: str, errors: Mapping[str, Any] | None = None
) -> list[dict]:
    """SHAP value per patient-feature group with its sampling error, the patient's value and a diverging bar."""
    errors = {_text(k): v for k, v in (errors or {}).items()}
    values = {_text(k): _float(v, f"{where}: shap[{_text(k)!r}]") for k, v in shap.items()}
    scale = max((abs(v) for v in values.values() if math.isfinite(v)), default=0.0) or 1.0
    patient = {_text(k): _text(v) for k, v in patient.items()}
    return [
        {
            "name": k,
            "patient": patient.get(k, ""),
            "value": _num(v, signed=True),
            "error": _plus_minus(errors.get(k)),
            "raw": v,
            "width": _percent(abs(v) / scale),
            "positive": v >= 0,
        }
        for k, v in values.items()
    ]


def _top_feature(rows: Sequence[Mapping[str, Any]]) -> str:
    """The patient feature with the largest |SHAP|, e.g. ``localization (+0.120)``."""
    finite = [r for r in rows if math.isfinite(r["raw"])]
    if not finite:
        return "\u2014"
    top = max(finite, key=lambda r: abs(r["raw"]))
    return f"{top['name']} ({top['value']})"


def _shap_total(case: CaseExplanation, where: str) -> str:
    """Base value + sum of SHAP values, shown beside the model output as an additivity check."""
    if case.shap_base_value is None or not case.shap:
        return "\u2014"
    total = _float(case.shap_base_value, f"{where}: shap_base_value")
    return _num(total + sum(_float(v, f"{where}: shap") for v in case.shap.values()))


def _share_rows(values: Mapping[str, Any], where: str, errors: Mapping[str, Any] | None = None) -> list[dict]:
    """Players with their attribution, its sampling error and share of the total |attribution|."""
    errors = {_text(k): v for k, v in (errors or {}).items()}
    values = {_text(k): _float(v, f"{where}: modality[{_text(k)!r}]") for k, v in values.items()}
    total = sum(abs(v) for v in values.values() if math.isfinite(v))
    return [
        {
            "name": k,
            "value": _num(v, signed=True),
            "error": _plus_minus(errors.get(k)),
            "share": abs(v) / total if total else 0.0,
            "share_text": f"{abs(v) / total:.0%}" if total else "\u2014",
            "width": _percent(abs(v) / total if total else 0.0),
            "seg": j % 6,
        }
        for j, (k, v) in enumerate(values.items())
    ]


def _player_share(rows: Sequence[Mapping[str, Any]], player: str) -> str:
    """One player's share as a percentage string (a dash when absent)."""
    return next((r["share_text"] for r in rows if r["name"] == player), "\u2014")


# ----------------------------------------------------------------------------- cohort


def _cohort_view(
    cohort: CohortExplanation, figures: Mapping[str, Any], cases: Sequence[Mapping[str, Any]], vocab: ClassVocabulary
) -> dict:
    """Everything the index page shows about the cohort, as plain strings and numbers."""
    if not isinstance(cohort, CohortExplanation):
        raise DataError(f"cohort: expected a CohortExplanation, got {type(cohort).__name__}")
    return {
        "title": _text(cohort.title or "Explanation report"),
        "n_cases": len(cases),
        "n_correct": sum(c["correct"] for c in cases),
        "n_known": sum(c["known_truth"] for c in cases),
        "provenance": [{"key": _text(k), "value": _text(v)} for k, v in (cohort.provenance or {}).items()],
        "shap": _heat_table(cohort.mean_abs_shap or {}, vocab, cohort.class_counts),
        "modality": _modality_table(cohort.modality_share or {}, vocab, cohort.class_counts),
        "shap_scale": "log-odds" if cohort.shap_scale == "log_odds" else "probability",
        "faithfulness": _faith_table(cohort.faithfulness or []),
        "metadata_map": _map_correlation_rows(cohort, vocab),
        "comparisons": [_comparison_row(c, j) for j, c in enumerate(cohort.comparisons or [])],
        "n_worse": sum(c.verdict == "worse" for c in cohort.comparisons or []),
        "randomisation": [_stage_row(s) for s in cohort.randomisation or []],
        "random_logit": _stage_row(cohort.random_logit) if cohort.random_logit is not None else None,
        "figures": _figures(figures, _captions(COHORT_FIGURES, any(map(_has_mask, cohort.cases or []))), "cohort"),
        "features": ", ".join(_features(cohort)),
        "notes": [_text(n) for n in cohort.notes or []] + _timing_notes(cohort.timings, len(cases)),
    }


def _map_correlation_rows(cohort: CohortExplanation, vocab: ClassVocabulary) -> dict | None:
    """Mean rank correlation of the CAM with and without the metadata, per explained class (``all`` last)."""
    table = {_text(k): v for k, v in (cohort.metadata_map_spearman or {}).items()}
    if not table:
        return None
    rows = [
        {
            "label": vocab.row_label(c),
            "n": _count(cohort.class_counts, c),
            "summary": c == ALL_KEY,
            "value": _num(_float(table[c], f"cohort: metadata_map_spearman[{c!r}]")),
        }
        for c in vocab.ordered(table)
    ]
    return {"fusion": _text(cohort.fusion) or "\u2014", "text": FUSION_TEXT.get(cohort.fusion, ""), "rows": rows}


def _features(cohort: CohortExplanation) -> list[str]:
    """The run's patient features, as the cases' SHAP values (else their patient fields) name them."""
    names = [f for case in cohort.cases or [] for f in (case.shap or case.patient or {})]
    return [_text(f) for f in dict.fromkeys(names)]


def _has_mask(case: CaseExplanation) -> bool:
    """Whether the case's figures draw a lesion contour (its data has a mask that is neither empty nor full)."""
    mask = case.mask
    return mask is not None and bool(mask.any()) and not bool(mask.all())


def _captions(captions: Mapping[str, str], contour: bool) -> dict[str, str]:
    """The figure captions, saying where a white line is the lesion's contour only when one is drawn."""
    return {name: text + (CONTOUR_CAPTIONS.get(name, "") if contour else "") for name, text in captions.items()}


def _timing_notes(timings: Mapping[str, float], n_cases: int) -> list[str]:
    """Seconds per case of each stage, when the cohort was timed."""
    if not timings or not n_cases:
        return []
    return ["Seconds per case: " + ", ".join(f"{k} {v / n_cases:.3f}" for k, v in timings.items())]


def _count(counts: Mapping[str, int] | None, key: str) -> str:
    """The number of cases behind a per-class row (a dash when unknown)."""
    return str(counts[key]) if counts and key in counts else "\u2014"


def _heat_table(
    table: Mapping[str, Mapping[str, Any]], vocab: ClassVocabulary, counts: Mapping[str, int] | None = None
) -> dict:
    """Mean |SHAP|: rows = classes (``all`` last) with their n, columns = features, cells shaded by value."""
    table = {_text(k): v for k, v in table.items()}
    features = _union(table.values())
    values = {
        (c, f): _float(v, f"cohort: mean_abs_shap[{c!r}][{_text(f)!r}]")
        for c, row in table.items()
        for f, v in row.items()
    }
    top = max((v for v in values.values() if math.isfinite(v)), default=0.0) or 1.0
    rows = [
        {
            "label": vocab.row_label(c),
            "n": _count(counts, c),
            "summary": c == ALL_KEY,
            "cells": [
                {"value": _num(values.get((c, f))), "alpha": f"{_clip01(values.get((c, f), 0.0) / top) * 0.55:.3f}"}
                for f in features
            ],
        }
        for c in vocab.ordered(table)
    ]
    return {"columns": features, "rows": rows}


def _modality_table(
    table: Mapping[str, Mapping[str, Any]], vocab: ClassVocabulary, counts: Mapping[str, int] | None = None
) -> dict:
    """Modality share: rows = classes with their n, columns = players, plus a stacked bar per row."""
    table = {_text(k): v for k, v in table.items()}
    players = _union(table.values())
    rows = []
    for c in vocab.ordered(table):
        shares = {_text(p): _float(v, f"cohort: modality_share[{c!r}][{_text(p)!r}]") for p, v in table[c].items()}
        segs = [
            {"player": p, "width": _percent(shares.get(p, 0.0)), "seg": j % 6, "text": _num(shares.get(p))}
            for j, p in enumerate(players)
        ]
        rows.append({"label": vocab.row_label(c), "n": _count(counts, c), "summary": c == ALL_KEY, "segs": segs})
    return {"columns": [{"name": p, "seg": j % 6} for j, p in enumerate(players)], "rows": rows}


def _faith_table(rows: Sequence[Any]) -> dict:
    """Mean of each faithfulness measure for the CAM and each baseline (columns = the baselines seen)."""
    for j, row in enumerate(rows):
        if not isinstance(row, FaithfulnessRow):
            raise DataError(f"cohort: faithfulness[{j}] must be a FaithfulnessRow, got {type(row).__name__}")
    names = _union(r.baselines for r in rows)
    return {
        "columns": [BASELINE_LABELS.get(n, n) for n in names],
        "rows": [
            {
                "metric": _text(r.metric),
                "cam": _num(r.cam),
                "baselines": [_num(r.baselines.get(n)) for n in names],
                "note": _text(r.note),
            }
            for r in rows
        ],
    }


def _comparison_row(row: Any, j: int) -> dict:
    """CAM minus one baseline on one measure: paired mean difference, its CI and the verdict."""
    if not isinstance(row, PairedComparison):
        raise DataError(f"cohort: comparisons[{j}] must be a PairedComparison, got {type(row).__name__}")
    return {
        "metric": _text(row.metric),
        "baseline": BASELINE_LABELS.get(row.baseline, _text(row.baseline)),
        "n": str(row.n),
        "cam": _num(row.cam),
        "other": _num(row.baseline_value),
        "diff": _num(row.diff, signed=True),
        "ci": f"[{_num(row.ci_low, signed=True)}, {_num(row.ci_high, signed=True)}]",
        "verdict": _text(row.verdict),
        "css": {"better": "ok", "worse": "bad verdict-worse"}.get(row.verdict, "muted"),
    }


def _stage_row(stage: Any) -> dict:
    """One randomisation stage: mean Spearman and SSIM over the valid cases, the invalid ones, the verdict."""
    if not isinstance(stage, StageResult):
        raise DataError(f"cohort: randomisation stages must be StageResult, got {type(stage).__name__}")
    return {
        "stage": _text(stage.stage),
        "spearman": _num(stage.spearman, signed=True),
        "ssim": _num(stage.ssim, signed=True),
        "valid": f"{stage.n_valid} of {len(stage.cases)}",
        "invalid": stage.reasons() or "\u2014",
        "verdict": stage.verdict,
        "css": {"changed": "ok", "unchanged": "bad", "invalid": "bad"}.get(stage.verdict, "muted"),
    }
