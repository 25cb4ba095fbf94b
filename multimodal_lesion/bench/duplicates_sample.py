"""A quick estimate of the near-duplicate search's recall on HAM10000, from a sample of ground-truth pairs.

Usage:
    python -m multimodal_lesion.bench.duplicates_sample --data $MMLESION_HAM10000 \
        --config real_frozen --set 'train.embed_backend="openvino"' \
        --truth ../shared/data/ham10000_duplicates --pairs 80 --seed 0

Runs the search of ``mmlesion duplicates`` (same neighbours, same keypoint check, same score) for the
images of a few ground-truth pairs only (each against all 10,015), so it takes about a minute where the
full search (``duplicates_recall.py``) takes many: the 18 missed pairs, the 2 near-identical pairs of
different lesions, and ``--pairs`` random pairs of images sharing a ``lesion_id`` (looked for with
pairs within a lesion allowed). Prints, per set: how many pairs are among the candidates, how many
among the top 5 of either image (by similarity alone, and by the score), and for each threshold how
many of the set and how many candidate pairs of two lesions (none of the lists) score at or above it.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from ..config import load_config
from ..data.reader import read_dataset
from ..runs.duplicates import (
    THRESHOLDS,
    DuplicateSettings,
    PatientMatch,
    all_keypoints,
    dataset_side,
    pair_score,
    retrieval_space,
    verify_pairs,
)


def pairs_file(path: str, position: dict[str, int]) -> list[tuple[int, int]]:
    table = pd.read_csv(path)
    return [
        (position[a.removesuffix(".jpg")], position[b.removesuffix(".jpg")])
        for a, b in zip(table.from_img, table.to_img, strict=True)
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--truth", required=True)
    p.add_argument("--pairs", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--neighbours", type=int, default=DuplicateSettings.neighbours)
    p.add_argument("--patient-neighbours", type=int, default=DuplicateSettings.patient_neighbours)
    p.add_argument("--keypoints", type=int, default=DuplicateSettings.keypoints)
    args = p.parse_args()
    settings = DuplicateSettings(
        neighbours=args.neighbours, patient_neighbours=args.patient_neighbours, keypoints=args.keypoints
    ).check()
    dataset = read_dataset(args.data)
    side = dataset_side(load_config(args.config, args.overrides), dataset)
    unit, _ = retrieval_space(side.embeddings)
    match = PatientMatch(side.patient, side.patient, settings.unknown)
    position = {v: k for k, v in enumerate(dataset.metadata["image_id"])}
    lesions = dataset.metadata["lesion_id"].to_numpy()
    missed = pairs_file(f"{args.truth}/newly_discovered_duplicates.csv", position)
    different = pairs_file(f"{args.truth}/near_duplicates_different_times.csv", position)
    same = [
        (int(a), int(b))
        for v in dataset.metadata.groupby("lesion_id").indices.values()
        for k, a in enumerate(v)
        for b in v[k + 1 :]
    ]
    rng = np.random.default_rng(args.seed)
    sample = [same[i] for i in rng.choice(len(same), args.pairs, replace=False)]
    listed = {frozenset(q) for q in missed + different}
    for name, pairs, within in (
        ("18 missed pairs", missed, False),
        ("2 different lesions", different, False),
        (f"{args.pairs} same-lesion_id pairs (of {len(same)})", sample, True),
    ):
        report(name, pairs, within, unit, side, match, lesions, listed, settings)


def candidates(
    q: np.ndarray, unit: np.ndarray, match: PatientMatch, lesions: np.ndarray, within: bool, settings: DuplicateSettings
) -> np.ndarray:
    """The pairs (sorted rows) the search verifies for the images ``q``: nearest overall and nearest of one patient."""
    s = unit[q] @ unit.T
    s[np.arange(len(q)), q] = -np.inf
    if not within:  # as the command: never two images of one lesion
        s[lesions[q][:, None] == lesions[None, :]] = -np.inf
    patient = np.concatenate([match(int(i), int(i) + 1) for i in q])
    found = set()
    for sims, k in ((s, settings.neighbours), (np.where(patient, s, -np.inf), settings.patient_neighbours)):
        for image, row in zip(q, np.argsort(-sims, axis=1)[:, :k], strict=True):
            found |= {tuple(sorted((int(image), int(j)))) for j in row if np.isfinite(sims[list(q).index(image), j])}
    return np.array(sorted(found))


def report(name, pairs, within, unit, side, match, lesions, listed, settings) -> None:
    """Print the figures of one set of ground-truth pairs."""
    cand = candidates(np.unique(np.asarray(pairs).ravel()), unit, match, lesions, within, settings)
    keypoints = all_keypoints(side.images, np.unique(cand.ravel()), settings)
    inliers = verify_pairs(keypoints, keypoints, cand, settings)
    similarity = np.einsum("ij,ij->i", unit[cand[:, 0]], unit[cand[:, 1]])
    frame = pd.DataFrame({"i": cand[:, 0], "j": cand[:, 1], "similarity": similarity, "inliers": inliers})
    frame["score"] = pair_score(similarity, inliers, match.pairs(cand[:, 0], cand[:, 1]))
    frame["pair"] = [frozenset(x) for x in cand.tolist()]
    key = {frozenset(x) for x in pairs}
    long = pd.concat([frame.assign(image=frame.i), frame.assign(image=frame.j)])
    top = {
        by: set(long.sort_values(by, ascending=False).groupby("image").head(5)["pair"]) & key
        for by in ("similarity", "score")
    }
    mine = frame[frame["pair"].isin(key)]
    other = frame[(lesions[frame.i] != lesions[frame.j]) & ~frame["pair"].isin(listed)]
    print(
        f"{name}: {len(mine)} among the candidates; in the top 5 of either image by similarity "
        f"{len(top['similarity'])}, by score {len(top['score'])}"
    )
    for t in THRESHOLDS:
        print(
            f"  score >= {t:g}: {(mine.score >= t).sum()} of them; {(other.score >= t).sum()} of {len(other)} "
            "candidate pairs of two lesions no list has"
        )
    if len(pairs) <= 2:
        print(mine[["i", "j", "similarity", "inliers", "score"]].to_string(index=False))


if __name__ == "__main__":
    main()
