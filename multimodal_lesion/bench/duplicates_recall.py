"""Recall and precision of the near-duplicate search on HAM10000, against the ground truth there is.

Usage:
    python -m multimodal_lesion.bench.duplicates_recall --data $MMLESION_HAM10000 \
        --config real_frozen --set 'train.embed_backend="openvino"' \
        --truth ../shared/data/ham10000_duplicates --json duplicates_recall.json

Ground truth: every pair of images sharing a ``lesion_id`` is the same lesion; the 18 pairs of
Abhishek et al. (2025) are the same lesion under two ids; their 2 near-identical pairs of different
lesions must not be merged silently. The search runs once with pairs within a lesion allowed (each
image's ``--neighbours`` embedding neighbours, all verified by keypoints), and the figures are read
from that one table: recall among each image's top-5 candidates (by embedding similarity alone, and
by the score), recall and precision at each threshold. Precision counts a pair as right when it
shares a lesion_id or is one of the 18; a true duplicate no list has counts as wrong, so it is a floor.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import load_config
from ..data.reader import read_dataset
from ..runs.duplicates import THRESHOLDS, DuplicateSettings, candidate_pairs, dataset_side


def id_pairs(path: Path, position: dict[str, int]) -> set[frozenset[int]]:
    """A pairs CSV (``from_img, to_img``, ids with ``.jpg``) as sets of two row numbers."""
    table = pd.read_csv(path)
    return {
        frozenset((position[a.removesuffix(".jpg")], position[b.removesuffix(".jpg")]))
        for a, b in zip(table["from_img"], table["to_img"], strict=True)
    }


def same_lesion_pairs(lesions: pd.Series) -> set[frozenset[int]]:
    """Every pair of rows sharing a lesion id."""
    pairs: set[frozenset[int]] = set()
    for rows in lesions.groupby(lesions).indices.values():
        pairs |= {frozenset((int(a), int(b))) for k, a in enumerate(rows) for b in rows[k + 1 :]}
    return pairs


def top_k_found(frame: pd.DataFrame, column: str, k: int) -> set[frozenset[int]]:
    """Pairs among the ``k`` best (by ``column``) candidates of either of their images."""
    long = pd.concat([frame.assign(image=frame["i"]), frame.assign(image=frame["j"])], ignore_index=True).sort_values(
        column, ascending=False, kind="stable"
    )
    best = long.groupby("image").head(k)
    return {frozenset((int(a), int(b))) for a, b in zip(best["i"], best["j"], strict=True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--truth", required=True, help="folder of newly_discovered_duplicates.csv and near_duplicates_*.csv")
    p.add_argument("--neighbours", type=int, default=DuplicateSettings.neighbours)
    p.add_argument("--patient-neighbours", type=int, default=DuplicateSettings.patient_neighbours)
    p.add_argument("--keypoints", type=int, default=DuplicateSettings.keypoints)
    p.add_argument("--json")
    p.add_argument("--table", help="write every verified pair (i, j, similarity, inliers, score) here (CSV)")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    dataset = read_dataset(args.data)
    position = {v: k for k, v in enumerate(dataset.metadata["image_id"])}
    truth = Path(args.truth)
    missed = id_pairs(truth / "newly_discovered_duplicates.csv", position)
    different = id_pairs(truth / "near_duplicates_different_times.csv", position)
    same = same_lesion_pairs(dataset.metadata["lesion_id"])

    t0 = time.perf_counter()
    side = dataset_side(cfg, dataset)
    t1 = time.perf_counter()
    settings = DuplicateSettings(
        neighbours=args.neighbours,
        patient_neighbours=args.patient_neighbours,
        keypoints=args.keypoints,
        top=max(args.neighbours, args.patient_neighbours),
    )
    frame = candidate_pairs(side, None, settings, same_group=True)
    t2 = time.perf_counter()
    if args.table:
        frame[["i", "j", "similarity", "inliers", "same_patient", "score"]].to_csv(args.table, index=False)
    report = evaluate(frame, same, missed, different, dataset.metadata["lesion_id"].to_numpy())
    report["seconds"] = {"embeddings (cached)": round(t1 - t0, 1), "search": round(t2 - t1, 1)}
    report["images"], report["settings"] = len(dataset.metadata), dataclasses.asdict(settings)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


def evaluate(
    frame: pd.DataFrame,
    same: set[frozenset[int]],
    missed: set[frozenset[int]],
    different: set[frozenset[int]],
    lesions: np.ndarray,
) -> dict:
    """The figures of ``docs/duplicates.md`` from one verified candidate table."""
    pair = [frozenset((int(a), int(b))) for a, b in zip(frame["i"], frame["j"], strict=True)]
    frame = frame.assign(pair=pair)
    out: dict = {"same_lesion_pairs": len(same), "missed_pairs": len(missed)}
    for column in ("similarity", "score"):
        found = top_k_found(frame, column, 5)
        out[f"top5_by_{column}"] = {
            "same_lesion_recall": round(len(found & same) / len(same), 4),
            "missed_found": len(found & missed),
        }
    cross = frame[lesions[frame["i"]] != lesions[frame["j"]]]
    found_cross = top_k_found(cross, "score", 5)  # what the command lists: pairs of two lesions
    out["missed_found_top5_across_lesions"] = len(found_cross & missed)
    rows = []
    for threshold in THRESHOLDS:
        above = frame[frame["score"] >= threshold]
        above_cross = above[lesions[above["i"]] != lesions[above["j"]]]
        right = above["pair"].map(lambda q: q in same or q in missed)
        rows.append(
            {
                "threshold": threshold,
                "same_lesion_recall": round(float(above["pair"].isin(same).sum()) / len(same), 4),
                "missed_found": int(above["pair"].isin(missed).sum()),
                "pairs_above": len(above),
                "precision_floor": round(float(right.mean()), 4) if len(above) else None,
                "pairs_across_lesions": len(above_cross),
                "new_across_lesions": int((~above_cross["pair"].isin(missed | different)).sum()),
                "different_lesion_pairs_above": int(above["pair"].isin(different).sum()),
            }
        )
    out["thresholds"] = rows
    out["different_lesion_pairs"] = [
        {"similarity": round(float(r.similarity), 4), "inliers": int(r.inliers), "score": round(float(r.score), 4)}
        for r in frame[frame["pair"].isin(different)].itertuples()
    ]
    return out


if __name__ == "__main__":
    main()
