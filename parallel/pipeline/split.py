"""Cost-balanced pipeline stage split: where to cut the layer stack into pp x virtual stages.

The split runs over half-blocks: a stage may also start between a block's mixer half and its
FFN half (the cut point "L.ffn", see parallel/pipeline/stage.py), so that equal layers plus a
large head still balance (whole blocks leave RMoE at pp=4 with 1.2 x the mean on one stage).
A half-block's cost is its training FLOPs per token (:func:`pretrain.models.stats.block_flops`
of the mixer half alone: 6 x its matmul weights plus its sequence terms; the FFN half's is the
rest of the block's, e.g. MoE's active experts); a block without FFN is one unit. The first stage
also pays the embedding (a lookup: no FLOPs counted, as in ``flops_per_token``) and the last one
the final norm, head and loss (6 x d_model x vocab per token; the loss's elementwise softmax is
negligible beside it). Optionally a ``memory_weight`` w in [0, 1] balances
(1 - w) x FLOPs share + w x activation-memory share instead: w = 0 (the default) balances time,
which is what bounds a pipeline's throughput; w > 0 trades some of it for evener activation
memory (e.g. a head whose fp32 logits dominate one stage's memory).

The cut points minimise the largest stage cost over all contiguous partitions of the units (the
bottleneck that sets a synchronous pipeline's step time), exactly, by dynamic programming. Among
the partitions that reach it, the smallest sum of squared stage costs wins (the evenest spread
of the rest), then the lexicographically smallest cut points, so the split is deterministic.
Costs are rounded to integers first so that ties are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from parallel.pipeline.schedule import stage_ranks
from parallel.pipeline.stage import position_cut, shared_holders
from pretrain.config import split_position
from pretrain.models.hybrid import HybridLM
from pretrain.models.layers.moe import GRU_KEYS
from pretrain.models.stats import block_activation_elements, block_flops, head_activation_elements, head_flops

if TYPE_CHECKING:
    from pretrain.config import ModelConfig, ParallelConfig

_INF = float("inf")


def stage_cost(costs: Sequence[int], start: int, end: int, first_extra: int = 0, last_extra: int = 0) -> int:
    """Cost of the stage holding blocks ``[start, end)`` of ``costs``, plus ``first_extra`` when
    it starts at block 0 and ``last_extra`` when it ends at the last block."""
    return sum(costs[start:end]) + (first_extra if start == 0 else 0) + (last_extra if end == len(costs) else 0)


def balanced_cuts(costs: Sequence[int], n_stages: int, first_extra: int = 0, last_extra: int = 0) -> list[int]:
    """Cut points (the first block of stages 1 .. n_stages - 1) of the contiguous partition of
    ``costs`` (one non-negative integer per block) into ``n_stages`` non-empty stages whose
    largest :func:`stage_cost` is smallest; ties: smallest sum of squared stage costs, then the
    lexicographically smallest cuts. Exact: O(n_stages x len(costs)^2) dynamic programming
    (the linear partition problem). Raises ValueError unless 1 <= n_stages <= len(costs)."""
    n = len(costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot cut {n} blocks into {n_stages} non-empty stages")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + int(c))

    def cost(i: int, j: int) -> int:
        return prefix[j] - prefix[i] + (first_extra if i == 0 else 0) + (last_extra if j == n else 0)

    # best[s][i]: smallest bottleneck of blocks i.. in s stages (suffix problems)
    best = [[_INF] * (n + 1) for _ in range(n_stages + 1)]
    for i in range(n):
        best[1][i] = cost(i, n)
    for s in range(2, n_stages + 1):
        for i in range(n - s + 1):
            best[s][i] = min(max(cost(i, j), best[s - 1][j]) for j in range(i + 1, n - s + 2))
    bound = best[n_stages][0]

    # squares[s][i]: smallest sum of squared stage costs of blocks i.. in s stages under the bound
    squares = [[_INF] * (n + 1) for _ in range(n_stages + 1)]
    for i in range(n):
        if cost(i, n) <= bound:
            squares[1][i] = cost(i, n) ** 2
    for s in range(2, n_stages + 1):
        for i in range(n - s + 1):
            squares[s][i] = min(
                (cost(i, j) ** 2 + squares[s - 1][j] for j in range(i + 1, n - s + 2) if cost(i, j) <= bound),
                default=_INF,
            )
    cuts, i = [], 0
    for s in range(n_stages, 1, -1):  # the first (smallest) cut that stays optimal
        i = next(
            j for j in range(i + 1, n - s + 2)
            if cost(i, j) <= bound and cost(i, j) ** 2 + squares[s - 1][j] == squares[s][i]
        )
        cuts.append(i)
    return cuts


@dataclass(frozen=True)
class Stage:
    """One pipeline stage of a :class:`PipelineSplit`."""

    index: int
    rank: int
    layers: range
    """Block indices (module names ``blocks.<i>``) of which the stage holds at least one half:
    the first and the last may be held only in part (see ``units``)."""
    units: range
    """Half-block positions the stage holds: 2L is block L's mixer half (norm1, mixer), 2L + 1
    its FFN half (norm2, ffn)."""
    params: int
    """Parameters it owns; a parameter shared with other stages counts on its first stage only."""
    flops_per_token: float
    """Training (forward + backward) FLOPs per token."""
    activation_bytes: float
    """Activations one micro-batch keeps for its backward (without activation checkpointing)."""

    @property
    def span(self) -> str:
        """The held blocks as text, a half block marked: '0-5', '3-6.mixer', '7.ffn-11', '4.ffn'."""
        a, b = self.units.start, self.units.stop
        start = f"{a // 2}.ffn" if a % 2 else f"{a // 2}"
        end = f"{(b - 1) // 2}.mixer" if b % 2 else f"{(b - 1) // 2}"
        if a // 2 != (b - 1) // 2:
            return f"{start}-{end}"
        return start if a % 2 else end


@dataclass(frozen=True)
class PipelineSplit:
    """Where a model is cut and what each stage costs (``pretrain plan``)."""

    cuts: tuple[int | str, ...]
    """Where stages 1, 2, ... start: a layer index L, or "L.ffn" (after block L's mixer half)."""
    stages: tuple[Stage, ...]
    automatic: bool
    """False when parallel.pp_split gave the cuts."""
    shared: dict[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)
    """Parameters held by several stages: name -> (numel, indices of the stages with a copy)."""

    @property
    def imbalance(self) -> float:
        """Largest stage FLOPs / mean stage FLOPs (1 is perfect balance)."""
        flops = [s.flops_per_token for s in self.stages]
        return max(flops) * len(flops) / sum(flops)

    @property
    def rank_imbalance(self) -> float:
        """Largest per-rank FLOPs (the sum of a rank's stages) / their mean."""
        per_rank: dict[int, float] = {}
        for s in self.stages:
            per_rank[s.rank] = per_rank.get(s.rank, 0.0) + s.flops_per_token
        return max(per_rank.values()) * len(per_rank) / sum(per_rank.values())


def _numel(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def plan_split(
    model_cfg: ModelConfig,
    parallel: ParallelConfig,
    seq_len: int,
    micro_batch_size: int = 1,
    *,
    memory_weight: float = 0.0,
    act_bytes: int = 4,
) -> PipelineSplit:
    """The stages of ``model_cfg`` under ``parallel`` (pp x pp_virtual_stages of them): the
    cuts of parallel.pp_split when given, else :func:`balanced_cuts` of the per-half-block
    costs (see the module docstring; ``memory_weight`` in [0, 1]), and each stage's layers,
    parameters, FLOPs per token at ``seq_len`` and activation bytes for a micro-batch of
    ``micro_batch_size`` sequences (``act_bytes`` per element: 4 fp32, 2 bf16).
    Builds the model on the meta device (no memory). Raises ValueError for more stages than
    units or a memory_weight outside [0, 1]."""
    if not 0.0 <= memory_weight <= 1.0:
        raise ValueError(f"memory_weight must be in [0, 1], got {memory_weight}")
    with torch.device("meta"):
        model = HybridLM(model_cfg)
    flops, acts, params = _half_block_costs(model, seq_len)
    head_f, head_a = head_flops(model_cfg), head_activation_elements(model_cfg)
    n_stages = parallel.pp * parallel.pp_virtual_stages
    end = len(flops)
    if parallel.pp_split:
        cuts = list(parallel.pp_split)
    else:
        total_f, total_a = sum(flops) + head_f, sum(acts) + head_a

        def weighted(f: float, a: float) -> int:  # shares of the totals, as integers (exact ties)
            return round(1e12 * ((1 - memory_weight) * f / total_f + memory_weight * a / total_a))

        # the positions a stage may start at: every half but the missing FFN of a block without one
        starts = [u for u in range(end) if u % 2 == 0 or model.blocks[str(u // 2)].ffn is not None]
        spans = list(zip(starts, [*starts[1:], end]))
        costs = [sum(weighted(flops[u], acts[u]) for u in range(a, b)) for a, b in spans]
        cuts = [position_cut(starts[k]) for k in balanced_cuts(costs, n_stages, last_extra=weighted(head_f, head_a))]
    bounds = [0, *(split_position(c) for c in cuts), end]
    tokens = micro_batch_size * seq_len
    last = n_stages - 1
    shared = shared_holders(model_cfg, [0, *cuts], list(range(n_stages)))
    gru_stage = shared.get(GRU_KEYS[0], [None])[0]
    stage_rank = stage_ranks(parallel.pp_schedule, parallel.pp, parallel.pp_virtual_stages)
    stages = []
    for s in range(n_stages):
        units = range(bounds[s], bounds[s + 1])
        p, f, a = sum(params[u] for u in units), sum(flops[u] for u in units), sum(acts[u] for u in units)
        if s == 0:
            p += _numel(model.embed)
        if s == gru_stage:  # the GRU's first holder: the first stage with a 'moe_gru' FFN half
            p += _numel(model.router_gru)
        if s == last:
            p += _numel(model.norm) + _numel(model.head)
            f, a = f + head_f, a + head_a
        layers = range(units.start // 2, (units.stop + 1) // 2)
        stages.append(Stage(s, stage_rank[s], layers, units, p, f, float(a * tokens * act_bytes)))
    copies = {}
    if len(shared["embed.weight"]) > 1:
        copies["embed.weight (tied head)"] = (_numel(model.embed), tuple(shared["embed.weight"]))
    if len(shared.get(GRU_KEYS[0], ())) > 1:
        copies["router_gru"] = (_numel(model.router_gru), tuple(shared[GRU_KEYS[0]]))
    return PipelineSplit(tuple(cuts), tuple(stages), not parallel.pp_split, copies)


def _half_block_costs(model: HybridLM, seq_len: int) -> tuple[list[float], list[float], list[int]]:
    """Training FLOPs per token, activation elements per token and parameters of every
    half-block position (2L: block L's mixer half, 2L + 1 its FFN half; 0 for a missing FFN)."""
    flops, acts, params = [], [], []
    d_model = model.cfg.d_model
    for block in model.blocks.values():
        whole_f = sum(block_flops(block, seq_len).values())
        whole_a = sum(block_activation_elements(block, d_model).values())
        norm2, ffn = block.norm2, block.ffn
        block.norm2 = block.ffn = None  # the mixer half alone (on this meta build only), then back
        mixer_f = sum(block_flops(block, seq_len).values())
        mixer_a = sum(block_activation_elements(block, d_model).values())
        block.norm2, block.ffn = norm2, ffn
        flops += [mixer_f, whole_f - mixer_f]
        acts += [mixer_a, whole_a - mixer_a]
        params += [_numel(block.norm1) + _numel(block.mixer), _numel(norm2) + _numel(ffn)]
    return flops, acts, params
