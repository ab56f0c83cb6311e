"""MoE under context parallelism with the ranks simulated in one process: each rank's balance
loss uses the expert load f and mean router probability P of the WHOLE sequences (summed over
the ranks by ``SequenceSplit.all_sum``), so every rank's aux loss and logged load equal one
process's, and the trainer's mean over the cp ranks of their gradients equals one process's."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import MoEConfig
from pretrain.models.context import ForwardContext
from pretrain.models.layers.moe import MoE, RouterGRU
from pretrain.models.sequence_split import SequenceSplit, load_balanced_segments

pytestmark = pytest.mark.usefixtures("one_thread")

CP, B, T, D = 2, 2, 16, 8


class _Rank(SequenceSplit):
    """Rank ``rank`` of a load-balanced cp-2 split whose all_sum is a plain, differentiable sum
    over the ranks' tensors: the other rank's, recorded live (with its graph) in a first pass.
    Differentiating both ranks' losses together then hands each rank's tensor the sum of both
    ranks' gradients, which is what an all-reduce backward does."""

    def __init__(self, rank: int, others: list[torch.Tensor] | None) -> None:
        super().__init__(2 * CP, load_balanced_segments(CP, rank, True))
        self.others, self.seen = others, []

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return x if self.others is None else x + self.others[len(self.seen) - 1]


def _forward(moe, x, carry, split=None):
    """Mean of ``(y * w).sum(-1)`` over the rows' tokens (a stand-in for the LM loss), the aux
    loss and the logged load."""
    pos = torch.zeros(x.shape[:2], dtype=torch.long)
    y, out = moe(x, ForwardContext(positions=pos, cp=split), dict(carry))
    w = torch.linspace(-1, 1, D)
    return (y * w).sum(-1).mean(), out["aux_loss"], out["metric/moe_load.0"]


@pytest.mark.parametrize("recurrent", [False, True])
@pytest.mark.parametrize("balance,z_loss", [("per_layer", 0.0), ("global", 0.0), ("per_layer", 0.01)])
def test_moe_statistics_and_gradients_of_the_whole_sequence(recurrent, balance, z_loss):
    torch.manual_seed(0)
    cfg = MoEConfig(n_experts=4, top_k=2, router_hidden=6, aux_loss_coef=0.5, balance=balance, z_loss_coef=z_loss)
    moe = MoE(D, 12, cfg, "0", recurrent)
    moe.init_weights(0.5, 0.5)
    gru = RouterGRU(6)
    gru.init_weights()
    carry = gru.carry() if recurrent else {}
    params = [*moe.parameters(), *gru.parameters()]
    x = torch.randn(B, T, D)

    lm, aux, load = _forward(moe, x, carry)
    ref_grads = torch.autograd.grad(lm + aux, params, allow_unused=True)

    firsts = [_Rank(r, None) for r in range(CP)]
    for split in firsts:
        _forward(moe, split.shard(x), carry, split)
    total, auxes = 0, []
    for r in range(CP):
        split = _Rank(r, firsts[1 - r].seen)
        lm_r, aux_r, load_r = _forward(moe, split.shard(x), carry, split)
        torch.testing.assert_close(load_r, load, rtol=0, atol=0)
        if z_loss == 0:  # the z-loss is a per-token mean: each rank's is its own tokens'
            torch.testing.assert_close(aux_r, aux, rtol=1e-6, atol=0)
        auxes.append(aux_r)
        total = total + (lm_r + aux_r) / CP  # the trainer averages the cp ranks' gradients
    torch.testing.assert_close(sum(auxes) / CP, aux, rtol=1e-6, atol=0)
    grads = torch.autograd.grad(total, params, allow_unused=True)
    for p, g, ref in zip(params, grads, ref_grads):
        if ref is None:
            assert g is None
            continue
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)
