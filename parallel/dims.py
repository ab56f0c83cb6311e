"""ParallelDims: parallel degrees -> a validated DeviceMesh.

The rank grid is (dp_replicate, dp_shard), outermost first. With one process every degree
is 1 and no process group is created, so single-device runs never touch torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pretrain.config import ConfigError, ParallelConfig


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    world_size: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> "ParallelDims":
        """Resolve -1 degrees and check that the grid covers exactly world_size ranks."""
        shard = cfg.dp_shard
        if shard == -1:
            if world_size % cfg.dp_replicate:
                raise ConfigError(
                    f"parallel.dp_replicate: {cfg.dp_replicate} does not divide the world size {world_size}"
                )
            shard = world_size // cfg.dp_replicate
        if cfg.dp_replicate * shard != world_size:
            raise ConfigError(
                f"parallel.dp_shard: dp_replicate={cfg.dp_replicate} x dp_shard={shard} "
                f"!= world size {world_size}"
            )
        return cls(cfg.dp_replicate, shard, world_size)

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that see different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """A 2-D ('dp_replicate', 'dp_shard') mesh, or None on a single process."""
        if not self.distributed:
            return None
        return init_device_mesh(
            device_type, (self.dp_replicate, self.dp_shard), mesh_dim_names=("dp_replicate", "dp_shard")
        )


def init_distributed(device_type: str) -> tuple[int, int, int]:
    """Join the process group torchrun/slurm describe in the environment.

    Returns (rank, local_rank, world_size); (0, 0, 1) without a launcher.
    NCCL on CUDA, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 0, 1
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return rank, local_rank, world


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
