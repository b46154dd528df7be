"""Data-parallel training under ``torchrun``: one process per device (or per CPU share), one aligner.

Every rank draws the randomness of the whole global batch (the same generator, the same draws as a
single process) and computes the loss of its own slice of pairs; gradients are averaged (DDP),
BatchNorm statistics are taken over the global batch (:class:`deepalign.nn.dws.SlotNorm` reduces
across ranks), so N processes train the aligner one process trains, up to the order of float
reductions. Only rank 0 writes files. Without ``torchrun`` (no ``WORLD_SIZE``) everything is a
single process and nothing here does anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deepalign.errors import DeepAlignError


@dataclass(frozen=True)
class Ranks:
    """This process's place: ``rank`` of ``world`` processes (1 without torchrun)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def share(self, n: int) -> slice:
        """This rank's contiguous slice of a global batch of ``n`` (equal shares required)."""
        if n % self.world:
            raise DeepAlignError(
                f"--batch {n} does not split evenly over {self.world} processes; "
                f"use a multiple of {self.world}"
            )
        size = n // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def setup(device: torch.device) -> Ranks:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA); a single process
    without it. On CUDA each rank uses the GPU of its ``LOCAL_RANK``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return Ranks(dist.get_rank(), dist.get_world_size())


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, ``cuda`` means this rank's GPU (``LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def teardown(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.destroy_process_group()
