"""The [parallel] section: how a run is spread over ranks (pipeline, data, tensor parallelism,
the data-parallel engine, activation checkpointing), and its checks that do not need the world
size (parallel.dims.ParallelDims checks those)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pretrain.config.errors import require, require_choice

PP_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble", "zbv")
"""parallel.pp_schedule values: torch.distributed.pipelining's ScheduleGPipe, Schedule1F1B,
ScheduleInterleaved1F1B, ScheduleInterleavedZeroBubble and ScheduleZBVZeroBubble."""


FULL_ATTENTION = ("attn", "attn_kv", "xattn", "diff_attn", "diff_attn_kv", "diff_xattn")
"""Mixers with causal attention over the whole sequence: their cost grows along it, so context
parallelism balances it by default (parallel.cp_load_balance)."""

CP_ATTENTION = ("allgather", "ring")
"""parallel.cp_attention values (see parallel.cp_attention)."""

AC_MODES = ("none", "full", "selective")
"""parallel.activation_checkpoint values (see parallel.activation_checkpoint)."""


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    """Data-parallel replicas (HSDP outer dimension)."""
    dp_shard: int = -1
    """FSDP2 sharding degree; -1 takes every rank not used by other dimensions."""
    pp: int = 1
    """Pipeline-parallel degree: ranks that each hold a contiguous part of the layers (the
    outermost mesh dimension); the world size is pp x dp_replicate x dp_shard."""
    pp_schedule: str = "gpipe"
    """Pipeline schedule: 'gpipe' (all forwards, then all backwards), '1f1b', 'interleaved_1f1b'
    and 'zero_bubble' (interleaved zero-bubble; both with pp_virtual_stages >= 2 stages per rank)
    or 'zbv' (zero-bubble V shape, exactly 2 stages per rank)."""
    pp_microbatches: int = 0
    """Micro-batches of train.micro_batch_size sequences that one pipeline round (one schedule
    step) runs; 0 means the number of stages, pp x pp_virtual_stages. Each data-parallel rank
    runs global_batch_size / (dp x micro_batch_size x pp_microbatches) rounds per optimizer step,
    accumulating their gradients, so train.global_batch_size must be a multiple of
    dp x micro_batch_size x pp_microbatches. '1f1b' needs pp_microbatches >= pp; the interleaved
    and zero-bubble schedules a multiple of max(1, pp_microbatches // pp) (torch's rounds).
    Unused when pp = 1: a step is then accumulation over global / (dp x micro_batch_size)
    micro-batches."""
    pp_virtual_stages: int = 1
    """Pipeline stages per rank: 1 for 'gpipe' and '1f1b', >= 2 for 'interleaved_1f1b' and
    'zero_bubble', exactly 2 for 'zbv'. The model is cut into pp x pp_virtual_stages stages."""
    tp: int = 1
    """Tensor-parallel degree (Megatron-style, Shoeybi et al. 2019): ranks that split every
    mixer's and FFN's heads or channels and the vocabulary between them (the innermost mesh
    dimension: the fastest links). Each layer type's split is a plan in parallel/tensor; the
    heads, KV heads, groups and widths it splits must divide by tp. The world size is
    pp x dp_replicate x dp_shard x tp."""
    sequence_parallel: bool = True
    """With tp > 1, also split the hidden states between the tensor-parallel regions (norms,
    residual adds) along the sequence (Korthikanti et al. 2022): activation memory / tp there,
    the same communication volume (all-gather + reduce-scatter instead of all-reduce).
    data.seq_len must then divide by tp. Unused when tp = 1."""
    pp_split: list = field(default_factory=list)
    """Explicit cut points, where every stage but the first starts, increasing, pp x
    pp_virtual_stages - 1 of them: a layer index L in (0, model.n_layers) (before block L), or
    the string "L.ffn" (inside block L, between its mixer half and its FFN half; the block must
    have an FFN). E.g. [6, 12] makes three stages starting at layers 0, 6 and 12; [6, "12.ffn"]
    cuts the third one after block 12's mixer. Parameter names do not depend on the cuts.
    Empty: cut where the estimated cost is balanced, at half-block granularity (see
    parallel.pipeline.split)."""
    cp: int = 1
    """Context-parallel degree: ranks that split every sequence between them along its tokens
    (parallel/context.py): activation memory / cp. Each mixer exchanges only what crosses the
    cut: the recurrent mixers one state per layer, windows and convolutions a halo, full
    attention the gathered keys/values, Titans its memory relayed rank to rank. The mesh
    dimension between data and tensor parallelism; data.seq_len must divide into cp segments
    (2 cp with cp_load_balance). The world size is pp x dp_replicate x dp_shard x cp x tp."""
    cp_load_balance: Any = "auto"
    """With cp > 1: cut each sequence into 2 cp segments and give rank r segments r and
    2 cp - 1 - r (the head-tail / zig-zag split), so causal full attention costs every rank the
    same. true, false, or 'auto': on when the pattern has causal full attention ('attn',
    'attn_kv', 'xattn' and their differential forms)."""
    cp_attention: str = "allgather"
    """How full attention ('attn', 'attn_kv', 'xattn' and their differential forms) runs with
    cp > 1. 'allgather': each layer all-gathers the keys/values once and keeps the whole
    sequence's for its backward (memory grows with T, not T / cp). 'ring': ring attention (Liu
    et al. 2023): each rank keeps only its own keys/values, which travel around the cp ranks
    block by block (cp - 1 hops per forward; the backward circulates them again with their
    gradients), so every full-attention layer holds O(T / cp); a SambaY cross-attention layer
    then rings the shared local keys/values itself (its traffic per layer, instead of once for
    all cross layers). Differential attention rings twice per layer (its two softmax maps)."""
    ep: int = 1
    """Expert-parallel degree: the routed experts of every MoE layer are sharded over groups of
    ep data-parallel ranks, tokens reaching them by all-to-all (parallel/expert.py). Must divide
    model.moe.n_experts; 1: every rank holds all experts."""
    dp_backend: str = "fsdp"
    """Data-parallel engine: 'fsdp' (torch FSDP2, HSDP with dp_replicate > 1) or 'deepspeed'
    (DeepSpeed ZeRO over all ranks, Rajbhandari et al. 2020; the optional `deepspeed` extra).
    Both train the same model, config, metrics and checkpoint layout; 'deepspeed' takes no
    pipeline stages and no dp_replicate > 1."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage (with dp_backend='deepspeed'): 1 shards the optimizer state, 2 also
    the gradients, 3 also the parameters (as FSDP does)."""
    zero_offload: bool = False
    """DeepSpeed ZeRO: keep the optimizer state and step on the CPU (ZeRO-Offload,
    Ren et al. 2021), trading step time for accelerator memory."""
    activation_checkpoint: str = "none"
    """Activation checkpointing of every block (torchtitan's AC): 'none'; 'full' keeps only each
    block's inputs and recomputes the whole block in the backward pass (least memory, about one
    more forward of compute); 'selective' keeps the outputs of the matrix multiplies and fused
    attention and recomputes the rest (pointwise ops, norms, scans). Numerics and parameter
    names are unchanged, so checkpoints load across settings (see parallel.activation_checkpoint)."""

    def load_balanced(self, pattern: list[tuple[str, str]]) -> bool:
        """cp_load_balance resolved for the model's (mixer, ffn) ``pattern``."""
        if self.cp_load_balance == "auto":
            return any(mixer in FULL_ATTENTION for mixer, _ in pattern)
        return bool(self.cp_load_balance)

    def cp_segments(self, pattern: list[tuple[str, str]]) -> int:
        """Segments each sequence is cut into: cp, or 2 cp with load balancing (1 without cp)."""
        if self.cp == 1:
            return 1
        return 2 * self.cp if self.load_balanced(pattern) else self.cp

    @property
    def n_stages(self) -> int:
        """Pipeline stages over all ranks: pp x pp_virtual_stages."""
        return self.pp * self.pp_virtual_stages

    @property
    def sp(self) -> bool:
        """Whether sequence parallelism is on: sequence_parallel and tp > 1."""
        return self.tp > 1 and self.sequence_parallel

    @property
    def microbatches(self) -> int:
        """pp_microbatches with its default (0: the number of stages) resolved."""
        return self.pp_microbatches or self.n_stages


def validate_parallel(
    p: ParallelConfig, n_layers: int, pattern: list[tuple[str, str]] | None = None, n_experts: int = 0
) -> None:
    """Checks of the [parallel] section that do not depend on the world size (those are in
    parallel.dims.ParallelDims.from_config); raises ConfigError naming the field. ``pattern``
    (``ModelConfig.pattern()``): when given, an "L.ffn" cut must name a block with an FFN, and
    parallel.ep needs MoE layers whose ``n_experts`` it divides. The schedule
    limits mirror torch.distributed.pipelining's schedule constructors."""
    require(p.dp_replicate >= 1, "parallel.dp_replicate", "must be >= 1")
    require(p.dp_shard == -1 or p.dp_shard >= 1, "parallel.dp_shard", "must be -1 or >= 1")
    require(p.pp >= 1, "parallel.pp", "must be >= 1")
    require(isinstance(p.tp, int) and p.tp >= 1, "parallel.tp", "must be an integer >= 1")
    require(isinstance(p.sequence_parallel, bool), "parallel.sequence_parallel", "must be true or false")
    require_choice(p.dp_backend, "parallel.dp_backend", ("fsdp", "deepspeed"))
    require(p.zero_stage in (1, 2, 3), "parallel.zero_stage", f"must be 1, 2 or 3, got {p.zero_stage!r}")
    if p.dp_backend == "deepspeed":
        require(p.pp == 1, "parallel.dp_backend", "'deepspeed' runs no pipeline stages; set parallel.pp = 1")
        require(p.dp_replicate == 1, "parallel.dp_backend",
                "'deepspeed' shards over all ranks; set parallel.dp_replicate = 1")
        require(p.tp == 1, "parallel.dp_backend", "'deepspeed' runs no tensor parallelism; set parallel.tp = 1")
    require_choice(p.pp_schedule, "parallel.pp_schedule", PP_SCHEDULES)
    require_choice(p.activation_checkpoint, "parallel.activation_checkpoint", AC_MODES)
    v = p.pp_virtual_stages
    require(v >= 1, "parallel.pp_virtual_stages", "must be >= 1")
    if p.pp_schedule in ("gpipe", "1f1b"):
        require(v == 1, "parallel.pp_virtual_stages", f"must be 1 for pp_schedule={p.pp_schedule!r}, got {v}")
    elif p.pp_schedule == "zbv":
        require(v == 2, "parallel.pp_virtual_stages", f"must be 2 for pp_schedule='zbv', got {v}")
    else:
        require(v >= 2, "parallel.pp_virtual_stages", f"must be >= 2 for pp_schedule={p.pp_schedule!r}, got {v}")
    require(
        p.n_stages <= n_layers,
        "parallel.pp",
        f"pp x pp_virtual_stages = {p.pp} x {v} stages exceed the model.n_layers={n_layers} layers",
    )
    require(isinstance(p.cp, int) and p.cp >= 1, "parallel.cp", "must be an integer >= 1")
    require(isinstance(p.cp_load_balance, bool) or p.cp_load_balance == "auto", "parallel.cp_load_balance",
            f"must be true, false or 'auto', got {p.cp_load_balance!r}")
    require_choice(p.cp_attention, "parallel.cp_attention", CP_ATTENTION)
    if p.cp > 1:
        require(p.dp_backend == "fsdp", "parallel.cp", "context parallelism runs with parallel.dp_backend='fsdp'")
    require(p.ep >= 1, "parallel.ep", "must be >= 1")
    if pattern is not None and p.ep > 1:
        has_moe = any(ffn in ("moe", "moe_gru") for _, ffn in pattern)
        require(has_moe, "parallel.ep", f"{p.ep} needs MoE layers ('moe' or 'moe_gru' in model.layer_pattern)")
        require(n_experts % p.ep == 0, "parallel.ep", f"{p.ep} does not divide model.moe.n_experts={n_experts}")
    require(p.pp_microbatches >= 0, "parallel.pp_microbatches", "must be >= 0 (0: the number of stages)")
    m = p.microbatches
    if p.pp_schedule == "1f1b":
        require(m >= p.pp, "parallel.pp_microbatches", f"'1f1b' needs at least pp={p.pp} micro-batches, got {m}")
    elif p.pp_schedule in ("interleaved_1f1b", "zero_bubble"):
        rounds = max(1, m // p.pp)
        require(
            m % rounds == 0,
            "parallel.pp_microbatches",
            f"{p.pp_schedule!r} needs a multiple of its max(1, {m} // pp) = {rounds} rounds, got {m}",
        )
    cuts = p.pp_split
    if cuts:
        for c in cuts:
            require(_is_cut(c), "parallel.pp_split", f"{c!r} is neither a layer index nor an 'L.ffn' string")
        require(
            len(cuts) == p.n_stages - 1,
            "parallel.pp_split",
            f"{len(cuts)} cut points for pp x pp_virtual_stages = {p.n_stages} stages (needs {p.n_stages - 1})",
        )
        units = [split_position(c) for c in cuts]
        require(
            all(0 < u < 2 * n_layers for u in units) and all(a < b for a, b in zip(units, units[1:])),
            "parallel.pp_split",
            f"{cuts} must be increasing and inside (0, model.n_layers={n_layers})",
        )
        for c, u in zip(cuts, units):
            require(not (u % 2 and pattern and pattern[u // 2][1] == "none"), "parallel.pp_split",
                    f"{c!r} cuts before the FFN of a block without one")


def _is_cut(cut: Any) -> bool:
    if isinstance(cut, str):
        layer, dot, half = cut.partition(".")
        return bool(dot) and half == "ffn" and layer.isascii() and layer.isdigit()
    return isinstance(cut, int) and not isinstance(cut, bool)


def split_position(cut: int | str) -> int:
    """Half-block position of a parallel.pp_split cut point: a layer index L (the stage starts
    at block L) -> 2L; "L.ffn" (the stage starts between block L's mixer half and its FFN half)
    -> 2L + 1. Raises ValueError on any other value."""
    if not _is_cut(cut):
        raise ValueError(f"cut point {cut!r} is neither a layer index nor 'L.ffn'")
    return 2 * cut if isinstance(cut, int) else 2 * int(cut.partition(".")[0]) + 1
