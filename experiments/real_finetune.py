"""End-to-end fine-tuning of the README: `image_only` and `concat` on one lesion-grouped split.

Usage:
    python experiments/real_finetune.py --data /path/to/HAM10000 [--config PRESET|FILE] [--out runs]
                                        [--models image_only concat] [--set train.device="cuda" ...]

Trains each model with the ``real_end2end_cpu`` preset (150x200, the README's recipe: about
66 minutes per model on 2 CPU cores, 2 minutes on an H100) or another ``--config`` (``real_end2end``:
240x320, 16 epochs, for a GPU) and prints the test split's balanced accuracy (temperature-scaled arg-max and
the balanced decision fitted on val), macro AUROC and melanoma AUROC with its image and lesion counts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import multimodal_lesion as mml

CONFIG = "real_end2end_cpu"  # a preset of the package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="HAM10000 root")
    parser.add_argument("--config", default=str(CONFIG), help="preset or experiment file (default: %(default)s)")
    parser.add_argument("--out", default="runs")
    parser.add_argument("--models", nargs="+", default=["image_only", "concat"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--overwrite", action="store_true", help="replace runs already in --out")
    args = parser.parse_args()
    for name in args.models:
        start = time.perf_counter()
        cfg = mml.replace(mml.load_config(args.config, args.overrides), model={"name": name})
        run = mml.train(cfg, args.data, out=Path(args.out) / f"e2e_{name}", overwrite=args.overwrite)
        metrics = run.metrics["test"]
        test, balanced = metrics["calibrated"], metrics["balanced"]["balanced_accuracy"]
        print(
            f"{name}: balanced accuracy {test['balanced_accuracy']:.3f} ({balanced:.3f} with the balanced "
            f"decision), macro AUROC {test['macro_auroc']:.3f}, "
            f"melanoma AUROC {test['melanoma_auroc']:.3f} on {test['n_images']} images / {test['n_lesions']} "
            f"lesions ({time.perf_counter() - start:.0f} s)"
        )


if __name__ == "__main__":
    main()
