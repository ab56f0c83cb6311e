"""A single-process reference for tensor-parallel plans: run a mixer or FFN once per simulated
rank with that rank's local parameters and carry shards, and combine the ranks as the region's
exit does (outputs summed, sharded carry entries concatenated, replicated ones taken from rank
0). The local parameters are slices of the full ones, so autograd sums every rank's
contribution into the full parameters' gradients: the all-reduce of a replicated parameter's
gradient, for free. This checks a plan's mathematics without torch.distributed; the
distributed tests check the mechanism (parallel/tensor/region.py)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from parallel.tensor.plan import GroupSlice, Layout, RegionPlan, local_slice


def local_view(t: Tensor, layout: Layout | None, rank: int, tp: int) -> Tensor:
    """Rank ``rank``'s view of ``t`` under ``layout`` (the whole of ``t`` when replicated)."""
    if layout is None:
        return t
    dim = layout.dim % t.dim()
    s = local_slice(layout, t.shape[dim], rank, tp)
    return t.narrow(dim, s.start, s.stop - s.start)


def _gather(parts: list[Tensor], layout: Layout, tp: int) -> Tensor:
    """The full tensor from the ranks' shards (a group shared by several ranks from its first)."""
    if isinstance(layout, GroupSlice):
        parts = [parts[g * tp // layout.groups] for g in range(layout.groups)]
    return torch.cat(parts, dim=layout.dim % parts[0].dim())


def simulate_region(module: nn.Module, plan: RegionPlan, tp: int, args: tuple[Any, ...]) -> Any:
    """``module(*args)`` computed as ``tp`` tensor-parallel ranks would under ``plan``. With
    ``module.uses_carry`` the last argument is the carry dict and the result ``(y, carry)``."""
    uses_carry = getattr(module, "uses_carry", False)
    params = dict(module.named_parameters())
    outs = []
    for r in range(tp):
        local = {n: local_view(p, plan.layout(n), r, tp) for n, p in params.items()}
        a = list(args)
        if uses_carry:
            a[-1] = {k: local_view(v, plan.carry_layout(k), r, tp) for k, v in args[-1].items()}
        outs.append(torch.func.functional_call(module, local, tuple(a)))
    if not uses_carry:
        return sum(outs[1:], outs[0])
    y = sum((o[0] for o in outs[1:]), outs[0][0])
    carry = {}
    for k, v in outs[0][1].items():
        layout = plan.carry_layout(k)
        if layout is None:
            for o in outs[1:]:  # a replicated entry is computed alike on every rank
                torch.testing.assert_close(o[1][k], v, rtol=1e-6, atol=1e-7, msg=f"carry {k!r} differs across ranks")
            carry[k] = v
        else:
            carry[k] = _gather([o[1][k] for o in outs], layout, tp)
    return y, carry
