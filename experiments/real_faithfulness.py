"""Faithfulness of a run's Grad-CAM on real lesion masks: the README's verdict tables.

Usage:
    python experiments/real_faithfulness.py --run runs/e2e_concat [--run runs/frozen_concat ...] \\
        [--data $MMLESION_HAM10000] [--out runs/faithfulness] [--n 120] [--randomisation-cases 16] \\
        [--set explain.KEY=VALUE ...] [--overwrite]

For each run, explains ``--n`` test cases (default 120: a correct case per class, then the run's
errors and least confident cases) through ``mmlesion explain``'s own workflow, every one of them with
deletion, insertion, ROAD, pointing game and energy inside the real lesion mask, against the mean
training mask, a centre Gaussian fitted to it and a smooth random map (paired bootstrap CIs,
verdicts); the cascading randomisation and random-logit checks run on ``--randomisation-cases``.
Writes ``OUT/<run name>/`` (the HTML report, ``faithfulness.{csv,md}``, ``randomisation.{csv,md}``)
and prints the markdown tables. The data needs its lesion masks
(``HAM10000_segmentations_lesion_tschandl/``); cases without one get no localisation figures.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import multimodal_lesion as mml

DATA_ENV = "MMLESION_HAM10000"


def settings(n: int, randomisation_cases: int, pairs: list[str]) -> dict:
    """explain.* settings: every case gets the faithfulness measures; ``--set`` pairs last."""
    if any(not p.strip().startswith("explain.") for p in pairs):
        raise mml.ConfigError("--set: only explain.* settings apply to a trained run")
    given = mml.load_config(None, pairs).explain  # types and ranges, naming the pair
    extra = {p.partition("=")[0].strip().removeprefix("explain."): None for p in pairs}
    return {
        "faithfulness_cases": n,
        "randomisation_cases": randomisation_cases,
        **{k: getattr(given, k) for k in extra},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="a trained run folder; repeatable")
    parser.add_argument("--data", default=os.environ.get(DATA_ENV), help=f"HAM10000 root (default: ${DATA_ENV})")
    parser.add_argument("--out", default="runs/faithfulness")
    parser.add_argument("--n", type=int, default=120, help="test cases to explain (default: %(default)s)")
    parser.add_argument("--randomisation-cases", type=int, default=16)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--overwrite", action="store_true", help="replace reports already in --out")
    args = parser.parse_args()
    if not args.data:
        sys.exit(f"--data: give the HAM10000 root or set {DATA_ENV}")
    chosen = settings(args.n, args.randomisation_cases, args.overrides)
    for run in map(Path, args.run):
        out = Path(args.out) / run.name
        if out.exists() and args.overwrite:
            shutil.rmtree(out)
        start = time.perf_counter()
        report = mml.load_run(run).explain(args.n, out=out, data=args.data, settings=chosen, show=True)
        print(f"\n## {run.name}: {args.n} test cases ({time.perf_counter() - start:.0f} s), report {report.index}\n")
        print((out / "faithfulness.md").read_text())
        print((out / "randomisation.md").read_text())


if __name__ == "__main__":
    main()
