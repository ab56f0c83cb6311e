"""A single-process reference for tensor-parallel plans: run a mixer or FFN once per simulated
rank with that rank's local parameters and carry shards, and combine the ranks as the region's
exit does (outputs summed, sharded carry entries concatenated, replicated ones taken from rank
0). The local parameters are slices of the full ones, so autograd sums every rank's
contribution into the full parameters' gradients: the all-reduce of a replicated parameter's
gradient, for free. This checks a plan's mathematics without torch.distributed; the
distributed tests check the mechanism (parallel/tensor/region.py).

A plan with ``partial_sums`` (sums over ranks in mid-region, plan.py) runs its ranks in lockstep
threads, each on its own copy of the module whose ``reduce_partial`` hooks meet at a barrier and
add the partials of the rank's span with autograd: the forward sum, and a backward that sums every
rank's gradient into each partial (the all-reduce backward the protocol asks of region.py).
``scatter_partials`` hooks meet the same way and return the rank's chunk (last dimension) of its
block's sum: autograd then gives each partial the chunks' gradients side by side (the all-gather
backward of a reduce-scatter)."""

from __future__ import annotations

import copy
import threading
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


class _Rendezvous:
    """Where the simulated ranks' ``reduce_partial`` calls meet: every rank calls its hooks in
    the same order (same code), so the k-th calls of all ranks are the same reduction."""

    def __init__(self, tp: int) -> None:
        self.slots: list[Tensor | None] = [None] * tp
        self.barrier = threading.Barrier(tp, timeout=120)

    def hook(self, rank: int, span: int):
        def reduce_partial(t: Tensor) -> Tensor:
            self.slots[rank] = t
            self.barrier.wait()  # every rank's partial is in
            start = rank // span * span
            block = self.slots[start : start + span]
            total = sum(block[1:], block[0])
            self.barrier.wait()  # every rank has read its block before the slots are reused
            return total

        return reduce_partial

    def scatter_hook(self, rank: int, span: int):
        total = self.hook(rank, span)

        def scatter_partial(t: Tensor) -> Tensor:
            width = t.shape[-1] // span
            assert width * span == t.shape[-1], f"width {t.shape[-1]} does not split over {span} ranks"
            return total(t).narrow(-1, rank % span * width, width)

        return scatter_partial


def _run_in_lockstep(module: nn.Module, plan: RegionPlan, tp: int, calls: list[tuple[dict, tuple]]) -> list[Any]:
    """``functional_call(module, *calls[r])`` for every rank r, in threads whose module copies
    have ``plan.partial_sums``' and ``plan.scatter_partials``' hooks installed."""
    for name, span in [*plan.partial_sums.items(), *plan.scatter_partials.items()]:
        assert tp % span == 0, f"partial sum of {name!r} over {span} ranks does not tile tp={tp}"
    rendezvous, grad_enabled = _Rendezvous(tp), torch.is_grad_enabled()
    copies = [copy.deepcopy(module) for _ in range(tp)]
    for r, m in enumerate(copies):
        for name, span in plan.partial_sums.items():
            m.get_submodule(name).reduce_partial = rendezvous.hook(r, span)
        for name, span in plan.scatter_partials.items():
            m.get_submodule(name).scatter_partial = rendezvous.scatter_hook(r, span)
    outs: list[Any] = [None] * tp
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            with torch.set_grad_enabled(grad_enabled):  # grad mode is per thread
                outs[r] = torch.func.functional_call(copies[r], calls[r][0], calls[r][1])
        except BaseException as e:  # noqa: BLE001  (re-raised below)
            errors.append(e)
            rendezvous.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(tp)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)] or errors
    if first:
        raise first[0]
    return outs


def simulate_region(module: nn.Module, plan: RegionPlan, tp: int, args: tuple[Any, ...]) -> Any:
    """``module(*args)`` computed as ``tp`` tensor-parallel ranks would under ``plan``. With
    ``module.uses_carry`` the last argument is the carry dict and the result ``(y, carry)``."""
    uses_carry = getattr(module, "uses_carry", False)
    params = dict(module.named_parameters())
    calls = []
    for r in range(tp):
        local = {n: local_view(p, plan.layout(n), r, tp) for n, p in params.items()}
        a = list(args)
        if uses_carry:
            a[-1] = {k: local_view(v, plan.carry_layout(k), r, tp) for k, v in args[-1].items()}
        calls.append((local, tuple(a)))
    if plan.partial_sums or plan.scatter_partials:
        outs = _run_in_lockstep(module, plan, tp, calls)
    else:
        outs = [torch.func.functional_call(module, local, a) for local, a in calls]
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
