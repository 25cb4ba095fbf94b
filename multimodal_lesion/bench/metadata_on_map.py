"""What the patient's metadata does to the Grad-CAM map, measured over test cases of trained runs.

Usage:
    python -m multimodal_lesion.bench.metadata_on_map RUN [RUN ...] [--cases 100] [--seed 0] [--resamples 1000]
        [--data /path/to/HAM10000] [--out metadata_on_map.json]

For each run folder: ``--cases`` test cases drawn at random (seeded), each explained class the one the run
predicts with the case's metadata; the run's Grad-CAM (its ``explain`` method, layer, flips and temperature)
with the case's metadata and with every patient feature absent (the encoder's missing row), and the
Spearman rank correlation of the two maps over pixels (``explain.metadata_effect``). Prints one table row
per run: the fusion kind, the mean correlation with its lesion-bootstrap 95% interval (every image of a
drawn lesion together), the share of cases whose map moved (correlation < 0.99), and how many cases and
lesions; the per-class means and every case's value go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from multimodal_lesion.explain.metadata_effect import metadata_effect
from multimodal_lesion.explain.pipeline import cam_setup, load_cases
from multimodal_lesion.runs import load_run

MOVED = 0.99  # a correlation below this counts as a map the metadata moved


def lesion_bootstrap(values: np.ndarray, lesions: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values`` over lesions drawn with replacement."""
    rng = np.random.default_rng(seed)
    codes, index = np.unique(lesions, return_inverse=True)
    sums = np.bincount(index, weights=values, minlength=len(codes))
    counts = np.bincount(index, minlength=len(codes))
    draws = rng.integers(0, len(codes), size=(resamples, len(codes)))
    means = sums[draws].sum(1) / counts[draws].sum(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def measure(run_dir: Path, data: str | None, cases: int, seed: int, resamples: int) -> dict:
    """The metadata effect on ``cases`` seeded test cases of one run, with its summary."""
    started = time.perf_counter()
    run = load_run(run_dir, data)
    inputs, setup = run.inputs, cam_setup(run)
    test = inputs.indices("test")
    rows = np.sort(np.random.default_rng(seed).choice(test, size=min(cases, len(test)), replace=False))
    batch = load_cases(run, rows, ["random"] * len(rows))
    with setup.explainer(inputs.model) as cam:
        effect = metadata_effect(cam, batch.images, batch.meta, inputs.encoder.missing_row(), batch.targets)
    meta = inputs.dataset.metadata.iloc[rows]
    rho, lesions = effect.spearman, meta["lesion_id"].to_numpy()
    valid = np.isfinite(rho)
    classes = [inputs.schema.classes[t] for t in batch.targets]
    per_class = {c: float(np.nanmean(rho[[k == c for k in classes]])) for c in sorted(set(classes))}
    return {
        "run": str(run_dir),
        "model": inputs.cfg.model.name,
        "fusion": effect.kind,
        "cases": len(rows),
        "valid": int(valid.sum()),
        "lesions": int(meta["lesion_id"].nunique()),
        "mean_spearman": float(rho[valid].mean()),
        "ci95": lesion_bootstrap(rho[valid], lesions[valid], resamples, seed),
        "moved_share": float((rho[valid] < MOVED).mean()),
        "mean_abs_difference": float(np.abs(effect.difference).mean()),
        "per_class": per_class,
        "seconds": time.perf_counter() - started,
        "image_ids": meta["image_id"].tolist(),
        "spearman": [None if not np.isfinite(v) else float(v) for v in rho],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--cases", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--data", default=None, help="data root, when not the run's own")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_grad_enabled(True)
    results = []
    print("| model | fusion | mean rank correlation [95% CI] | maps moved (< 0.99) | cases / lesions | seconds |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        r = measure(run, args.data, args.cases, args.seed, args.resamples)
        results.append(r)
        low, high = r["ci95"]
        print(
            f"| {r['model']} | {r['fusion']} | {r['mean_spearman']:.3f} [{low:.3f}, {high:.3f}] | "
            f"{r['moved_share']:.0%} | {r['valid']} / {r['lesions']} | {r['seconds']:.0f} |",
            flush=True,
        )
        if args.out is not None:  # after each run: a cut-short measurement keeps what it finished
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
