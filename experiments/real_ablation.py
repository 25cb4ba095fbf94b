"""The real-data ablation of the README: 5 models + gradient boosting, 5 lesion-grouped folds x 3 seeds.

Usage:
    python experiments/real_ablation.py --data /path/to/HAM10000 [--out runs/ablation] [--set section.key=value ...]

Same as `mmlesion ablate --config ablation --data DIR --out DIR`; prints the
summary table and how long the embedding pass and the cells took. Re-running it resumes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import multimodal_lesion as mml

CONFIG = "ablation"  # a preset of the package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="HAM10000 root")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    result = mml.ablate(mml.load_config(CONFIG, args.overrides), data=args.data, out=args.out)
    print(result.summary)
    print("timing:", json.loads((Path(args.out) / "timing.json").read_text()))


if __name__ == "__main__":
    main()
