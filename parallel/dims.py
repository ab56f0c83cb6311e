"""ParallelDims: parallel degrees -> a validated DeviceMesh.

The rank grid is (pp, dp_replicate, dp_shard, cp, tp), outermost first: the pipeline's
point-to-point traffic crosses the slowest links least often, FSDP's collectives stay inside a
pipeline stage, and tensor parallelism's per-layer collectives use the fastest links (within a
node) (torchtitan's order); context parallelism's per-layer exchanges sit next to them. The mesh
has the 'pp', 'cp' and 'tp' dimensions only when they are > 1. With one process every degree is 1 and no process group is created, so single-device runs
never touch torch.distributed.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pretrain.config import ConfigError, ParallelConfig, TrainConfig


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    world_size: int
    pp: int = 1
    pp_microbatches: int = 1
    """Micro-batches per pipeline round (parallel.pp_microbatches resolved; 1 without pp)."""
    tp: int = 1
    sequence_parallel: bool = False
    ep: int = 1
    """Expert-parallel degree: borrowed from dp_shard (its inner ep ranks), as torchtitan does."""
    cp: int = 1
    """Context-parallel degree: ranks that share a batch, each holding segments of its sequences."""

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int, train: TrainConfig | None = None) -> "ParallelDims":
        """Resolve -1 degrees and check that pp x dp_replicate x dp_shard x cp x tp is exactly
        world_size ranks; with ``train``, also that the batch divides (:meth:`grad_accum`).
        Raises a one-line ConfigError naming the field."""
        if world_size % cfg.pp:
            raise ConfigError(f"parallel.pp: {cfg.pp} does not divide the world size {world_size}")
        if world_size % (cfg.pp * cfg.tp):
            raise ConfigError(f"parallel.tp: pp={cfg.pp} x tp={cfg.tp} does not divide the world size {world_size}")
        if world_size % (cfg.pp * cfg.tp * cfg.cp):
            raise ConfigError(
                f"parallel.cp: pp={cfg.pp} x cp={cfg.cp} x tp={cfg.tp} does not divide the world size {world_size}"
            )
        dp_world = world_size // (cfg.pp * cfg.tp * cfg.cp)
        shard = cfg.dp_shard
        if shard == -1:
            if dp_world % cfg.dp_replicate:
                raise ConfigError(
                    f"parallel.dp_replicate: {cfg.dp_replicate} does not divide the world size {world_size}"
                    + (f" / parallel.pp={cfg.pp}" if cfg.pp > 1 else "")
                    + (f" / parallel.tp={cfg.tp}" if cfg.tp > 1 else "")
                    + (f" / parallel.cp={cfg.cp}" if cfg.cp > 1 else "")
                )
            shard = dp_world // cfg.dp_replicate
        if cfg.pp * cfg.dp_replicate * shard * cfg.cp * cfg.tp != world_size:
            pp = f"pp={cfg.pp} x " if cfg.pp > 1 else ""
            tp = (f" x cp={cfg.cp}" if cfg.cp > 1 else "") + (f" x tp={cfg.tp}" if cfg.tp > 1 else "")
            raise ConfigError(
                f"parallel.dp_shard: {pp}dp_replicate={cfg.dp_replicate} x dp_shard={shard}{tp} "
                f"!= world size {world_size}"
            )
        _check_ep(cfg, shard)
        dims = cls(
            cfg.dp_replicate, shard, world_size, cfg.pp, cfg.microbatches if cfg.pp > 1 else 1, cfg.tp, cfg.sp,
            cfg.ep, cfg.cp,
        )
        if train is not None:
            dims.grad_accum(train)
        return dims

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that see different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def grad_accum(self, train: TrainConfig) -> int:
        """Gradient-accumulation steps per optimizer step on each data-parallel rank: pipeline
        rounds of pp_microbatches micro-batches of train.micro_batch_size sequences (one
        micro-batch per step without pp), so that

            global_batch_size = dp x micro_batch_size x pp_microbatches x grad_accum.

        Raises ConfigError naming train.global_batch_size when it does not divide."""
        unit = self.dp * train.micro_batch_size * self.pp_microbatches
        if train.global_batch_size % unit:
            pp = f" x parallel.pp_microbatches={self.pp_microbatches}" if self.pp > 1 else ""
            raise ConfigError(
                f"train.global_batch_size: {train.global_batch_size} is not a multiple of data-parallel "
                f"ranks={self.dp} x train.micro_batch_size={train.micro_batch_size}{pp} = {unit}"
            )
        return train.global_batch_size // unit

    def describe_batch(self, train: TrainConfig) -> str:
        """One line with the resolved batch relation, for the start of a run and `pretrain plan`."""
        accum = self.grad_accum(train)
        pp = f" x {self.pp_microbatches} pipeline micro-batches" if self.pp > 1 else ""
        return (
            f"batch: {train.global_batch_size} sequences per step = {self.dp} data-parallel rank(s) x "
            f"{train.micro_batch_size} sequences per micro-batch{pp} x {accum} accumulation step(s)"
            + (f"; each sequence split over {self.cp} context-parallel ranks" if self.cp > 1 else "")
        )

    def dp_rank(self, rank: int) -> int:
        """The data-parallel rank of global ``rank`` (which shard of each batch it reads): its
        position in the (dp_replicate, dp_shard) grid; context- and tensor-parallel peers share it."""
        return (rank // (self.tp * self.cp)) % self.dp

    def cp_rank(self, rank: int) -> int:
        """The context-parallel rank of global ``rank``: which segments of its sequences it holds."""
        return (rank // self.tp) % self.cp

    def build_mesh(self, device_type: str) -> DeviceMesh | None:
        """The ('pp', 'dp_replicate', 'dp_shard', 'cp', 'tp') mesh, without each of 'pp', 'cp'
        and 'tp' when it is 1; None on a single process."""
        if not self.distributed:
            return None
        shape = (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)
        names = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
        keep = [i for i, n in enumerate(names) if n in ("dp_replicate", "dp_shard") or shape[i] > 1]
        return init_device_mesh(
            device_type, tuple(shape[i] for i in keep), mesh_dim_names=tuple(names[i] for i in keep)
        )

    def build_ep_mesh(self, device_type: str) -> DeviceMesh:
        """The ('dp_replicate', 'dp_shard_mod_ep', 'ep'[, 'tp']) mesh of expert parallelism (ep >
        1 only; 'tp' when tp > 1) of this rank's pipeline stage: 'ep' takes the inner ep ranks of
        'dp_shard', so global rank r (tp = pp = 1) is data-parallel rank r and holds expert block
        r % ep; the ranks along the other dimensions hold the same experts. An ep group is made
        of ranks with the same pipeline stage and tp coordinate. Collective over all ranks (one
        process group per dimension, for every stage); with pp > 1 the mesh returned is this
        rank's stage's slice (its 'pp' coordinate fixed). With context parallelism the mesh has a
        'cp' dimension after 'ep': an ep group holds one cp coordinate (its ranks' tokens are the
        same segments of different sequences), and the experts are replicated over 'cp'."""
        shape = (self.pp, self.dp_replicate, self.dp_shard // self.ep, self.ep, self.cp, self.tp)
        names = ("pp", "dp_replicate", "dp_shard_mod_ep", "ep", "cp", "tp")
        keep = [i for i, n in enumerate(names) if n not in ("pp", "cp", "tp") or shape[i] > 1]
        mesh = init_device_mesh(
            device_type, tuple(shape[i] for i in keep), mesh_dim_names=tuple(names[i] for i in keep)
        )
        return mesh[tuple(names[i] for i in keep if names[i] != "pp")] if self.pp > 1 else mesh


def _check_ep(cfg: ParallelConfig, dp_shard: int) -> None:
    """parallel.ep borrows ranks from dp_shard; it composes with FSDP2 data parallelism (not
    DeepSpeed), tensor parallelism and pipeline parallelism."""
    if cfg.ep == 1:
        return
    if dp_shard % cfg.ep:
        raise ConfigError(f"parallel.ep: {cfg.ep} does not divide parallel.dp_shard={dp_shard} (ep borrows its ranks)")
    if cfg.dp_backend != "fsdp":
        raise ConfigError(
            f"parallel.ep: expert parallelism runs only with parallel.dp_backend='fsdp', got {cfg.dp_backend!r}"
        )


def init_distributed(device_type: str, timeout_s: float | None = None) -> tuple[int, int, int]:
    """Join the process group torchrun/slurm describe in the environment.

    Returns (rank, local_rank, world_size); (0, 0, 1) without a launcher.
    NCCL on CUDA, gloo on CPU. ``timeout_s``: seconds a collective may wait before it fails
    (torch's default when None).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 0, 1
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        backend = "nccl" if device_type == "cuda" else "gloo"
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun's store outlives a restart (--max-restarts): keys under a prefix of this
            # attempt, else torch 2.13's restarted gloo ranks dial the dead ranks' addresses
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                timeout=timeout or datetime.timedelta(minutes=10),
            )
            store = dist.PrefixStore(f"/pretrain/attempt_{attempt}", store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
        else:
            dist.init_process_group(backend, timeout=timeout)
    return rank, local_rank, world


def destroy_distributed(clean: bool = False) -> None:
    """Leave the process group, if any. ``clean``: every rank got here normally, so first wait
    for all of them: no rank then closes its connections while a peer still runs a collective
    on them (a gloo peer can abort on a reset connection). Never after a failure, where a rank
    may be gone and the barrier would wait for the collective timeout."""
    if dist.is_initialized():
        if clean and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
