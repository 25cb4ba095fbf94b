"""Test-time adaptation of batch-norm statistics (AdaBN, Li et al. 2016): the weights stay, the statistics move.

A batch-norm layer normalises with the running mean and variance of the data it was trained on.
On another clinic's images those no longer standardise the features; AdaBN re-estimates them on
the new data's unlabelled images and changes nothing else: every parameter (weights, biases, the
affine scale and shift of the normalisation itself) stays bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(modules: Iterable[nn.Module]) -> list[_BatchNorm]:
    """Every batch-norm layer (with running statistics) inside ``modules``, each once, in order."""
    seen: dict[int, _BatchNorm] = {}
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, _BatchNorm) and layer.track_running_stats:
                seen.setdefault(id(layer), layer)
    return list(seen.values())


@torch.no_grad()
def adapt_batchnorm(
    model: nn.Module, layers: Sequence[_BatchNorm], forward: Callable[[Tensor], object], batches: Iterable[Tensor]
) -> int:
    """Recompute the running statistics of ``layers`` over ``batches`` (passed through ``forward``); returns
    the number of images seen.

    The statistics are reset and then the average of the batches' statistics weighted by their sizes
    (each batch's momentum is its share of the images seen so far), so the running mean is the mean over
    the images even when the last batch is smaller; every other module stays in eval mode, so layers
    not named keep theirs. The model ends in eval mode.
    No batch at all is a ValueError (the reset statistics would be meaningless).
    """
    model.eval()
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.train()
    seen = 0
    try:
        for batch in batches:
            for layer in layers:  # a running average over the images, not over the batches
                layer.momentum = len(batch) / (seen + len(batch))
            forward(batch)
            seen += len(batch)
    finally:
        for layer, momentum in zip(layers, momenta, strict=True):
            layer.momentum = momentum
        model.eval()
    if seen == 0:
        raise ValueError("no images to adapt the batch-norm statistics to")
    return seen


__all__ = ["adapt_batchnorm", "batchnorm_layers"]
