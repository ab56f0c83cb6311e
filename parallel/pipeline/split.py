"""Cost-balanced pipeline stage split: where to cut the layer stack into pp x virtual stages.

A block's cost is its training FLOPs per token (:func:`pretrain.models.stats.block_flops`: 6 x
its matmul weights plus the mixer's sequence terms and MoE's active experts); the first stage
also pays the embedding (a lookup: no FLOPs counted, as in ``flops_per_token``) and the last one
the final norm, head and loss (6 x d_model x vocab per token; the loss's elementwise softmax is
negligible beside it). Optionally a ``memory_weight`` w in [0, 1] balances
(1 - w) x FLOPs share + w x activation-memory share instead: w = 0 (the default) balances time,
which is what bounds a pipeline's throughput; w > 0 trades some of it for evener activation
memory (e.g. a head whose fp32 logits dominate one stage's memory).

The cut points minimise the largest stage cost over all contiguous partitions (the bottleneck
that sets a synchronous pipeline's step time), exactly, by dynamic programming. Among the
partitions that reach it, the smallest sum of squared stage costs wins (the evenest spread of
the rest), then the lexicographically smallest cut points, so the split is deterministic.
Costs are rounded to integers first so that ties are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from parallel.pipeline.schedule import stage_ranks
from parallel.pipeline.stage import shared_holders
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
    """Block indices (module names ``blocks.<i>``) the stage owns."""
    params: int
    """Parameters it owns; a parameter shared with other stages counts on its first stage only."""
    flops_per_token: float
    """Training (forward + backward) FLOPs per token."""
    activation_bytes: float
    """Activations one micro-batch keeps for its backward (without activation checkpointing)."""


@dataclass(frozen=True)
class PipelineSplit:
    """Where a model is cut and what each stage costs (``pretrain plan``)."""

    cuts: tuple[int, ...]
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
    cuts of parallel.pp_split when given, else :func:`balanced_cuts` of the per-block costs
    (see the module docstring; ``memory_weight`` in [0, 1]), and each stage's layers,
    parameters, FLOPs per token at ``seq_len`` and activation bytes for a micro-batch of
    ``micro_batch_size`` sequences (``act_bytes`` per element: 4 fp32, 2 bf16).
    Builds the model on the meta device (no memory). Raises ValueError for more stages than
    layers or a memory_weight outside [0, 1]."""
    if not 0.0 <= memory_weight <= 1.0:
        raise ValueError(f"memory_weight must be in [0, 1], got {memory_weight}")
    with torch.device("meta"):
        model = HybridLM(model_cfg)
    blocks = list(model.blocks.values())
    flops = [sum(block_flops(b, seq_len).values()) for b in blocks]
    acts = [sum(block_activation_elements(b, model_cfg.d_model).values()) for b in blocks]
    head_f, head_a = head_flops(model_cfg), head_activation_elements(model_cfg)
    n_stages = parallel.pp * parallel.pp_virtual_stages
    if parallel.pp_split:
        cuts = list(parallel.pp_split)
    else:
        total_f, total_a = sum(flops) + head_f, sum(acts) + head_a

        def weighted(f: float, a: float) -> int:  # shares of the totals, as integers (exact ties)
            return round(1e12 * ((1 - memory_weight) * f / total_f + memory_weight * a / total_a))

        costs = [weighted(f, a) for f, a in zip(flops, acts)]
        cuts = balanced_cuts(costs, n_stages, last_extra=weighted(head_f, head_a))
    bounds = [0, *cuts, len(blocks)]
    tokens = micro_batch_size * seq_len
    last = n_stages - 1
    shared = shared_holders(model_cfg, bounds[:-1], list(range(n_stages)))
    gru_stage = shared.get(GRU_KEYS[0], [None])[0]
    stage_rank = stage_ranks(parallel.pp_schedule, parallel.pp, parallel.pp_virtual_stages)
    stages = []
    for s in range(n_stages):
        layers = range(bounds[s], bounds[s + 1])
        params = sum(_numel(blocks[i]) for i in layers)
        f, a = sum(flops[i] for i in layers), sum(acts[i] for i in layers)
        if s == 0:
            params += _numel(model.embed)
        if s == gru_stage:  # the GRU's first holder: the first stage with a 'moe_gru' block
            params += _numel(model.router_gru)
        if s == last:
            params += _numel(model.norm) + _numel(model.head)
            f, a = f + head_f, a + head_a
        stages.append(Stage(s, stage_rank[s], layers, params, f, float(a * tokens * act_bytes)))
    copies = {}
    if len(shared["embed.weight"]) > 1:
        copies["embed.weight (tied head)"] = (_numel(model.embed), tuple(shared["embed.weight"]))
    if len(shared.get(GRU_KEYS[0], ())) > 1:
        copies["router_gru"] = (_numel(model.router_gru), tuple(shared[GRU_KEYS[0]]))
    return PipelineSplit(tuple(cuts), tuple(stages), not parallel.pp_split, copies)
