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

Nothing is written.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from multimodal_lesion.config import ExperimentConfig, replace
from multimodal_lesion.data.reader import read_dataset
from multimodal_lesion.data.schema import preset
from multimodal_lesion.data.splits import fold_assignment, split_lesions, split_rule

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pairs_split(meta: pd.DataFrame, split: pd.Series, pairs: list[tuple[str, str]]) -> int:
    """How many pairs have their two images in different splits (or folds)."""
    where = pd.Series(split.to_numpy(), index=meta["image_id"])
    return sum(where[a] != where[b] for a, b in pairs)


def duplicates(args: argparse.Namespace) -> None:
    """Pairs separated by today's splits, and none once the pairs file groups them."""
    pairs_file = args.data / "ham10000_duplicates" / "newly_discovered_duplicates.csv"
    dataset = args.data / "ham10000"
    raw = pd.read_csv(pairs_file)
    pairs = [(a.removesuffix(".jpg"), b.removesuffix(".jpg")) for a, b in zip(raw.from_img, raw.to_img, strict=True)]
    plain = read_dataset(dataset, preset("ham10000")).metadata
    schema = dataclasses.replace(preset("ham10000"), duplicates=str(pairs_file))
    merged = read_dataset(dataset, schema).metadata
    print(
        f"pairs: {len(pairs)}; lesions without / with the pairs file: "
        f"{plain.lesion_id.nunique():,} / {merged.lesion_id.nunique():,}"
    )
    print("| split (seed) | pairs split without the file | with it |\n| --- | --- | --- |")
    for seed in range(5):
        for name, make in (
            ("train/val/test 70/15/15", lambda m, s=seed: split_lesions(m, seed=s)["split"]),
            ("5 ablation folds", lambda m, s=seed: fold_assignment(m, 5, s)),
        ):
            before, after = pairs_split(plain, make(plain), pairs), pairs_split(merged, make(merged), pairs)
            print(f"| {name} ({seed}) | {before} | {after} |")


def isic2019(args: argparse.Namespace) -> None:
    """Images found, class counts and the lesion-grouped split of the ISIC 2019 preset over HAM's images."""
    root = args.data / "isic2019"
    data = read_dataset(root, preset("isic2019"), images=str(args.data / "ham10000"), drop_missing=True)
    meta = data.metadata
    listed = len(pd.read_csv(root / "ISIC_2019_Training_GroundTruth.csv"))
    print(f"found {len(meta):,} of {listed:,} listed images; {meta.lesion_id.nunique():,} lesions")
    splits = split_lesions(meta, seed=0)
    table = pd.crosstab(meta["dx"], splits["split"]).reindex(preset("isic2019").classes)[["train", "val", "test"]]
    table["all"] = table.sum(axis=1)
    print(table.to_string())
    print("lesions per split:", splits.groupby("split")["lesion_id"].nunique().to_dict())


def isic2020(args: argparse.Namespace) -> None:
    """The subset as binary melanoma vs rest, split by patient; the duplicates file over the full table."""
    root = args.data / "isic2020_subset"
    data = read_dataset(root, preset("isic2020"), drop_missing=True)
    meta = data.metadata
    counts = meta.dx.value_counts().to_dict()
    print(f"subset: {len(meta):,} images, {meta.patient_id.nunique()} patients, classes {counts}")
    for seed in range(5):
        splits = split_lesions(meta, seed=seed, group_label=split_rule(data.schema)).assign(patient=meta["patient_id"])
        shared = int((splits.groupby("patient")["split"].nunique() > 1).sum())
        mel = splits[meta["dx"] == "mel"].groupby("split").size().to_dict()
        print(f"seed {seed}: patients shared between splits {shared}; melanomas per split {mel}")
    full = read_dataset(root, preset("isic2020"), images="none").metadata
    print(f"full table (no images): {len(full):,} images, {full.patient_id.nunique():,} patients; notes above")


def pad(args: argparse.Namespace) -> None:
    """metadata_only and gradient boosting over PAD-UFES-20's features, patient-grouped folds."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    data = read_dataset(args.data / "pad_ufes_20", preset("pad_ufes_20"), images="none")
    meta, schema = data.metadata, data.schema
    print(f"{len(meta):,} images, {meta.patient_id.nunique():,} patients, {len(schema.features.names)} features")
    y = meta["dx"].map({c: i for i, c in enumerate(schema.classes)}).to_numpy()
    rows = []
    for seed in args.seeds:
        folds = fold_assignment(meta, args.folds, seed, split_rule(schema))
        for k in range(args.folds):
            split = np.where(folds == k, "test", np.where(folds == (k + 1) % args.folds, "val", "train"))
            for model, probs in (
                ("metadata_only", _network(data, split, seed, args)),
                ("gbm", _gbm(data, split, y, seed)),
            ):
                test = split == "test"
                rows.append(
                    {
                        "model": model,
                        "seed": seed,
                        "fold": k,
                        "balanced_accuracy": balanced_accuracy_score(y[test], probs.argmax(1)),
                        "macro_auroc": roc_auc_score(
                            y[test], probs, multi_class="ovr", labels=range(len(schema.classes))
                        ),
                        "test_patients": meta.loc[test, "patient_id"].nunique(),
                    }
                )
    frame = pd.DataFrame(rows)
    summary = frame.groupby("model")[["balanced_accuracy", "macro_auroc"]].agg(["mean", "std"]).round(3)
    print(summary.to_string())
    print(
        f"{args.folds} patient-grouped folds x seeds {args.seeds}; test patients per fold "
        f"{frame.test_patients.min()}-{frame.test_patients.max()}"
    )


def _network(data, split: np.ndarray, seed: int, args: argparse.Namespace) -> np.ndarray:
    """Test probabilities of the metadata_only network trained on ``split`` (early stopping on val)."""
    import torch

    from multimodal_lesion.runs import predict_logits, prepare_inputs
    from multimodal_lesion.training.engine import class_weights, fit

    cfg = replace(
        ExperimentConfig(),
        data={"schema": "pad_ufes_20", "images": "none"},
        model={"name": "metadata_only"},
        train={"seed": seed, "epochs": args.epochs, "device": "cpu", "threads": 1},
    )
    inputs = prepare_inputs(cfg, data, pd.DataFrame({"split": split}))
    weights = class_weights(inputs.targets[inputs.indices("train")], data.schema.n_classes)
    train, val = inputs.batches("train", train=True, show=False), inputs.batches("val", train=False, show=False)
    fit(inputs.model, train, val, cfg.train, None, weights=weights, show_progress=False)
    logits, _, _ = predict_logits(inputs.model, inputs.batches("test", train=False, show=False), inputs.device)
    return torch.softmax(torch.from_numpy(logits), 1).numpy()


def _gbm(data, split: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Test probabilities of scikit-learn gradient boosting on the encoded features (the ablation's floor)."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    from multimodal_lesion.data.encoder import MetadataEncoder

    train, test = split == "train", split == "test"
    encoder = MetadataEncoder.for_features(data.schema.features).fit(data.metadata[train])
    x = encoder.transform(data.metadata)
    gbm = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, class_weight="balanced", random_state=seed)
    gbm.fit(x[train], y[train])
    probs = np.zeros((int(test.sum()), data.schema.n_classes))
    probs[:, gbm.classes_] = gbm.predict_proba(x[test])
    return probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["duplicates", "isic2019", "isic2020", "pad"])
    parser.add_argument("--data", type=Path, default=DATA, help="the folder of the real datasets")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pad: training and fold seeds")
    parser.add_argument("--folds", type=int, default=5, help="pad: patient-grouped folds")
    parser.add_argument("--epochs", type=int, default=60, help="pad: maximum epochs of metadata_only")
    args = parser.parse_args()
    {"duplicates": duplicates, "isic2019": isic2019, "isic2020": isic2020, "pad": pad}[args.what](args)


if __name__ == "__main__":
    main()
