"""Lesion-bootstrap 95% intervals of a run's test metrics, and of the difference between two runs on the same split.

Usage:
    python experiments/lesion_bootstrap.py RUN [OTHER_RUN] [--resamples 1000] [--data /path/to/HAM10000]

Reads ``predictions_test.csv`` and ``splits.csv`` of each run folder (or, with ``--data``, each image's
lesion from the dataset's metadata CSV), resamples the test lesions with
replacement (all images of a drawn lesion together) and prints the arg-max balanced accuracy, macro AUROC and
melanoma AUROC with their percentile intervals; with a second run on the same split, the paired difference
(RUN minus OTHER_RUN, the same lesions drawn for both).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

import multimodal_lesion as mml


def load(run: Path, data: Path | None = None) -> pd.DataFrame:
    """The run's test predictions with each image's lesion (from ``data``'s metadata when given)."""
    preds = pd.read_csv(run / "predictions_test.csv")
    source = data / "HAM10000_metadata.csv" if data is not None else run / "splits.csv"
    lesions = pd.read_csv(source)[["image_id", "lesion_id"]]
    return preds.merge(lesions, on="image_id", how="left").sort_values("image_id").reset_index(drop=True)


def scores(frame: pd.DataFrame, weights: np.ndarray) -> np.ndarray:
    """(balanced accuracy, macro AUROC, melanoma AUROC) with each image counted ``weights`` times."""
    prob_cols = [c for c in frame.columns if c.startswith("p_")]
    classes = [c[2:] for c in prob_cols]
    y, p, w = frame["target"].to_numpy(), frame[prob_cols].to_numpy(), weights
    pred = np.array(classes)[p.argmax(1)]
    drawn = w > 0
    present = [i for i, c in enumerate(classes) if (y[drawn] == c).any()]
    macro = np.mean([roc_auc_score(y == classes[i], p[:, i], sample_weight=w) for i in present])
    mel = classes.index("mel")
    balanced = balanced_accuracy_score(y[drawn], pred[drawn], sample_weight=w[drawn])
    return np.array([balanced, macro, roc_auc_score(y == "mel", p[:, mel], sample_weight=w)])


def bootstrap(frames: list[pd.DataFrame], resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, runs, 3) metrics over lesion resamples, the same draw for every run."""
    _, draws = mml.group_draws(frames[0]["lesion_id"].to_numpy(), resamples, seed)
    return np.array([[scores(f, w) for f in frames] for w in draws])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="one or two run folders")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--data", type=Path, help="HAM10000 root (default: the lesions in each run's splits.csv)")
    args = parser.parse_args()
    frames = [load(r, args.data) for r in args.runs[:2]]
    if len(frames) == 2 and not frames[0]["image_id"].equals(frames[1]["image_id"]):
        raise SystemExit("the two runs have different test images: not the same split")
    boot = bootstrap(frames, args.resamples)
    names = ("balanced accuracy (arg-max)", "macro AUROC", "melanoma AUROC")
    n_lesions = frames[0]["lesion_id"].nunique()
    for r, run in enumerate(args.runs[:2]):
        point = scores(frames[r], np.ones(len(frames[r])))
        print(f"{run} (test: {len(frames[r])} images, {n_lesions} lesions)")
        for m, name in enumerate(names):
            low, high = np.quantile(boot[:, r, m], [0.025, 0.975])
            print(f"  {name}: {point[m]:.3f} [95% lesion-bootstrap CI {low:.3f}, {high:.3f}]")
    if len(frames) == 2:
        diff = scores(frames[0], np.ones(len(frames[0]))) - scores(frames[1], np.ones(len(frames[1])))
        for m, name in enumerate(names):
            low, high = np.quantile(boot[:, 0, m] - boot[:, 1, m], [0.025, 0.975])
            print(f"  difference in {name}: {diff[m]:+.3f} [{low:+.3f}, {high:+.3f}]")


if __name__ == "__main__":
    main()
