"""How many deletion / insertion steps the faithfulness table needs: AUCs and verdicts at fewer steps
against today's 10-step curves, on the same cases, maps and model.

Usage:
    python -m multimodal_lesion.bench.faithfulness_steps --run runs/frozen150 [--data $MMLESION_HAM10000] \\
        [--n 100] [--steps 10 5 4] [--road] [--reference] [--json steps.json]

Explains ``--n`` test cases as ``mmlesion explain`` selects them (the same CAMs, baseline maps and lesion
masks), draws every deletion and insertion curve at each ``--steps`` (the first is the reference) through
the batched pipeline (ROAD only with ``--road``: the steps do not change it), and prints per map and curve
the mean AUC, the change of the mean and the largest per-case change against the reference, and every
paired verdict (better / tie / worse) with its CI. Seconds of each faithfulness pass are printed too.

``--reference`` also measures every case the way the report did before the curves were batched: one
eager-torch forward per (case, map, curve) (:func:`~multimodal_lesion.explain.faithfulness.perturbation_curve`
with the case's metadata bound) and ROAD imputed by pytorch-grad-cam's own ``NoisyLinearImputer``, and
compares every verdict and value with the batched pass at the first ``--steps``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from ..config import replace
from ..data.constants import DATA_ENV
from ..explain.faithfulness import (
    MAP_NAMES,
    baseline_maps,
    compare_to_baselines,
    curve_auc,
    energy_inside,
    perturbation_curve,
    pointing_game,
    road_scores,
)
from ..explain.gradcam import layer_geometry, shown_view
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
    parser.add_argument("--reference", action="store_true", help="also one forward per curve, eager (implies --road)")
    args = parser.parse_args()
    args.road = args.road or args.reference
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
    if args.reference:
        run.inputs.cfg = replace(run.inputs.cfg, explain={"steps": args.steps[0], "faithfulness_cases": len(rows)})
        start = time.perf_counter()
        reference = reference_reports(run, batch, cams, masks, priors)
        seconds["reference"] = time.perf_counter() - start
        summary["reference"] = compare_reference(reports[args.steps[0]], reference, cfg.bootstrap, cfg.seed)
        print_reference(summary["reference"])
    summary["seconds"] = seconds
    summary["cases"] = len(rows)
    print(json.dumps({"seconds": seconds, "cases": len(rows)}))
    print_tables(summary, args.steps)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)


def reference_reports(run, batch, cams: np.ndarray, masks: list, priors) -> list[dict[str, dict[str, float]]]:
    """Every measure of every case as before the batching: per case, map and curve one eager forward of
    the curve's images, ROAD through pytorch-grad-cam's ``NoisyLinearImputer`` (one ``spsolve`` a mask)."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    from ..explain.pipeline import cam_setup

    cfg, setup, model = run.inputs.cfg.explain, cam_setup(run), run.inputs.model
    shape = (int(cams.shape[-2]), int(cams.shape[-1]))
    out = []
    model.eval()
    for i in range(len(batch.rows)):
        predict = shown_view(model, setup.flip_average, setup.temperature, batch.meta[i : i + 1])
        image, target = batch.images[i], batch.targets[i]
        maps = {"cam": cams[i], **priors.maps(shape, cfg.seed + i)}
        report: dict[str, dict[str, float]] = {}
        for name, sal in maps.items():
            sal = np.asarray(sal)
            report[name] = {
                f"{mode}_auc": curve_auc(perturbation_curve(predict, image, sal, target, mode=mode, steps=cfg.steps))
                for mode in ("deletion", "insertion")
            }
            if masks[i] is not None:
                report[name]["pointing_game"] = float(pointing_game(sal, masks[i]))
                report[name]["energy_inside"] = energy_inside(sal, masks[i])
        stacked = np.stack([np.asarray(m) for m in maps.values()])
        road = road_scores(predict, image, stacked, target, cfg.road_percentiles, cfg.seed, NoisyLinearImputer())
        for name, score in zip(maps, road, strict=True):
            report[name]["road"] = float(score)
        out.append(report)
        print(f"reference: case {i + 1}/{len(batch.rows)}", flush=True)
    return out


def compare_reference(batched: list, reference: list, n_boot: int, seed: int) -> dict:
    """The largest per-case difference of each measure and every verdict, batched against the reference."""
    largest = {
        f"{name} {metric}": float(
            np.nanmax([abs(b[name][metric] - r[name][metric]) for b, r in zip(batched, reference, strict=True)])
        )
        for name in reference[0]
        for metric in reference[0][name]
    }
    pairs = zip(
        compare_to_baselines(batched, n_boot=n_boot, seed=seed),
        compare_to_baselines(reference, n_boot=n_boot, seed=seed),
        strict=True,
    )
    verdicts = [
        {
            "metric": b.metric,
            "baseline": b.baseline,
            "batched": [b.diff, b.ci_low, b.ci_high, b.verdict],
            "reference": [r.diff, r.ci_low, r.ci_high, r.verdict],
        }
        for b, r in pairs
    ]
    return {"largest_case_difference": largest, "verdicts": verdicts}


def print_reference(comparison: dict) -> None:
    print("\n| measure | baseline | batched | one forward per curve, pytorch-grad-cam's ROAD imputer |")
    print("|---|---|---|---|")
    for v in comparison["verdicts"]:
        b, r = v["batched"], v["reference"]
        print(
            f"| {v['metric']} | {v['baseline']} | {b[0]:+.3f} [{b[1]:+.3f}, {b[2]:+.3f}] {b[3]} "
            f"| {r[0]:+.3f} [{r[1]:+.3f}, {r[2]:+.3f}] {r[3]} |"
        )
    same = all(v["batched"][3] == v["reference"][3] for v in comparison["verdicts"])
    print(f"\nevery verdict the same as one forward per curve: {same}")
    worst = max(comparison["largest_case_difference"].items(), key=lambda kv: kv[1])
    print(f"largest per-case difference of any measure: {worst[1]:.2e} ({worst[0]})")


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
