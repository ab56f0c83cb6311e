"""Tensor-parallel plans of the attention family, SambaY's GMU and the SwiGLU MLP.

Attention (full, sliding-window, differential; SambaY's K/V-sharing and cross-attention layers):
queries column-parallel by heads, keys/values by KV heads (replicated, each rank using the KV
head its queries read, when there are fewer KV heads than ranks: Megatron's way), the output
projection row-parallel. Differential attention pairs heads 2i and 2i+1, so its shards hold whole
pairs; its lambdas and per-pair norm are replicated. The K/V that 'attn_kv' shares are per-rank
head shards, exactly the heads the cross-attention layers' queries on that rank read.

GMU: ``y = W2(m ⊙ SiLU(W1 x))`` with ``W1`` column-parallel over the memory width and ``W2``
row-parallel; the memory ``m`` is the producing layer's inner activation sharded the same way
(see the Mamba/GLA plans); the optional gated norm normalises whole groups on one rank.

SwiGLU: gate and up projections column-parallel, down projection row-parallel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.distributed.tensor import Shard

from parallel.tensor.plan import FFN_PLANS, MIXER_PLANS, RegionPlan, group_layout, register_plan
from pretrain.config.errors import require
from pretrain.models.layers.gmu import MEMORY, SHARED_K, SHARED_V, memory_layout
from pretrain.models.layers.mlp import ffn_hidden

if TYPE_CHECKING:
    from pretrain.config import ModelConfig


def _attention(cfg: ModelConfig, layer_idx: int, tp: int, pair: int) -> RegionPlan:
    """Heads in units of ``pair`` (2 for differential attention)."""
    a = cfg.attention
    heads, kv_heads = a.n_heads // pair, (a.n_kv_heads or a.n_heads) // pair
    what = "head pairs" if pair == 2 else "heads"
    require(heads % tp == 0, "model.attention.n_heads", f"{heads} {what} do not split over parallel.tp={tp} ranks")
    require(
        kv_heads % tp == 0 or tp % kv_heads == 0,
        "model.attention.n_kv_heads",
        f"{kv_heads} KV {what} neither split over nor evenly replicate on parallel.tp={tp} ranks",
    )
    kv = group_layout(0, kv_heads, tp)
    shared = group_layout(2, kv_heads, tp)  # [B, S, H_kv, D]: heads are dim 2
    return RegionPlan(
        params={"wq.weight": Shard(0), "wk.weight": kv, "wv.weight": kv, "wo.weight": Shard(1)},
        sharded_carry={SHARED_K: shared, SHARED_V: shared},
    )


@register_plan(MIXER_PLANS, "attn", "swa", "attn_kv", "xattn")
def attention_plan(cfg: ModelConfig, layer_idx: int, tp: int) -> RegionPlan:
    return _attention(cfg, layer_idx, tp, 1)


@register_plan(MIXER_PLANS, "diff_attn", "diff_swa", "diff_attn_kv", "diff_xattn")
def diff_attention_plan(cfg: ModelConfig, layer_idx: int, tp: int) -> RegionPlan:
    return _attention(cfg, layer_idx, tp, 2)


@register_plan(MIXER_PLANS, "gmu")
def gmu_plan(cfg: ModelConfig, layer_idx: int, tp: int) -> RegionPlan:
    width, group = memory_layout(cfg, layer_idx)
    groups = width // group if group else width
    require(
        groups % tp == 0 or (group and tp % groups == 0),
        "parallel.tp",
        f"{tp} neither divides nor is a multiple of the GMU memory's {groups} channel groups",
    )
    # a norm group spread over several ranks sums its squares over them (see plan.py)
    spread = {"norm": tp // groups} if groups % tp else {}
    return RegionPlan(
        params={"in_proj.weight": Shard(0), "norm.weight": Shard(0), "out_proj.weight": Shard(1)},
        sharded_carry={MEMORY: Shard(2)},  # [B, T, d_mem]
        partial_sums=spread,
    )


@register_plan(FFN_PLANS, "mlp")
def mlp_plan(cfg: ModelConfig, layer_idx: int, tp: int) -> RegionPlan:
    hidden = ffn_hidden(cfg)
    require(hidden % tp == 0, "model.ffn_hidden", f"{hidden} does not split over parallel.tp={tp} ranks")
    return RegionPlan(params={"w1.weight": Shard(0), "w3.weight": Shard(0), "w2.weight": Shard(1)})
