"""Tensor-parallel plans of Gated Linear Attention ('gla') and SambaY-GLA's memory layer ('gla_mem').

GLA (Yang et al. 2023) is per head from its projections to its output: every rank keeps a
contiguous chunk of the heads. The query, key, value and swish-output-gate projections and the
forget gate's up-projection (``gk_proj.1``, weight and bias: its output is per key channel, so per
head) are column-parallel; the forget gate's low-rank down-projection (``gk_proj.0``, d_model ->
gate_low_rank) is replicated, since every head's up-projection reads all of its output; the
output projection is row-parallel and has no bias. The output RMSNorm ``g_norm`` normalises each
head on its own (one weight of head_v_dim shared by the heads, as in fla), so it runs locally
and its weight is replicated (its gradient sums the heads of every rank). No collective is
needed inside the region.

'gla_mem' writes the raw per-head output ``o`` (before ``g_norm``) to ``carry["gmu_memory"]
[B, T, H * head_v_dim]``: heads are contiguous along dim 2, so the rank's shard is its own heads,
the ``Shard(2)`` layout the 'gmu' plan reads, and the GMU's gated norm groups (one per GLA head)
stay whole on a rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.distributed.tensor import Shard

from parallel.tensor.plan import MIXER_PLANS, RegionPlan, register_plan
from pretrain.config.errors import require
from pretrain.models.layers.gmu import MEMORY

if TYPE_CHECKING:
    from pretrain.config import ModelConfig

_GLA_PARAMS = {
    "q_proj.weight": Shard(0),
    "k_proj.weight": Shard(0),
    "v_proj.weight": Shard(0),
    "g_proj.weight": Shard(0),
    "gk_proj.1.*": Shard(0),  # forget-gate up-projection and its bias: per key channel
    "o_proj.weight": Shard(1),
}


@register_plan(MIXER_PLANS, "gla")
def gla_plan(cfg: ModelConfig, layer_idx: int, tp: int) -> RegionPlan:
    """Heads split over the ``tp`` ranks; raises ConfigError when ``model.gla.n_heads`` does not divide."""
    heads = cfg.gla.n_heads
    require(heads % tp == 0, "model.gla.n_heads", f"{heads} heads do not split over parallel.tp={tp} ranks")
    return RegionPlan(params=_GLA_PARAMS)


@register_plan(MIXER_PLANS, "gla_mem")
def gla_mem_plan(cfg: ModelConfig, layer_idx: int, tp: int) -> RegionPlan:
    """:func:`gla_plan`, and the memory it exports sharded by heads (``Shard(2)``)."""
    return RegionPlan(params=gla_plan(cfg, layer_idx, tp).params, sharded_carry={MEMORY: Shard(2)})
