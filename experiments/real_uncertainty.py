"""When not to trust a prediction, on the real data: the README's missing-metadata, conformal, deferral and
subgroup tables.

Usage:
    python experiments/real_uncertainty.py --data /path/to/HAM10000 [--out runs/uncertainty] [--set key=value ...]

Trains image_only and the three fusion models on the frozen real-data preset
(the ``real_frozen`` preset, one lesion-grouped split), once as before (no metadata dropout)
and once with metadata dropout (``train.meta_dropout`` and ``train.meta_dropout_all``), evaluates each on
the test split (``mmlesion train`` does) and writes ``uncertainty.md`` with the tables. Each run is an
ordinary run folder (``OUT/<setting>/<model>``); a finished one is reused when the script runs again.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import multimodal_lesion as mml

PRESET = "real_frozen"
MODELS = ("image_only", "concat", "gated", "film")
SETTINGS = {
    "before": {"meta_dropout": 0.0, "meta_dropout_all": 0.0},
    "dropout": {"meta_dropout": 0.1, "meta_dropout_all": 0.1},
    "dropout_all_0.3": {"meta_dropout": 0.1, "meta_dropout_all": 0.3},
}


def run(data: str, out: Path, overrides: list[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """Train (or reuse) every model under every setting; returns their metrics.json by (setting, model)."""
    metrics = {}
    for setting, train in SETTINGS.items():
        for model in MODELS:
            folder = out / setting / model
            if (folder / "metrics.json").is_file():
                metrics[setting, model] = mml.load_run(folder).metrics.to_dict()
                continue
            cfg = mml.replace(mml.load_config(PRESET, overrides), model={"name": model}, train=train)
            metrics[setting, model] = mml.train(cfg, data, out=folder, overwrite=True, show=False).metrics.to_dict()
            print(f"{setting}/{model}: done")
    return metrics


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def missing_table(metrics: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Balanced accuracy (balanced decision) with metadata removed, per fusion model and setting, vs image_only."""
    base = metrics["before", "image_only"]["test"]["balanced"]["balanced_accuracy"]
    variants = [v for v in metrics["before", "concat"]["test"]["missing_metadata"] if "/" in v or v == "full"]
    lines = [
        f"Test balanced accuracy (balanced decision); image_only: {base:.3f}.",
        "",
        _row(["model", "training", *variants]),
        _row(["---"] * (len(variants) + 2)),
    ]
    for (setting, model), m in metrics.items():
        table = m["test"]["missing_metadata"]
        if table:
            lines.append(_row([model, setting, *(f"{table[v]['balanced_accuracy']:.3f}" for v in variants)]))
    n = metrics["before", "concat"]["test"]["missing_metadata"]
    return [*lines, "", f"({n['n_images']} test images, {n['n_lesions']} lesions.)"]


def conformal_table(m: dict[str, Any], model: str) -> list[str]:
    """Coverage (overall, per class, worst class) and mean set size at each level."""
    c = m["test"]["uncertainty"]["conformal"]
    levels = [k for k in c if k[0].isdigit()]
    classes = list(c[levels[0]]["per_class"])
    lines = [
        f"{model}: {c['score'].upper()} sets, class-conditional={c['class_conditional']}, calibrated on val.",
        "",
        _row(
            ["target", "coverage", "mean set size", *(f"{k} (n={c[levels[0]]['per_class'][k]['n']})" for k in classes)]
        ),
        _row(["---"] * (len(classes) + 3)),
    ]
    for lv in levels:
        s = c[lv]
        per = [f"{s['per_class'][k]['coverage']:.2f}" for k in classes]
        lines.append(_row([lv, f"{s['coverage']:.3f}", f"{s['mean_size']:.2f}", *per]))
    return lines


def deferral_lines(m: dict[str, Any], model: str) -> list[str]:
    """AURC, melanoma sensitivity when deferring, and the triage threshold."""
    u = m["test"]["uncertainty"]
    rc, t = u["risk_coverage"], u["key_triage"]
    lines = [
        f"{model}: AURC {rc['aurc']:.4f} (oracle {rc['aurc_oracle']:.4f}, excess {rc['e_aurc']:.4f}).",
        "",
        _row(["deferred", "accuracy kept", "melanoma sensitivity (kept)", "melanomas deferred"]),
        _row(["---"] * 4),
    ]
    for share, d in u["deferral"].items():
        lines.append(
            _row([share, f"{d['accuracy_kept']:.3f}", f"{d['key_sensitivity']:.3f}", f"{d['key_deferred']:.3f}"])
        )
    return [
        *lines,
        "",
        f"Triage: refer p(mel) >= {t['threshold']:.3f} (fitted on val for sensitivity {t['target_sensitivity']:.2f}): "
        f"test sensitivity {t['sensitivity']:.3f}, specificity {t['specificity']:.3f}, {t['referred']:.1%} referred "
        f"({t['n_key_test']} test melanomas).",
    ]


def audit_table(m: dict[str, Any], model: str) -> list[str]:
    """Per attribute value: lesions, balanced accuracy, melanoma sensitivity, ECE; then the largest gaps."""
    lines = [
        f"{model}, test split.",
        "",
        _row(["attribute", "value", "lesions", "BA", "mel. sens.", "ECE"]),
        _row(["---"] * 6),
    ]
    gaps = []
    for attr, a in m["test"]["subgroups"].items():
        for value, g in a["groups"].items():
            flag = " (small)" if g["too_small"] else ""
            lines.append(
                _row(
                    [
                        attr,
                        value + flag,
                        str(g["n_lesions"]),
                        f"{g['balanced_accuracy']:.3f}",
                        f"{g['key_sensitivity']:.3f}",
                        f"{g['ece']:.3f}",
                    ]
                )
            )
        for metric in ("balanced_accuracy", "ece"):
            gap = a["gaps"][metric]
            lo, hi = gap["ci"]
            gaps.append(f"{attr} {metric}: {gap['gap']:.3f} [{lo:.3f}, {hi:.3f}] ({' vs '.join(gap['between'])})")
    return [
        *lines,
        "",
        "Largest gaps (groups with >= 30 lesions, 95% lesion-bootstrap CI):",
        "",
        *(f"- {g}" for g in gaps),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="HAM10000 root")
    parser.add_argument("--out", type=Path, default=Path("runs/uncertainty"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    metrics = run(args.data, args.out, args.overrides)
    fusion = [m for m in MODELS if m != "image_only"]
    best = max(fusion, key=lambda m: metrics["dropout", m]["test"]["balanced"]["balanced_accuracy"])
    chosen = metrics["dropout", best]
    text = [
        "## Missing metadata",
        "",
        *missing_table(metrics),
        "",
        "## Conformal prediction sets",
        "",
        *conformal_table(chosen, best),
        "",
        "## Selective prediction",
        "",
        *deferral_lines(chosen, best),
        "",
        "## Subgroup audit",
        "",
        *audit_table(chosen, best),
    ]
    (args.out / "uncertainty.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
