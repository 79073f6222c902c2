"""Devices and ranks of a training process: the device, the process group, DDP wrapping, barriers.

The per-step collectives (host-side sums, gradient averaging) are :mod:`model.step`'s.

A run is one process per device. ``torchrun`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; with more than
one rank the process group starts here (``nccl`` on CUDA, ``gloo`` on the CPU). A single process needs none of
it: every method below is then the identity or a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``run.device``: ``auto`` (this rank's GPU if there is one, else the CPU), ``cuda``, ``cpu`` or ``cuda:N``."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda" and torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


@dataclass
class Ranks:
    """This process's place in the run: ``rank`` of ``world`` processes, on ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run folder and logs."""
        return self.rank == 0

    @classmethod
    def start(cls, device: str = "auto") -> Ranks:
        """The ranks ``torchrun`` describes in the environment; starts the process group when there are several."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        dev = pick_device(device, int(os.environ.get("LOCAL_RANK", "0")))
        if world > 1 and not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        return cls(rank, world, dev)

    def wrap(self, model: nn.Module, find_unused: bool = False) -> nn.Module:
        """``model`` in DistributedDataParallel with several ranks, else ``model`` itself."""
        if self.world == 1:
            return model
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=find_unused,
        )

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        """Wait for every rank, then end the process group (a no-op for one rank)."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
