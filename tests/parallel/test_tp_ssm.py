"""The Mamba family's tensor-parallel plans beyond tests/parallel/test_tp_plans.py (which checks
them against the unsplit layers): their mid-region sums over ranks (``RegionPlan.partial_sums``)
are needed, their backward must sum every rank's gradient (not pass the rank's own through, as a
reduction before replicated work may), and sizes that do not split are refused by field."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from parallel.tensor import MIXER_PLANS
from pretrain.config import ConfigError, load_config
from tests.parallel import tp_reference
from tests.parallel.test_tp_plans import _M2, _block_inputs, _model, _run
LAYERS = {  # config, overrides, block index: a Mamba-1 layer (x_proj's dt/B/C) and a Mamba-2 one with
    # a single B/C group (the gated norm's group spans every rank)
    "mamba": ("configs/sambay_tiny.toml", [], 0),
    "mamba2": ("configs/mamba2_tiny.toml", _M2, 0),
}


def _layer(name: str, tp: int):
    path, overrides, index = LAYERS[name]
    model = _model(path, overrides)
    block = list(model.blocks.values())[index]
    with torch.no_grad():  # no D skip (x passed through, 1 at init): the output is all scan
        block.mixer.D.zero_()
    b, t = 2, 12
    ids = torch.randint(0, model.cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
    position_ids = torch.cat([torch.arange(5), torch.arange(7)]).expand(b, t)
    h, ctx, _ = _block_inputs(model, index, ids, position_ids)
    x = block.norm1(h).detach()
    plan = MIXER_PLANS[block.mixer_name](model.cfg, index, tp)
    return block.mixer, lambda: (x.clone().requires_grad_(), ctx, None), plan


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_partial_sums_are_needed(name):
    """Without the mid-region sum each rank computes with its own partial: a wrong output."""
    mixer, args, plan = _layer(name, 2)
    assert plan.partial_sums, name
    y0, _, _ = _run(mixer, args(), None, 2)
    y1, _, _ = _run(mixer, args(), dataclasses.replace(plan, partial_sums={}), 2)
    assert _rel(y1, y0) > 1e-2, name


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_partial_sum_backward_sums_every_ranks_gradient(name, monkeypatch):
    """A reduction whose backward keeps only the rank's own gradient (right before replicated
    work, wrong before rank-local work as here) gives the right output and wrong gradients."""
    mixer, args, plan = _layer(name, 2)
    y0, _, g0 = _run(mixer, args(), None, 2)
    summing = tp_reference._Rendezvous.hook

    def own_gradient_only(self, rank, span):
        total = summing(self, rank, span)
        return lambda t: t + (total(t) - t).detach()

    monkeypatch.setattr(tp_reference._Rendezvous, "hook", own_gradient_only)
    y1, _, g1 = _run(mixer, args(), plan, 2)
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-9)
    assert max(_rel(b, a) for a, b in zip(g0, g1) if a is not None) > 1e-2, name


@pytest.mark.parametrize(
    "mixer, overrides, tp, field",
    [
        ("mamba", ["model.layer_pattern=mamba"], 3, "model.mamba.expand"),  # 128 channels
        ("mamba2", _M2, 3, "model.mamba2.head_dim"),  # 8 heads
        # 24 heads in 6 groups over 4 ranks: a group neither fits a rank nor a whole number of them
        ("mamba2", ["model.d_model=96", "model.mamba2.head_dim=8", "model.mamba2.n_groups=6"], 4,
         "model.mamba2.n_groups"),
    ],
)
def test_plan_refuses_indivisible_sizes(mixer, overrides, tp, field):
    path = "configs/sambay_tiny.toml" if mixer == "mamba" else "configs/mamba2_tiny.toml"
    cfg = load_config(path, ["model.vocab_size=64", *overrides]).model
    with pytest.raises(ConfigError, match=field):
        MIXER_PLANS[mixer](cfg, 0, tp)
