"""The README's dataset-schema figures on the real data: cheap reads, splits and metadata-only models.

Usage:
    python experiments/real_schemas.py {duplicates,isic2019,isic2020,pad} [--data DIR] \
        [--seeds 0 1 2] [--folds 5] [--epochs 60]

``--data`` is the folder holding ``ham10000/``, ``ham10000_duplicates/``, ``isic2019/``,
``isic2020_subset/`` and ``pad_ufes_20/`` (default: ``../shared/data`` of this checkout); ``--seeds``,
``--folds`` and ``--epochs`` apply to ``pad``.

- ``duplicates``: how many of the 18 same-lesion pairs (Abhishek et al. 2025) HAM10000's lesion-grouped
  split and ablation folds separate without the pairs file, and that with it none is split (7,452 lesions).
- ``isic2019``: the preset over the HAM10000 images (``--drop-missing``): images found, 8-class counts,
  the lesion-grouped split's class counts.
- ``isic2020``: the subset read as binary melanoma vs rest: patients shared between splits, duplicate pairs.
- ``pad``: PAD-UFES-20 without images: the ``metadata_only`` network and the gradient-boosting floor over
  its 21 features on patient-grouped folds (each tests on one fold, validates on the next, as the
  ablation does); balanced accuracy and macro AUROC, mean and SD over folds x seeds.

Nothing is written, except ``pad``'s ablation folders with ``--out``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd

import multimodal_lesion as mml

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pairs_split(meta: pd.DataFrame, split: pd.Series, pairs: list[tuple[str, str]]) -> int:
    """How many pairs have their two images in different splits (or folds)."""
    where = pd.Series(split.to_numpy(), index=meta["image_id"])
    return sum(where[a] != where[b] for a, b in pairs)


def duplicates(args: argparse.Namespace) -> None:
    """Pairs separated by today's splits, and none once the pairs file groups them."""
    pairs_file = args.data / "ham10000_duplicates" / "newly_discovered_duplicates.csv"
    root = args.data / "ham10000"
    raw = pd.read_csv(pairs_file)
    pairs = [(a.removesuffix(".jpg"), b.removesuffix(".jpg")) for a, b in zip(raw.from_img, raw.to_img, strict=True)]
    plain = mml.read_dataset(root)
    merged = mml.read_dataset(root, duplicates=str(pairs_file))
    print(
        f"pairs: {len(pairs)}; lesions without / with the pairs file: "
        f"{plain.metadata.lesion_id.nunique():,} / {merged.metadata.lesion_id.nunique():,}"
    )
    print("| split (seed) | pairs split without the file | with it |\n| --- | --- | --- |")
    for seed in range(5):
        for name, make in (
            ("train/val/test 70/15/15", lambda d, s=seed: mml.split(d, seed=s)["split"]),
            ("5 ablation folds", lambda d, s=seed: mml.ablation_folds(d, 5, s)),
        ):
            before = pairs_split(plain.metadata, make(plain), pairs)
            after = pairs_split(merged.metadata, make(merged), pairs)
            print(f"| {name} ({seed}) | {before} | {after} |")


def isic2019(args: argparse.Namespace) -> None:
    """Images found, class counts and the lesion-grouped split of the ISIC 2019 preset over HAM's images."""
    root = args.data / "isic2019"
    data = mml.read_dataset(root, "isic2019", images=str(args.data / "ham10000"), drop_missing=True)
    meta = data.metadata
    listed = len(pd.read_csv(root / "ISIC_2019_Training_GroundTruth.csv"))
    print(f"found {len(meta):,} of {listed:,} listed images; {meta.lesion_id.nunique():,} lesions")
    splits = mml.split(data, seed=0)
    table = pd.crosstab(meta["dx"], splits["split"]).reindex(list(data.schema.classes))[["train", "val", "test"]]
    table["all"] = table.sum(axis=1)
    print(table.to_string())
    print("lesions per split:", splits.groupby("split")["lesion_id"].nunique().to_dict())


def isic2020(args: argparse.Namespace) -> None:
    """The subset as binary melanoma vs rest, split by patient; the duplicates file over the full table."""
    root = args.data / "isic2020_subset"
    data = mml.read_dataset(root, "isic2020", drop_missing=True)
    meta = data.metadata
    counts = meta.dx.value_counts().to_dict()
    print(f"subset: {len(meta):,} images, {meta.patient_id.nunique()} patients, classes {counts}")
    for seed in range(5):
        splits = mml.split(data, seed=seed).assign(patient=meta["patient_id"])
        shared = int((splits.groupby("patient")["split"].nunique() > 1).sum())
        mel = splits[meta["dx"] == "mel"].groupby("split").size().to_dict()
        print(f"seed {seed}: patients shared between splits {shared}; melanomas per split {mel}")
    full = mml.read_dataset(root, "isic2020", images="none").metadata
    print(f"full table (no images): {len(full):,} images, {full.patient_id.nunique():,} patients; notes above")


def pad(args: argparse.Namespace) -> None:
    """metadata_only and gradient boosting over PAD-UFES-20's features, patient-grouped folds: one ablation per
    seed (folds drawn with that seed, the network trained with it), so each seed has its own fold assignment."""
    root = args.data / "pad_ufes_20"
    data = mml.read_dataset(root, "pad_ufes_20", images="none")
    meta, schema = data.metadata, data.schema
    print(f"{len(meta):,} images, {meta.patient_id.nunique():,} patients, {len(schema.features.names)} features")
    frames = []
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.out or scratch)
        for seed in args.seeds:
            cfg = mml.load_config(None, [f"train.epochs={args.epochs}", 'train.device="cpu"', "train.threads=1"])
            cfg = mml.replace(
                cfg,
                data={"split_seed": seed},
                ablation={"models": ["metadata_only"], "baseline": "metadata_only", "gbm": True},
            )
            cfg = mml.replace(cfg, ablation={"folds": args.folds, "seeds": [seed], "workers": 1})
            result = mml.ablate(cfg, data=data, out=out / f"seed{seed}", show=False)
            frames.append(result.to_frame())
    frame = pd.concat(frames, ignore_index=True)
    frame["model"] = frame["model"].where(~frame["model"].str.startswith("gbm"), "gbm")
    summary = frame.groupby("model")[["balanced_accuracy", "macro_auroc"]].agg(["mean", "std"]).round(3)
    print(summary.to_string())
    print(f"{args.folds} patient-grouped folds x seeds {args.seeds}; {len(frame)} cells")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["duplicates", "isic2019", "isic2020", "pad"])
    parser.add_argument("--data", type=Path, default=DATA, help="the folder of the real datasets")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pad: training and fold seeds")
    parser.add_argument("--folds", type=int, default=5, help="pad: patient-grouped folds")
    parser.add_argument("--epochs", type=int, default=60, help="pad: maximum epochs of metadata_only")
    parser.add_argument("--out", type=Path, help="pad: keep the ablation folders here (default: a temporary folder)")
    args = parser.parse_args()
    {"duplicates": duplicates, "isic2019": isic2019, "isic2020": isic2020, "pad": pad}[args.what](args)


if __name__ == "__main__":
    main()
