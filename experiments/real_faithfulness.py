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

from multimodal_lesion.config import load_config, parse_overrides
from multimodal_lesion.data.constants import DATA_ENV
from multimodal_lesion.errors import ConfigError
from multimodal_lesion.io import output_folder
from multimodal_lesion.workflows import explain_run


def settings(n: int, randomisation_cases: int, pairs: list[str]) -> dict:
    """explain.* settings: every case gets the faithfulness measures; ``--set`` pairs last."""
    load_config(None, pairs)  # types and ranges, naming the pair
    extra = parse_overrides(pairs)
    if set(extra) - {"explain"}:
        raise ConfigError("--set: only explain.* settings apply to a trained run")
    return {"faithfulness_cases": n, "randomisation_cases": randomisation_cases, **extra.get("explain", {})}


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
        with output_folder(out):
            index = explain_run(run, out, data=args.data, n=args.n, settings=chosen)
        print(f"\n## {run.name}: {args.n} test cases ({time.perf_counter() - start:.0f} s), report {index}\n")
        print((out / "faithfulness.md").read_text())
        print((out / "randomisation.md").read_text())


if __name__ == "__main__":
    main()
