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

import numpy as np

import multimodal_lesion as mml

CONFIG = "real_frozen"  # a preset of the package


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="HAM10000 root")
    parser.add_argument("--config", default=str(CONFIG), help="preset or experiment file (default: %(default)s)")
    parser.add_argument("--backend", default="openvino", help="torch | onnxruntime | openvino")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = mml.load_config(args.config, args.overrides)
    fresh = mml.image_embeddings(cfg, args.data, backend=args.backend)
    n = len(fresh.values)
    print(
        f"{args.backend}: {n} images {fresh.image_size} x {fresh.views} views in {fresh.seconds:.0f} s "
        f"({n / fresh.seconds:.1f} images/s, {cfg.train.threads or 'all'} threads)"
    )
    cached = mml.image_embeddings(cfg, args.data).values
    diff = np.abs(fresh.values - cached)
    rel = np.linalg.norm(fresh.values - cached, axis=1) / np.linalg.norm(cached, axis=1)
    print(f"against the cached embeddings: max |diff| {diff.max():.2e}, max relative L2 {rel.max():.2e}")


if __name__ == "__main__":
    main()
