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

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


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
    if mesh.mesh_dim_names == ("dp_replicate", "dp_shard") and mesh["dp_replicate"].size() == 1:
        dp_mesh = mesh["dp_shard"]
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
