"""The global gradient norm of a model spread over ranks, and clipping by it.

Every rank holds a part of each gradient: its shard of a DTensor (FSDP2 over the data-parallel
dimensions, tensor parallelism over 'tp'), or a whole tensor. The squared norm of the whole
model is the sum over ranks of each rank's local squares, where a part that several ranks hold
alike (a DTensor's ``Replicate`` placements: e.g. a norm weight on every tp rank, or a
parameter replicated across HSDP's 'dp_replicate') counts once: its square is divided by the
number of its copies. One all-reduce then gives every rank the same norm, with no redistribution
of the gradients (unlike ``torch.nn.utils.clip_grad_norm_`` on DTensors, which reduces each mesh
dimension in turn).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor


def local_square_norm(t: Tensor) -> Tensor:
    """fp32 sum of squares of this rank's part of ``t``, divided by the number of ranks that
    hold the same part (the product of the mesh sizes of a DTensor's Replicate dimensions)."""
    if not isinstance(t, DTensor):
        return t.detach().float().square().sum()
    copies = 1
    for size, placement in zip(t.device_mesh.shape, t.placements):
        if placement.is_replicate():
            copies *= size
        elif placement.is_partial():
            raise ValueError(f"local_square_norm: a partial gradient {t.placements} has no local norm")
    return t.to_local().detach().float().square().sum() / copies


@torch.no_grad()
def clip_grad_norm_(grads: Iterable[Tensor], max_norm: float, group: dist.ProcessGroup | None = None,
                    skip: Iterable[Tensor] = ()) -> Tensor:
    """Scale every gradient in ``grads`` (in place) by ``min(1, max_norm / (norm + 1e-6))``,
    ``norm`` being the global L2 norm (module docstring) summed over ``group`` (None: every
    rank). ``skip``: gradients scaled but not counted (a second copy of a shared parameter).
    Returns the norm, an fp32 scalar, the same on every rank of ``group`` (``inf``/``nan``
    left to the caller). Without torch.distributed initialised, the one-process norm."""
    grads = list(grads)
    skipped = {id(g) for g in skip}
    device = grads[0].device if grads else torch.get_default_device()
    sq = torch.zeros((), dtype=torch.float32, device=device)
    for g in grads:
        if id(g) not in skipped:
            sq += local_square_norm(g)
    if dist.is_initialized():
        dist.all_reduce(sq, group=group)
    norm = sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.dtype))
    return norm
