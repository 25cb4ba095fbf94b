"""How much of each measurement the benchmark runs: the subsample sizes and the tiny preset."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class BenchSizes:
    """How much of each measurement to run: a subsample, so the default run fits a 2-core machine."""

    data_images: int = 512  # images read per epoch in the data section
    data_epochs: int = 2  # epochs per loader (the best is reported: the first warms the page cache)
    train_batch: int = 64  # images per end-to-end training step
    train_steps: int = 20  # timed end-to-end steps with the cached loader (after one warm-up step)
    naive_train_steps: int = 5  # timed end-to-end steps with the JPEG-decoding loader
    embed_images: int = 64  # images in the timed embedding passes (x4 flips), 8 of them in bfloat16
    matmul_side: int = 2048  # the roofline's square matrix multiply
    ablation_folds: int = 1  # folds timed per model (extrapolated to the configured folds)
    ablation_seeds: int = 1  # seeds timed per model and fold (extrapolated to the configured seeds)
    explain_cases: int = 10  # cases timed for Grad-CAM, grouped SHAP and modality attribution
    kernel_cases: int = 3  # cases explained by KernelExplainer on the two-input model (slow: the naive way)
    report_cases: tuple[int, int] = (2, 10)  # two report sizes: their difference gives the cost per case
    report_epochs: int = 3  # epochs of the frozen head trained for the report run (values do not matter)
    report_target_cases: int = 100  # the report size the target speaks of
    duplicate_pool: int = 25_000  # images in the near-duplicate search's neighbour step (ISIC 2019's size)
    duplicate_pairs: int = 200  # image pairs timed in its keypoint verification


#: Sizes of ``--tiny``: seconds on a tiny synthetic dataset, to check that the harness runs.
TINY_SIZES = BenchSizes(
    data_images=16,
    data_epochs=1,
    train_batch=4,
    train_steps=2,
    naive_train_steps=1,
    embed_images=8,
    matmul_side=128,
    explain_cases=2,
    kernel_cases=1,
    report_cases=(1, 2),
    report_epochs=1,
    duplicate_pool=300,
    duplicate_pairs=4,
)
#: Config overrides of ``--tiny``: a small synthetic dataset, small images, an untrained backbone.
TINY_OVERRIDES = (
    "data.synthetic_n=60",
    "data.image_size=[32, 32]",
    'model.weights="none"',
    "train.epochs=2",
    "train.batch_size=16",
    "ablation.folds=3",
    "ablation.seeds=[0]",
    "ablation.bootstrap=20",
    "explain.background_size=8",
)


def parse_sizes(pairs: Sequence[str], base: BenchSizes | None = None) -> BenchSizes:
    """Apply ``KEY=VALUE`` strings to ``base`` (the defaults when None).

    Args:
        pairs: e.g. ``["train_steps=5", "report_cases=2,6"]``; a tuple-valued key takes comma-separated integers.
        base: the sizes the pairs change.

    Raises:
        ConfigError: an unknown key, a value that is not an integer, or the wrong number of integers.
    """
    base = base or BenchSizes()
    known = {f.name for f in fields(BenchSizes)}
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        if key not in known or not text:
            raise ConfigError(f"bench size '{pair}': expected KEY=VALUE with KEY one of {', '.join(sorted(known))}")
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            raise ConfigError(f"bench size '{pair}': not an integer (or integers separated by commas)") from None
        default = getattr(base, key)
        if len(values) != (len(default) if isinstance(default, tuple) else 1):
            raise ConfigError(f"bench size '{pair}': expected a value shaped like {default!r}")
        changes[key] = values if isinstance(default, tuple) else values[0]
    return replace(base, **changes)
