"""The full real embedding pass timed with one backend, and compared with the cached float32 embeddings.

Usage:
    python experiments/real_embedding_pass.py --data /path/to/HAM10000 [--config PRESET|FILE] [--backend openvino]
                                              [--set train.embed_batch=8 ...]

Embeds every image of the dataset (the ``real_frozen`` preset: 240x320, multi-scale, the 4 flips averaged) with
``--backend`` from the cached uint8 images, prints the wall time and images/s, then loads (or first
builds, with the configured backend) the cached embeddings of the same config and prints the largest
absolute and relative difference between the two: the exported backends must agree to 1e-3.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from multimodal_lesion.config import load_config, replace
from multimodal_lesion.runs import compute_embeddings, inputs_from_config

CONFIG = "real_frozen"  # a preset of the package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="HAM10000 root")
    parser.add_argument("--config", default=str(CONFIG), help="preset or experiment file (default: %(default)s)")
    parser.add_argument("--backend", default="openvino", help="torch | onnxruntime | openvino")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = replace(load_config(args.config, args.overrides), data={"root": args.data})
    cfg, inputs = inputs_from_config(cfg)
    images = inputs.images()
    branch, t = inputs.model.image_branch, cfg.train
    assert branch is not None, "the configured model has no image branch"
    start = time.perf_counter()
    fresh = compute_embeddings(
        branch,
        images,
        inputs.normalize,
        flip_average=t.flip_average,
        batch_size=t.embed_batch,
        device=inputs.device,
        backend=args.backend,
        precision=t.embed_precision,
    )
    seconds = time.perf_counter() - start
    print(
        f"{args.backend}: {len(images)} images {tuple(cfg.data.image_size)} x {4 if t.flip_average else 1} views "
        f"in {seconds:.0f} s ({len(images) / seconds:.1f} images/s, {torch.get_num_threads()} threads)"
    )
    cached = inputs.embeddings()
    diff = np.abs(fresh - cached)
    rel = np.linalg.norm(fresh - cached, axis=1) / np.linalg.norm(cached, axis=1)
    print(f"against the cached embeddings: max |diff| {diff.max():.2e}, max relative L2 {rel.max():.2e}")


if __name__ == "__main__":
    main()
