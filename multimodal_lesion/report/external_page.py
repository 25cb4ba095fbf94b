"""The page of an external evaluation: ``RUN/external/<name>/report.html``.

What a reader needs to judge a run on data it never saw, from that evaluation's ``metrics.json`` and
figures: the headline scores, predicted against true prevalence per class, the confusion matrix, the
reliability curve on OTHER, empty prediction sets (no class plausible: refer), the shift alarm (how far
the images sit from the training images), a clinic's known prior and the EM estimate with their effect,
and a breakdown by OTHER's source column. One self-contained file like the explanation report (figures
as data URIs, inline CSS, no script, no network), rendered with autoescape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .html import _common, _data_uri, _environment, _num, _text, _write

#: The figures of the page, in order, with their captions.
FIGURES = {
    "confusion": ("confusion_external.png", "Confusion matrix on OTHER (rows: true class; calibrated arg-max)."),
    "reliability": (
        "reliability_external.png",
        "Reliability on OTHER: the calibrated confidence against the observed accuracy per bin (the run's "
        "temperature, fitted on its own validation split).",
    ),
}


def write_external_page(folder: str | Path, metrics: Mapping[str, Any], title: str) -> Path:
    """Write ``report.html`` of the external evaluation in ``folder`` (its ``metrics.json`` as ``metrics``)."""
    folder = Path(folder)
    view = external_view(metrics, folder, title)
    page = _environment().get_template("external.html").render(view=view, **_common())
    out = folder / "report.html"
    _write(out, page)
    return out


def external_view(metrics: Mapping[str, Any], folder: Path, title: str) -> dict[str, Any]:
    """Everything the template shows, as plain strings and lists."""
    score = metrics["external"]
    return {
        "title": _text(title),
        "headline": _headline(score, metrics),
        "prevalence": _prevalence_rows(metrics.get("prevalence", [])),
        "confusion": _confusion(score["calibrated"], metrics),
        "figures": [
            {"name": name, "caption": caption, "src": _data_uri(folder / "figures" / file, f"{folder}: {name}")}
            for name, (file, caption) in FIGURES.items()
            if (folder / "figures" / file).is_file()
        ],
        "empty_sets": _empty_rows(metrics.get("empty_sets", {})),
        "empty_meaning": _text(metrics.get("empty_sets", {}).get("meaning", "")),
        "shift": _shift(metrics.get("shift")),
        "prior": _prior(metrics.get("prior")),
        "estimated_prior": _prior(metrics.get("estimated_prior")),
        "by_source": _source_rows(metrics.get("by_source")),
        "notes": [_text(n) for n in metrics.get("notes", [])],
        "facts": [
            (k, _text(metrics.get(k)))
            for k in ("data_root", "schema", "run_schema", "key_vs_rest", "image_fit", "temperature", "n_listed")
        ],
    }


def _headline(score: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The scores that open the page: counts, balanced accuracy, AUROC (with its CI when key vs rest), ECE."""
    cal, bal = score["calibrated"], score["balanced"]
    rows = [
        ("images", _num(cal.get("n_images"))),
        (_text(metrics.get("groups", "lesions")), _num(score.get("n_patients") or cal.get("n_lesions"))),
        ("balanced accuracy (calibrated arg-max)", _with_ci(cal)),
        ("balanced accuracy (balanced decision)", _with_ci(bal)),
        ("ECE (calibrated)", _num(cal.get("ece"))),
    ]
    ci = score.get("key_vs_rest", {}).get("auroc_ci")
    if ci:
        rows.insert(
            2,
            (
                f"{_text(metrics.get('key_class'))} vs rest AUROC",
                f"{_num(ci['auroc'])} [{_num(ci['ci_low'])}, {_num(ci['ci_high'])}] (95% CI over "
                f"{ci.get('n_groups')} {_text(ci.get('grouped_by'))}s)",
            ),
        )
    else:
        rows.insert(2, ("macro AUROC", _num(cal.get("macro_auroc"))))
    return rows


def _with_ci(decision: Mapping[str, Any]) -> str:
    """'0.531 [0.482, 0.580] (95% CI over 212 patients)', or the bare figure where no interval was computed."""
    ci = decision.get("balanced_accuracy_ci")
    figure = _num(decision.get("balanced_accuracy"))
    if not ci:
        return figure
    return (
        f"{figure} [{_num(ci['ci_low'])}, {_num(ci['ci_high'])}] ({ci.get('ci', 0.95):.0%} CI over "
        f"{ci.get('n_groups')} {_text(ci.get('grouped_by', 'lesion'))}s)"
    )


def _share(share: Any, n: Any) -> str:
    return f"{float(share):.1%} ({int(n)})"


def _prevalence_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Per class: true share, decided shares (calibrated arg-max and the balanced decision), mean probability."""
    return [
        {
            "class": _text(r["class"]),
            "true": _share(r["true"], r["n_true"]),
            "predicted": _share(r["predicted"], r["n_predicted"]),
            "balanced": _share(r["balanced_decision"], r["n_balanced_decision"]),
            "mean_probability": f"{float(r['mean_probability']):.1%}",
            "over": "bad" if r["n_predicted"] > 1.5 * max(r["n_true"], 1) else "",
        }
        for r in rows
    ]


def _confusion(cal: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The confusion matrix as a table: rows true class, columns predicted."""
    matrix = cal.get("confusion_matrix", [])
    classes = [r["class"] for r in metrics.get("prevalence", [])] or [str(i) for i in range(len(matrix))]
    return {"classes": [_text(c) for c in classes], "rows": [[str(int(v)) for v in row] for row in matrix]}


def _empty_rows(empty: Mapping[str, Any]) -> list[dict[str, str]]:
    """Per level: empty sets among all images, and among those the shift alarm flags and the others."""
    rows = []
    for level, entry in empty.items():
        if not isinstance(entry, Mapping):
            continue
        rows.append(
            {
                "level": f"{float(level):.0%}",
                "all": _share(entry["empty"], entry["n_empty"]),
                "flagged": _share_of(entry, "flagged"),
                "not_flagged": _share_of(entry, "not_flagged"),
            }
        )
    return rows


def _share_of(entry: Mapping[str, Any], group: str) -> str:
    """The share of empty sets among a group of images (``flagged`` or ``not_flagged``), or a dash."""
    n = entry.get(f"n_{group}", 0)
    return f"{float(entry[f'empty_{group}']):.1%} of {n}" if n else "\u2014"


def _shift(shift: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The shift alarm's lines; None when it was not computed."""
    if not shift:
        return None
    test = shift["dataset_test"]
    return {
        "fires": test["p_value"] <= 0.01,
        "rows": [
            (
                "images flagged out of distribution",
                f"{shift['n_flagged']} of {shift['n_images']} ({shift['flag_rate']:.1%})",
            ),
            ("level (expected false-alarm rate on images like the run's)", f"{shift['level']:g}"),
            ("the run's own test images flagged", f"{shift['test_flag_rate']:.1%} of {shift['n_test']}"),
            ("AUROC of the score, OTHER against the run's test images", _num(shift["auroc_against_test"])),
            (
                "median kNN distance: OTHER / validation",
                f"{shift['median_score']:.3f} / {shift['median_val_score']:.3f}",
            ),
            (
                "dataset test: MMD against the validation images",
                f"MMD² {test['mmd2']:.4f}, p = {test['p_value']:.3g} ({test['n_permutations']} permutations; "
                f"{test['n_used'][0]} and {test['n_used'][1]} images)",
            ),
            (
                "reference",
                f"k = {shift['k']} nearest of {shift['n_train']} training images; {shift['n_val']} validation images",
            ),
        ],
    }


def _prior(prior: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A given or estimated prior: its values against the training prior, and its effect with 95% CIs."""
    if not prior:
        return None
    values = prior.get("given") or prior.get("estimated") or {}
    training = prior.get("training", {})
    return {
        "values": [
            (_text(c), f"{float(training.get(c, float('nan'))):.2%}", f"{float(v):.2%}") for c, v in values.items()
        ],
        "effect": [
            (
                _text(name),
                _num(e["first"]),
                _num(e["second"]),
                f"{e['difference']:+.4f} [{e['ci_low']:+.4f}, {e['ci_high']:+.4f}]",
            )
            for name, e in prior.get("effect", {}).items()
        ],
        "warning": _text(prior.get("warning") or ""),
    }


def _source_rows(rows: Sequence[Mapping[str, Any]] | None) -> list[dict[str, str]] | None:
    """Per source: images, the key class's true and predicted share and AUROC, flagged and empty shares."""
    if rows is None:
        return None
    return [
        {
            "source": _text(r["source"]),
            "n": str(r["n_images"]),
            "key_true": f"{float(r['key_true']):.1%}",
            "key_predicted": f"{float(r['key_predicted']):.1%}",
            "auroc": _num(r["key_auroc"]),
            "flagged": f"{float(r['flagged']):.1%}" if "flagged" in r else "\u2014",
            "empty": next((f"{float(v):.1%}" for k, v in r.items() if str(k).startswith("empty_")), "\u2014"),
        }
        for r in rows
    ]
