"""Data parallelism with FSDP2 (``fully_shard``): ZeRO-3 sharding within 'dp_shard',
replication across 'dp_replicate' (HSDP when both are > 1).

Each block is its own FSDP unit so that only one block's parameters are gathered at a
time; the embedding, final norm and head are gathered with the root.

FSDP2 warns when a unit returns a view, since an in-place op on it would skip the unit's
pre-backward hook. SambaY's blocks return the shared values ``[B, T, H_kv, D]`` as a view of
their projection in the carry; no layer modifies a carry entry in place (the carry contract,
pretrain/models/registry.py), so that warning is silenced for FSDP units here rather than
copying the K/V every step.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

if TYPE_CHECKING:
    from parallel.dims import ParallelDims


def fsdp_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """The ('dp_replicate', 'dp_shard') mesh FSDP2 runs over; with context parallelism
    ('dp_replicate', 'dp_shard_cp'), dp_shard and cp flattened: the cp ranks of a batch hold
    the same weights, so they shard them too and average their gradients (each rank's loss is
    the mean over its tokens: the average over cp ranks is the mean over the sequences)."""
    if dims.cp == 1:
        return mesh["dp_replicate", "dp_shard"]
    if dims.dp_replicate == 1:
        return mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
    # HSDP: a mesh of the same ranks with dp_shard and cp as one dimension (adjacent in the
    # row-major grid, so the flattened groups are the same ranks); collective over all ranks
    from torch.distributed.device_mesh import init_device_mesh

    shape = (dims.pp, dims.dp_replicate, dims.dp_shard * dims.cp, dims.tp)
    names = ("pp", "dp_replicate", "dp_shard_cp", "tp")
    flat = init_device_mesh(mesh.device_type, shape, mesh_dim_names=names)
    return flat["dp_replicate", "dp_shard_cp"]


def apply_fsdp(
    model: nn.Module, mesh: DeviceMesh, param_dtype: torch.dtype = torch.float32,
    ignored_params: set[nn.Parameter] | None = None,
) -> nn.Module:
    """Shard ``model`` (a HybridLM or a pipeline stage's StageModule) over the data-parallel
    dimensions of ``mesh`` in place.

    Parameters stay fp32 (the master weights); ``param_dtype`` is the compute dtype that
    FSDP casts gathered parameters to, gradients are reduced in fp32. ``ignored_params``
    (expert parallelism's experts, parallel/expert.py) are neither sharded nor reduced.
    """
    names = mesh.mesh_dim_names
    if len(names) == 2 and names[0] == "dp_replicate" and mesh["dp_replicate"].size() == 1:
        dp_mesh = mesh[names[1]]
    else:
        dp_mesh = mesh
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor", category=UserWarning)
    inner = getattr(model, "model", model)  # a pipeline stage holds its part of the model
    blocks = getattr(inner, "blocks", None)
    if blocks is not None:
        for block in blocks.values():
            fully_shard(block, mesh=dp_mesh, mp_policy=mp, ignored_params=ignored_params)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, ignored_params=ignored_params)
    return model
