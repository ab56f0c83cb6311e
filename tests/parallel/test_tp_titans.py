"""Titans MAG's tensor-parallel plan beyond tests/parallel/test_tp_plans.py (which checks it
against the unsplit layer): its memory branch is split by memory heads, not replicated, and the
reduce-scatter of the memory's reads (``RegionPlan.scatter_partials``) is needed in the forward
(the rank's own partial is not the sum) and in the backward (each partial needs every rank's
chunk gradient)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.distributed.tensor import Shard

from parallel.tensor import MIXER_PLANS
from tests.parallel import tp_reference
from tests.parallel.test_tp_plans import CASES, _block_inputs, _check, _model, _run


def _mag(tp: int):
    """The 'mag' block of test_tp_plans' 'titans' case, its input and its plan at ``tp``."""
    model = _model(*CASES["titans"])
    index = [mixer for mixer, _ in model.cfg.pattern()].index("mag")
    block = list(model.blocks.values())[index]
    b, t = 2, 12
    ids = torch.randint(0, model.cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
    position_ids = torch.cat([torch.arange(5), torch.arange(7)]).expand(b, t)
    h, ctx, _ = _block_inputs(model, index, ids, position_ids)
    x = block.norm1(h).detach()
    plan = MIXER_PLANS["mag"](model.cfg, index, tp)
    return block.mixer, lambda: (x.clone().requires_grad_(), ctx, None), plan


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("tp", [2, 4])
def test_mag_memory_split_by_heads(tp):
    """Every memory parameter but the per-head read norm's shared weight is a Shard layout, and a
    rank holds 1/tp of the memory's weights."""
    mixer, _, plan = _mag(tp)
    memory = dict(mixer.memory.named_parameters(prefix="memory"))
    whole = {n for n in memory if plan.layout(n) is None}
    assert whole == {"memory.norm.weight"}, whole
    assert all(isinstance(plan.layout(n), Shard) for n in memory.keys() - whole)
    assert plan.layout("memory.out.weight") == Shard(1)  # row-parallel over the memory heads
    held = sum(tp_reference.local_view(p, plan.layout(n), 0, tp).numel() for n, p in memory.items())
    split = sum(p.numel() for n, p in memory.items() if n not in whole)
    assert held == split // tp + memory["memory.norm.weight"].numel()


def test_mag_fails_without_the_scatter():
    """Without the reduce-scatter each rank gets all W columns of its own partial: the check
    against the unsplit layer fails (the shapes of m and the rank's attention heads differ)."""
    mixer, args, plan = _mag(2)
    assert plan.scatter_partials == {"": 2}
    with pytest.raises((AssertionError, RuntimeError, ValueError)):  # ValueError: the norm's shape check
        _check(mixer, args, dataclasses.replace(plan, scatter_partials={}), 2, "mag without scatter")


def test_mag_scatter_must_sum_the_partials(monkeypatch):
    """Each rank taking its columns of its own partial (no sum over ranks): a wrong output."""
    mixer, args, plan = _mag(2)
    y0, _, _ = _run(mixer, args(), None, 2)

    def own_partial_only(self, rank, span):
        def scatter_partial(t):
            width = t.shape[-1] // span
            return t.narrow(-1, rank % span * width, width)

        return scatter_partial

    monkeypatch.setattr(tp_reference._Rendezvous, "scatter_hook", own_partial_only)
    y1, _, _ = _run(mixer, args(), plan, 2)
    assert _rel(y1, y0) > 1e-2


def test_mag_scatter_backward_gathers_every_ranks_gradient(monkeypatch):
    """A reduce-scatter whose backward gives each partial only its rank's chunk gradient (zeros
    elsewhere): the right output and wrong gradients of the memory's weights."""
    mixer, args, plan = _mag(2)
    y0, _, g0 = _run(mixer, args(), None, 2)
    scattering = tp_reference._Rendezvous.scatter_hook

    def own_chunk_gradient(self, rank, span):
        scatter = scattering(self, rank, span)

        def scatter_partial(t):
            width = t.shape[-1] // span
            own = t.narrow(-1, rank % span * width, width)
            return own + (scatter(t) - own).detach()

        return scatter_partial

    monkeypatch.setattr(tp_reference._Rendezvous, "scatter_hook", own_chunk_gradient)
    y1, _, g1 = _run(mixer, args(), plan, 2)
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-9)
    assert max(_rel(b, a) for a, b in zip(g0, g1) if a is not None) > 1e-2


def test_mag_memory_replicated_when_its_heads_do_not_split():
    """2 memory heads over 4 ranks: the memory runs whole on every rank, its output projection
    column-parallel over the attention width, and nothing is reduce-scattered (test_tp_plans'
    'titans_mag_mem2' case checks this plan against the unsplit layer)."""
    from pretrain.config import load_config

    cfg = load_config(CASES["titans_mag_mem2"][0], ["model.vocab_size=64", *CASES["titans_mag_mem2"][1]]).model
    split, whole = MIXER_PLANS["mag"](cfg, 0, 2), MIXER_PLANS["mag"](cfg, 0, 4)
    assert split.scatter_partials == {"": 2} and split.layout("memory.init.0") == Shard(0)
    assert not whole.scatter_partials and whole.layout("memory.init.0") is None
    assert whole.layout("memory.out.weight") == Shard(0)
