"""The real-data ablation of the README: 5 models + gradient boosting, 5 lesion-grouped folds x 3 seeds.

Usage:
    python experiments/real_ablation.py --data /path/to/HAM10000 [--out runs/ablation] [--set section.key=value ...]

Same as `mmlesion ablate --config experiments/ablation.toml --data DIR --out DIR`; prints the
summary table and how long the embedding pass and the cells took. Re-running it resumes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multimodal_lesion.ablation import run_ablation
from multimodal_lesion.config import load_config, replace
from multimodal_lesion.io import read_json

CONFIG = Path(__file__).with_name("ablation.toml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="HAM10000 root")
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = replace(load_config(CONFIG, args.overrides), data={"root": args.data})
    paths = run_ablation(cfg, args.out)
    print(paths["summary_md"].read_text())
    print("timing:", read_json(Path(args.out) / "timing.json"))


if __name__ == "__main__":
    main()
