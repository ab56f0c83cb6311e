"""Tensor-parallel plans of the Titans mixers 'mac', 'mag' and 'mal' (Behrouz et al. 2024).

The neural memory is per head up to its output projection: the q/k/v projections, their conv
taps, the theta/eta/alpha gates and the memory MLPs' initial weights ``init`` split by memory
heads (``model.titans.n_heads``), the per-head read norm is replicated (one weight shared by the
heads), and ``memory.out`` is row-parallel. Each rank runs its heads' test-time training, the
inner gradients and the dual-form reads inside its forward; those are per head (the memory loss
of a head involves only that head's keys, values and weights), so the outer autograd through them
is the unsplit one restricted to the rank's heads. The persistent-token attention splits by its
heads (``wq``, ``wk``, ``wv`` column-parallel over ``model.attention.n_heads``; the persistent
tokens, inputs of ``wk``/``wv``, replicated; ``wo`` row-parallel).

Where a variant consumes a whole projected result, it is summed over the ranks inside the region
(``partial_sums``, protocol in parallel/tensor/plan.py):

- 'mal': the memory's output is attention's input: ``memory`` sums its projected reads (one
  all-reduce of ``[B, T, d_model]``), then attention runs on the rank's heads.
- 'mac': per segment, the memory reads (``memory``: the context tokens' values ``h``, and with
  'per_token' the gating read) and the attention output ``W_o(o)`` that the memory is trained on
  (``""``, the mixer's own hook) are summed: 2 all-reduces of ``[B, L, d_model]`` per segment, 3
  with 'per_token'. The layer's output ``W_o(o) * gate`` keeps the rank's partial ``W_o(o)`` (the
  gate is whole on every rank), so it is the region's partial sum.
- 'mag': ``W_o(RMSNorm(o) * sigmoid(RMSNorm(m)))`` normalises over the WHOLE attention width,
  and each rank gates its attention heads with their columns of ``m``, the memory's reads summed
  over ALL memory heads. The memory splits by its heads as in 'mal' (``memory.out``
  row-parallel) and the mixer's ``scatter_partial`` (``scatter_partials={"": tp}``) reduce-scatters
  the partial ``m`` along its last dimension: each rank receives its ``[B, T, W / tp]`` columns
  (one reduce-scatter of ``[B, T, W]``, W the attention width; as the attention heads are
  contiguous, chunk r is rank r's heads' columns). The two norms, whose weights split with the
  attention heads, sum their sums of squares (``attn_norm``, ``gate_norm``: ``[B, T, 1]`` each).
  When the memory heads do not divide over the ranks (e.g. 4 memory heads at tp 8, which the 16
  attention heads of titans_mag_760m allow), the memory branch is REPLICATED instead (every rank
  runs all memory heads; ``pretrain plan`` counts those weights as whole) and ``memory.out`` is
  column-parallel over the attention width (``Shard(0)``: the rank's heads' columns of m, no
  reduce-scatter).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.distributed.tensor import Shard

from parallel.tensor.plan import MIXER_PLANS, RegionPlan, register_plan
from pretrain.config.errors import require

if TYPE_CHECKING:
    from pretrain.config import ModelConfig

_MEMORY_HEADS = {
    "memory.q_proj.weight": Shard(0),
    "memory.k_proj.weight": Shard(0),
    "memory.v_proj.weight": Shard(0),
    "memory.conv_weight": Shard(1),  # [3, H * D, K]
    "memory.conv_bias": Shard(1),  # [3, H * D]
    "memory.theta_proj.*": Shard(0),
    "memory.eta_proj.*": Shard(0),
    "memory.alpha_proj.*": Shard(0),
    "memory.init.*": Shard(0),  # [H, d_in, d_out] per memory layer
    "memory.out.weight": Shard(1),
}
_ATTENTION_HEADS = {
    "attn.wq.weight": Shard(0),
    "attn.wk.weight": Shard(0),
    "attn.wv.weight": Shard(0),
    "attn.wo.weight": Shard(1),
}


def _require_attention(cfg: ModelConfig, tp: int) -> None:
    heads = cfg.attention.n_heads
    require(heads % tp == 0, "model.attention.n_heads", f"{heads} heads do not split over parallel.tp={tp} ranks")


def _require_memory(cfg: ModelConfig, tp: int) -> None:
    heads = cfg.titans.n_heads
    require(heads % tp == 0, "model.titans.n_heads", f"{heads} memory heads do not split over parallel.tp={tp} ranks")


@register_plan(MIXER_PLANS, "mal")
def mal_plan(cfg: ModelConfig, layer_idx: int, tp: int) -> RegionPlan:
    """Memory and attention split by heads, the memory's output summed before attention."""
    _require_memory(cfg, tp)
    _require_attention(cfg, tp)
    return RegionPlan(params={**_MEMORY_HEADS, **_ATTENTION_HEADS}, partial_sums={"memory": tp})


@register_plan(MIXER_PLANS, "mac")
def mac_plan(cfg: ModelConfig, layer_idx: int, tp: int) -> RegionPlan:
    """Memory and attention split by heads; the memory reads and the attention output summed."""
    _require_memory(cfg, tp)
    _require_attention(cfg, tp)
    return RegionPlan(params={**_MEMORY_HEADS, **_ATTENTION_HEADS}, partial_sums={"memory": tp, "": tp})


@register_plan(MIXER_PLANS, "mag")
def mag_plan(cfg: ModelConfig, layer_idx: int, tp: int) -> RegionPlan:
    """Memory and attention split by heads; the memory's reads reduce-scattered to the rank's
    attention columns (the memory replicated, ``memory.out`` column-parallel, when its heads do
    not divide over tp), the two whole-width norms reducing their sums of squares."""
    _require_attention(cfg, tp)
    norms = {"attn_norm.weight": Shard(0), "gate_norm.weight": Shard(0)}
    sums = {"attn_norm": tp, "gate_norm": tp}
    if cfg.titans.n_heads % tp:
        return RegionPlan(params={**_ATTENTION_HEADS, "memory.out.weight": Shard(0), **norms}, partial_sums=sums)
    return RegionPlan(params={**_MEMORY_HEADS, **_ATTENTION_HEADS, **norms}, partial_sums=sums,
                      scatter_partials={"": tp})
