"""Tensor-parallel plans of the Mixture-of-Experts FFNs 'moe' and 'moe_gru' (RMoE).

Every expert is split WITHIN itself over the ``tp`` ranks, the way Megatron-LM splits the
experts of a layer without expert parallelism (its ``moe_extended_tp``): each expert's gate and
up projections ``w1, w3 [E, d, H]`` column-parallel over the expert hidden width H, its down
projection ``w2 [E, H, d]`` row-parallel, so rank r computes SwiGLU over hidden units
``[r H/tp, (r+1) H/tp)`` of every expert and the layer's output is a partial sum over ranks.
The optional shared expert is split like the dense SwiGLU MLP.

The router (``router`` for 'moe'; ``router_in``/``router_out`` for 'moe_gru') is replicated and
runs on the full, replicated input, so every rank routes every token identically: the same
``expert_idx`` and routing weights, the same load-balancing and z-loss in ``carry["aux_loss"]``,
the same detached load ``carry["metric/moe_load.<block>"]`` and, for RMoE, the same GRU state
``carry["router_h"]`` (the shared GRU's weights arrive in the carry from ``model.router_gru``
and are replicated too). These carry entries are therefore replicated, not sharded: a
region's exit must take them from one rank (or scale their gradient by 1/tp), not sum them.

With expert parallelism (parallel.ep > 1, :func:`expert_parallel_moe_plan`) the experts are
instead sharded over 'ep' and kept WHOLE on every tp rank (torchtitan's and Megatron-LM's
default, expert tensor parallel size 1): the plan leaves ``w1, w3, w2`` replicated, and
parallel/expert.py splits the ROWS: every tp rank holds the same (replicated) tokens, routes them
alike, and dispatches only its contiguous ``1/tp`` of the expert-sorted rows over its ep group
(the ranks with its tp coordinate), returning zeros for the other rows. The routed output is
then a partial sum over the tp ranks exactly like the hidden-split one above, so the region's
exit (a sum over tp) and backward stay as they are: each expert weight's gradient is the sum of
the tp ranks' rows' parts, which the region's all-reduce of a replicated parameter's gradient
forms. The shared expert is split as without ep.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.distributed.tensor import Shard

from parallel.tensor.plan import FFN_PLANS, RegionPlan, register_plan
from pretrain.config.errors import require
from pretrain.models.layers.mlp import ffn_hidden

if TYPE_CHECKING:
    from pretrain.config import ModelConfig


SHARED_EXPERT = {"shared.w1.weight": Shard(0), "shared.w3.weight": Shard(0), "shared.w2.weight": Shard(1)}
"""The shared expert (nn.Linear weights [H, d] / [d, H]) split like the dense SwiGLU MLP."""


@register_plan(FFN_PLANS, "moe", "moe_gru")
def moe_plan(cfg: ModelConfig, layer_idx: int, tp: int) -> RegionPlan:
    """Experts (and the shared expert) split over their hidden width; router replicated.
    Raises ConfigError when the expert hidden width does not divide over ``tp``."""
    hidden = cfg.moe.expert_hidden or ffn_hidden(cfg)
    field = "model.moe.expert_hidden" if cfg.moe.expert_hidden else "model.ffn_hidden"
    require(hidden % tp == 0, field, f"the expert hidden width {hidden} does not split over parallel.tp={tp} ranks")
    return RegionPlan(
        params={
            "w1": Shard(2),  # [E, d, H]
            "w3": Shard(2),
            "w2": Shard(1),  # [E, H, d]
            **SHARED_EXPERT,
        }
    )


def expert_parallel_moe_plan(cfg: ModelConfig, layer_idx: int, tp: int) -> RegionPlan:
    """The plan of an MoE FFN whose experts parallel.ep > 1 shards (module docstring): experts
    and router replicated over tp, the shared expert split over its hidden width. Raises
    ConfigError when the shared expert's hidden width does not divide over ``tp``."""
    if cfg.moe.shared_expert:
        hidden = cfg.moe.expert_hidden or ffn_hidden(cfg)
        field = "model.moe.expert_hidden" if cfg.moe.expert_hidden else "model.ffn_hidden"
        require(hidden % tp == 0, field, f"the shared expert's width {hidden} does not split over parallel.tp={tp}")
    return RegionPlan(params=SHARED_EXPERT)


EXPERT_PARALLEL_FFN_PLANS = {"moe": expert_parallel_moe_plan, "moe_gru": expert_parallel_moe_plan}
"""FFN plans that replace :data:`~parallel.tensor.plan.FFN_PLANS`' with parallel.ep > 1."""
