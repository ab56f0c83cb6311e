"""Tensor-parallel plans of the Mamba family: 'mamba', 'mamba_mem', 'mamba2', 'mamba2_mem'.

Mamba-1 (Gu & Dao 2023): the inner channels split over the ranks. ``in_proj_x``/``in_proj_z``
are column-parallel, the depthwise conv, ``dt_proj`` (weight and bias), ``A_log`` and ``D`` are
per channel and split with them, ``out_proj`` is row-parallel. ``x_proj`` maps the inner channels
to the low-rank dt and to B and C, which every channel needs: it is row-parallel (its input dim
split), so each rank's product is a partial sum, which the layer all-reduces mid-region through
its ``reduce_partial`` hook (``partial_sums={"": tp}``; protocol in plan.py): a
[B, T, dt_rank + 2 d_state] all-reduce per layer, forward and backward.

Mamba-2 (Dao & Gu 2024): heads split over the ranks (``in_proj_z/x/dt``, the x conv, ``dt_bias``,
``A_log``, ``D``, the norm weight column-wise, ``out_proj`` row-wise). B and C (``in_proj_B/C``
and their convs) split by groups when ``n_groups`` divides over the ranks, else stay whole on
every rank, which uses the group its heads read (GroupSlice, as Megatron-LM's Mamba mixer).
The gated RMSNorm normalises per group: whole groups on a rank need nothing; when a group spans
``tp / n_groups`` ranks (n_groups = 1: the whole inner width) its sum of squares is all-reduced
over those ranks (``partial_sums={"norm": tp // n_groups}``, a [B, T, 1] tensor per layer).

The memory layers also export their scan output ``carry["gmu_memory"] [B, T, d_inner]``: per-rank
channel shards (``Shard(2)``), the shards the 'gmu' plan reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.distributed.tensor import Shard

from parallel.tensor.plan import MIXER_PLANS, RegionPlan, group_layout, register_plan
from pretrain.config.errors import require
from pretrain.models.layers.gmu import MEMORY

if TYPE_CHECKING:
    from pretrain.config import ModelConfig


def _memory(cfg: ModelConfig, layer_idx: int) -> dict:
    return {MEMORY: Shard(2)} if cfg.pattern()[layer_idx][0].endswith("_mem") else {}


@register_plan(MIXER_PLANS, "mamba", "mamba_mem")
def mamba_plan(cfg: ModelConfig, layer_idx: int, tp: int) -> RegionPlan:
    d_inner = cfg.mamba.expand * cfg.d_model
    require(
        d_inner % tp == 0, "model.mamba.expand", f"inner width {d_inner} does not split over parallel.tp={tp} ranks"
    )
    channels = ("in_proj_x.weight", "in_proj_z.weight", "conv1d.*", "dt_proj.*", "A_log", "D")
    return RegionPlan(
        params={**dict.fromkeys(channels, Shard(0)), "x_proj.weight": Shard(1), "out_proj.weight": Shard(1)},
        sharded_carry=_memory(cfg, layer_idx),
        partial_sums={"": tp},  # x_proj's dt, B, C
    )


@register_plan(MIXER_PLANS, "mamba2", "mamba2_mem")
def mamba2_plan(cfg: ModelConfig, layer_idx: int, tp: int) -> RegionPlan:
    m = cfg.mamba2
    heads, groups = m.expand * cfg.d_model // m.head_dim, m.n_groups
    require(heads % tp == 0, "model.mamba2.head_dim", f"{heads} heads do not split over parallel.tp={tp} ranks")
    require(
        groups % tp == 0 or tp % groups == 0,
        "model.mamba2.n_groups",
        f"{groups} B/C groups neither split over nor evenly replicate on parallel.tp={tp} ranks",
    )
    per_head = ("in_proj_z.weight", "in_proj_x.weight", "in_proj_dt.weight", "conv1d_x.*", "dt_bias", "A_log", "D")
    bc = ("in_proj_B.weight", "in_proj_C.weight", "conv1d_B.*", "conv1d_C.*")
    return RegionPlan(
        params={
            **dict.fromkeys(per_head, Shard(0)),
            **dict.fromkeys(bc, group_layout(0, groups, tp)),
            "norm.weight": Shard(0),
            "out_proj.weight": Shard(1),
        },
        sharded_carry=_memory(cfg, layer_idx),
        partial_sums={} if groups % tp == 0 else {"norm": tp // groups},
    )
