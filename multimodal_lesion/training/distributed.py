"""Data-parallel training under ``torchrun``: gloo on the CPU, nccl on GPUs; a no-op otherwise."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """DistributedDataParallel around ``model`` when distributed and it has trainable parameters."""
    if not info.enabled or not any(p.requires_grad for p in model.parameters()):
        return model
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


@contextlib.contextmanager
def main_first(info: DistInfo) -> Iterator[None]:
    """Rank 0 runs the block first (data generation, caches); the others wait, then run it on warm caches."""
    if info.enabled and not info.is_main:
        dist.barrier()
    yield
    if info.enabled and info.is_main:
        dist.barrier()


def finish(info: DistInfo) -> None:
    """Leave the process group at the end of a distributed run."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
