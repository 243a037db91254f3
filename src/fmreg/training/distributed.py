"""Data-parallel training under ``torchrun`` (DistributedDataParallel): gloo on CPU, NCCL on GPU.

``torchrun --nproc_per_node N -m fmreg.cli train ...`` (or ``torchrun $(which fmreg) train ...``)
sets ``RANK``/``WORLD_SIZE``; without them a run is a single process and nothing here changes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class World:
    """This process's place in the run: ``rank`` of ``size`` processes."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Only the main process writes checkpoints, pictures and logs."""
        return self.rank == 0

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` for training: DistributedDataParallel when there is more than one process."""
        if self.size == 1:
            return module
        return nn.parallel.DistributedDataParallel(module)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def finish(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def init_world() -> World:
    """Join the process group that ``torchrun`` describes, or be a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size())
