"""How many deletion / insertion steps the faithfulness table needs: AUCs and verdicts at fewer steps
against today's 10-step curves, on the same cases, maps and model.

Usage:
    python -m multimodal_lesion.bench.faithfulness_steps --run runs/frozen150 [--data $MMLESION_HAM10000] \\
        [--n 100] [--steps 10 5 4] [--json steps.json]

Explains ``--n`` test cases as ``mmlesion explain`` selects them (the same CAMs, baseline maps and lesion
masks), draws every deletion and insertion curve at each ``--steps`` (the first is the reference) through
the batched pipeline (ROAD only with ``--road``: the steps do not change it), and prints per map and curve
the mean AUC, the change of the mean and the largest per-case change against the reference, and every
paired verdict (better / tie / worse) with its CI. Seconds of each faithfulness pass are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from ..config import replace
from ..data.constants import DATA_ENV
from ..explain.faithfulness import MAP_NAMES, baseline_maps, compare_to_baselines
from ..explain.gradcam import layer_geometry
from ..explain.pipeline import (
    case_predictor,
    compute_cams,
    faithfulness,
    lesion_mask,
    load_cases,
    select_cases,
    training_masks,
)
from ..runs import load_run

CURVES = ("deletion_auc", "insertion_auc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", default=os.environ.get(DATA_ENV))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 5])
    parser.add_argument("--json", default="")
    parser.add_argument("--road", action="store_true", help="also draw ROAD (the steps do not change it)")
    args = parser.parse_args()
    run = load_run(args.run, args.data)
    cfg = run.inputs.cfg.explain
    rows, why = select_cases(run, "test", None, args.n, cfg.seed)
    batch = load_cases(run, rows, why)
    cams = compute_cams(run, batch.images, batch.meta, batch.targets).maps
    masks = [lesion_mask(run.inputs, int(r)) for r in batch.rows]
    geometry = layer_geometry(
        run.inputs.model, cfg.target_layer or None, run.inputs.cfg.data.image_size, batch.meta[:1]
    )
    priors = baseline_maps(training_masks(run.inputs, cfg.prior_masks, cfg.seed), geometry.stride)
    predict = case_predictor(run)
    reports, seconds = {}, {}
    for steps in args.steps:
        chosen = {"steps": steps, "faithfulness_cases": len(rows), **({} if args.road else {"road_percentiles": []})}
        run.inputs.cfg = replace(run.inputs.cfg, explain=chosen)
        start = time.perf_counter()
        reports[steps] = faithfulness(run, batch, cams, masks, priors, predict)
        seconds[steps] = time.perf_counter() - start
    summary = summarise(reports, args.steps, cfg.bootstrap, cfg.seed)
    summary["seconds"] = seconds
    summary["cases"] = len(rows)
    print(json.dumps({"seconds": seconds, "cases": len(rows)}))
    print_tables(summary, args.steps)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)


def summarise(reports: dict, all_steps: list[int], n_boot: int, seed: int) -> dict:
    """Per steps: mean AUC per map and curve, its change against the reference, the largest per-case change,
    and the verdicts of the paired comparisons."""
    ref = all_steps[0]
    out: dict = {"auc": {}, "verdicts": {}}
    for steps in all_steps:
        rows = []
        for name in MAP_NAMES:
            for curve in CURVES:
                values = np.array([r[name][curve] for r in reports[steps] if name in r])
                base = np.array([r[name][curve] for r in reports[ref] if name in r])
                rows.append(
                    {
                        "map": name,
                        "curve": curve,
                        "mean": float(values.mean()),
                        "mean_change": float(values.mean() - base.mean()),
                        "max_case_change": float(np.abs(values - base).max()),
                        "cases_over_0.01": int((np.abs(values - base) >= 0.01).sum()),
                    }
                )
        out["auc"][steps] = rows
        out["verdicts"][steps] = [
            {
                "metric": c.metric,
                "baseline": c.baseline,
                "diff": c.diff,
                "ci": [c.ci_low, c.ci_high],
                "verdict": c.verdict,
            }
            for c in compare_to_baselines(reports[steps], n_boot=n_boot, seed=seed)
        ]
    return out


def print_tables(summary: dict, all_steps: list[int]) -> None:
    ref = all_steps[0]
    print(
        f"\n| steps | map | curve | mean AUC | change of the mean vs {ref} | largest per-case change | cases >= 0.01 |"
    )
    print("|---|---|---|---|---|---|---|")
    for steps in all_steps:
        for r in summary["auc"][steps]:
            print(
                f"| {steps} | {r['map']} | {r['curve']} | {r['mean']:.3f} | {r['mean_change']:+.4f} | "
                f"{r['max_case_change']:.4f} | {r['cases_over_0.01']} |"
            )
    print(f"\n| measure | baseline | {' | '.join(f'{s} steps' for s in all_steps)} |")
    print("|---|---|" + "---|" * len(all_steps))
    for i, v in enumerate(summary["verdicts"][ref]):
        cells = []
        for steps in all_steps:
            w = summary["verdicts"][steps][i]
            cells.append(f"{w['diff']:+.3f} [{w['ci'][0]:+.3f}, {w['ci'][1]:+.3f}] {w['verdict']}")
        print(f"| {v['metric']} | {v['baseline']} | {' | '.join(cells)} |")
    same = all(
        [v["verdict"] for v in summary["verdicts"][s]] == [v["verdict"] for v in summary["verdicts"][ref]]
        for s in all_steps
    )
    print(f"\nevery verdict the same at every step count: {same}")


if __name__ == "__main__":
    main()
