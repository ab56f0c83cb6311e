"""Pipeline stages of a :class:`~pretrain.models.HybridLM`: the modules of one stage, the carry
that crosses each stage boundary as positional tensors, and the gradient sync of parameters that
several stages hold a copy of.

**Cuts at half-block granularity.** Every block is two units, its mixer half (norm1, mixer and
their residual add: position 2L) and its FFN half (norm2, ffn and theirs: position 2L + 1). A cut
point is a layer index L (position 2L, before block L) or the string "L.ffn" (position 2L + 1,
inside block L, after its mixer half; parallel.pp_split's two forms). A stage owns the positions
``[cuts[s], cuts[s + 1])`` (``cuts[0] == 0``): whole blocks, and at a cut inside a block only that
block's half (the other half's two modules set to None, so ``Block.forward`` runs the one left).
Blocks keep their string keys in ``blocks`` and their submodule names, so parameter names (FQNs)
do not depend on the split; the first stage also owns the embedding, the last one the final norm
and the head.

**Building.** A stage is built on the meta device, then its modules are materialised and
initialised in ``HybridLM.init_units`` order from the single-process seed; each module it does
not own is materialised only for its RNG draws and released, so every weight equals a single
process's (the RNG stream is the same) while a rank never holds more than its own modules plus
one other.

**The carry across stages.** ``torch.distributed.pipelining`` sends a stage's positional outputs
to the next stage's positional inputs, and gives every stage the same chunked keyword arguments
of ``schedule.step`` (``position_ids`` travels that way, so each stage rebuilds its own masks and
RoPE tables). The carry dict that ``HybridLM.forward_layers`` threads through the blocks is
therefore packed as ``(h, *carry[k] for k in keys)`` with ``keys`` the sorted names present after
the boundary's last half-block, found once by a dry forward (two tokens) through all blocks, one
materialised at a time. At a cut inside a block, ``h`` is the residual stream after its mixer
half, the carry holds what the earlier blocks and that mixer half left in it (e.g. SambaY's shared
K/V), and the block's FFN half (e.g. an MoE layer adding to the auxiliary loss and the GRU router
state) runs on the next stage. The shared GRU's weights are never sent: each stage with the FFN
half of a 'moe_gru' block adds its own copy. The last stage returns ``(logits, *carry[k])`` for
``k`` in 'aux_loss' and the 'metric/...' keys, and :class:`PipelineLoss` adds the auxiliary loss
to the LM loss. Detached entries (metrics, the MoE load sums) cross without gradient; everything
else carries one back.

**Shared parameters.** With tied embeddings the last stage holds a copy of ``embed`` (for the
head), and every stage with the FFN half of a 'moe_gru' block holds a copy of ``router_gru``.
Each copy gets the gradient of its own uses only; :class:`SharedParamSync` sums them over the
stages that hold them (locally, then one all-reduce among their ranks) and writes the sum into
every copy, so the copies take identical optimizer steps and stay bitwise equal, as Megatron
does with its embedding group.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from pretrain.config import split_position
from pretrain.config.model import TitansConfig
from pretrain.models.layers.moe import GRU_KEYS

if TYPE_CHECKING:
    from pretrain.config import ModelConfig
    from pretrain.models import HybridLM


def stage_units(cuts: list[int | str], n_layers: int, stage: int) -> range:
    """Half-block positions of ``stage`` (2L: block L's mixer half, 2L + 1: its FFN half) for
    stages starting at the cut points ``cuts`` (layer indices or "L.ffn" strings, see the module
    docstring; ``cuts[0] == 0``, strictly increasing, all below the end). Raises ValueError on
    bad cuts."""
    try:
        units = [split_position(c) for c in cuts]
    except ValueError as exc:
        raise ValueError(f"pipeline cuts {cuts}: {exc}") from None
    if not units or units[0] != 0 or any(b <= a for a, b in zip(units, units[1:])) or units[-1] >= 2 * n_layers:
        raise ValueError(f"pipeline cuts {cuts} must start at 0 and increase strictly below n_layers={n_layers}")
    if not 0 <= stage < len(units):
        raise ValueError(f"stage {stage} out of range for {len(units)} stages")
    return range(units[stage], units[stage + 1] if stage + 1 < len(units) else 2 * n_layers)


def stage_layers(cuts: list[int | str], n_layers: int, stage: int) -> range:
    """Block indices of which ``stage`` holds at least one half (see :func:`stage_units`).
    Raises ValueError on bad cuts."""
    units = stage_units(cuts, n_layers, stage)
    return range(units.start // 2, (units.stop + 1) // 2)


def stage_halves(cuts: list[int | str], n_layers: int, stage: int) -> tuple[list[int], list[int]]:
    """The blocks whose mixer half, and those whose FFN half, ``stage`` holds (a block without
    FFN counts in the second list too when its position 2L + 1 is the stage's)."""
    units = stage_units(cuts, n_layers, stage)
    return [u // 2 for u in units if u % 2 == 0], [u // 2 for u in units if u % 2 == 1]


def position_cut(position: int) -> int | str:
    """The cut point of a half-block position: 2L -> L, 2L + 1 -> "L.ffn" (inverse of
    :func:`pretrain.config.split_position`)."""
    return position // 2 if position % 2 == 0 else f"{position // 2}.ffn"


@contextmanager
def _materialised(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``module`` with zero-filled storage on ``device`` while inside, back on meta after, when it
    is on the meta device; untouched otherwise."""
    on_meta = any(t.is_meta for t in (*module.parameters(), *module.buffers()))
    if on_meta:
        module.to_empty(device=device)
        for t in (*module.parameters(), *module.buffers()):
            t.data.zero_()
    try:
        yield module
    finally:
        if on_meta:
            module.to("meta")


@torch.no_grad()
def boundary_keys(model: HybridLM, cuts: list[int | str], device: torch.device) -> list[list[str]]:
    """For each stage s, the sorted carry keys that stage s receives (``[]`` for s = 0), then
    those after the last block: the entries present after the half-block just before cut
    point ``cuts[s]`` (see :func:`stage_units`) in a dry forward of the whole ``model`` on two
    tokens, less the shared GRU's weights (each stage adds its own copy). ``len(cuts) + 1``
    lists; the last also holds what the head adds with the labels (the z-loss, with
    model.z_loss_coef > 0). ``model`` may be on the meta device: the dry forward then
    materialises one block at a time on ``device`` (zero weights: only the keys matter)."""
    with _materialised(model.embed, device) as embed:
        h = embed(torch.zeros(1, 2, dtype=torch.long, device=device))
    ctx = model._context(h, None, None)
    after: list[list[str]] = []  # after[u]: the keys after half-block position u
    with ExitStack() as stack:
        carry: dict[str, Tensor] = {}
        if model.router_gru is not None:
            carry = stack.enter_context(_materialised(model.router_gru, device)).carry()
        for block in model.blocks.values():
            with _materialised(block, device):
                h, carry = block.forward_mixer(h, ctx, carry)
                after.append(sorted(k for k in carry if k not in GRU_KEYS))
                if block.ffn is not None:
                    h, carry = block.forward_ffn(h, ctx, carry)
                after.append(sorted(k for k in carry if k not in GRU_KEYS))
    head = {"aux_loss", "metric/z_loss"} if model.cfg.z_loss_coef else set()
    return [[]] + [after[split_position(c) - 1] for c in cuts[1:]] + [sorted({*after[-1], *head})]


def output_keys(keys: list[str]) -> list[str]:
    """The carry entries the last stage returns beside the logits: the loss's and the logs'."""
    return [k for k in keys if k == "aux_loss" or k.startswith("metric/")]


class StageModule(nn.Module):
    """One pipeline stage: ``model`` is the stage's HybridLM with the unowned modules deleted
    (its parameter names are the single-process ones), and forward packs the carry.

    forward: first stage ``(input_ids [B, T] int64)``; other stages ``(h [B, T, d_model],
    *carry tensors in in_keys order)``; keyword ``position_ids [B, T]`` on every stage, and
    ``labels [B, T]`` (read by the last stage only). Returns ``(h, *carry in out_keys order)``,
    on the last stage ``(fp32 logits [B, T, V], *carry in out_keys order)`` with out_keys from
    :func:`output_keys`, or with labels ``(LM loss, *carry)`` (the head fused with the loss).
    """

    def __init__(
        self,
        model: HybridLM,
        stage: int,
        n_stages: int,
        in_keys: list[str],
        out_keys: list[str],
        replicas: tuple[str, ...] = (),
        split_weight_grad: bool = True,
    ) -> None:
        """``replicas``: names of the shared parameters this stage holds as a second copy (the
        first copy is on the lowest stage holding it); norms count only first copies.
        ``split_weight_grad``: whether zero-bubble schedules may split its backward into input
        and weight gradients (see :func:`parallel.pipeline.schedule.pipeline_stage`)."""
        super().__init__()
        self.model = model
        self.stage, self.n_stages = stage, n_stages
        self.is_first, self.is_last = stage == 0, stage == n_stages - 1
        self.in_keys, self.out_keys = list(in_keys), list(out_keys)
        self.replicas = frozenset(replicas)
        self.split_weight_grad = split_weight_grad

    def forward(
        self, x: Tensor, *carry_in: Tensor, position_ids: Tensor | None = None, labels: Tensor | None = None
    ) -> tuple[Tensor, ...]:
        if len(carry_in) != len(self.in_keys):
            raise ValueError(f"stage {self.stage} expects carry {self.in_keys}, got {len(carry_in)} tensors")
        h = self.model.embed(x) if self.is_first else x
        labels = labels if self.is_last else None
        out, carry = self.model.forward_layers(h, dict(zip(self.in_keys, carry_in)), position_ids, labels=labels)
        missing = [k for k in self.out_keys if k not in carry]
        if missing:
            raise RuntimeError(f"stage {self.stage}: carry entries {missing} expected at its boundary are missing")
        # Each output is a fresh contiguous tensor: torch builds the next stage's receive buffers
        # with its strides and gloo receives only into contiguous ones (the shared K/V are
        # strided views), the zero-bubble schedules detach outputs in place (not allowed on a
        # view), and an entry passed through untouched would otherwise be this stage's input.
        inputs = {id(t) for t in (x, *carry_in)}
        return tuple(
            t.clone(memory_format=torch.contiguous_format) if t._is_view() or not t.is_contiguous() or id(t) in inputs
            else t
            for t in (out, *(carry[k] for k in self.out_keys))
        )


def build_stage(
    cfg: ModelConfig, cuts: list[int | str], stage: int, seed: int, device: torch.device | None = None
) -> StageModule:
    """The module of ``stage`` (of ``len(cuts)`` stages starting at the cut points ``cuts``:
    layer indices or "L.ffn" strings, see the module docstring) on ``device`` (default: the
    current default device), with every weight equal to a single-process
    ``torch.manual_seed(seed); build_model(cfg)``. Built on the meta device; the modules are
    then initialised one at a time in ``HybridLM.init_units`` order from
    ``torch.manual_seed(seed)`` (which this call sets), each unowned one (or unowned half of a
    block cut inside) materialised only for its RNG draws and released again, so the rank holds
    its own modules plus at most one other. Keeps a copy of ``embed`` on the last stage when
    embeddings are tied, and of ``router_gru`` on every stage with the FFN half of a 'moe_gru'
    block. Raises ValueError on bad cuts, or an "L.ffn" cut in a block without FFN."""
    from parallel.meta_init import init_units_from_seed
    from pretrain.models import build_model

    device = torch.device(device) if device is not None else torch.get_default_device()
    n = len(cuts)
    first, last = stage == 0, stage == n - 1
    pattern = cfg.pattern()
    for c in cuts:
        if split_position(c) % 2 and pattern[split_position(c) // 2][1] == "none":
            raise ValueError(f"pipeline cut {c!r} is inside a block without FFN")
    owned = stage_layers(cuts, cfg.n_layers, stage)
    mixers, ffns = stage_halves(cuts, cfg.n_layers, stage)
    with torch.device("meta"):
        model = build_model(cfg)
    keys = boundary_keys(model, cuts, device)
    keep = {f"blocks.{i}" for i in owned}
    keep |= {"embed"} if first or (last and cfg.tie_embeddings) else set()
    keep |= {"norm", "head"} if last else set()
    if any(pattern[i][1] == "moe_gru" for i in ffns):
        keep.add("router_gru")
    for name, unit in init_units_from_seed(model, seed, device):
        if name not in keep:
            unit.to("meta")  # drawn from the RNG as in one process, then released
        elif name.startswith("blocks."):  # a block cut inside: release the other stage's half
            i = int(name.removeprefix("blocks."))
            halves = ((i in mixers, ("norm1", "mixer")), (i in ffns, ("norm2", "ffn")))
            for module in (m for held, names in halves if not held for m in names):
                setattr(unit, module, None)
    for name in ("embed", "norm", "head", "router_gru"):
        if name not in keep:
            setattr(model, name, None)
    for name in [k for k in model.blocks if int(k) not in owned]:
        del model.blocks[name]
    replicas = ["embed.weight"] if "embed" in keep and not first else []
    first_gru = min((i for i, (_, ffn) in enumerate(pattern) if ffn == "moe_gru"), default=None)
    if "router_gru" in keep and first_gru not in ffns:
        replicas += [k for k in SHARED_PARAMS if k.startswith("router_gru.")]
    in_keys = keys[stage]
    out_keys = output_keys(keys[n]) if last else keys[stage + 1]
    # a Titans memory differentiates its own weights inside the forward: torch's weight pass,
    # which backpropagates from the recorded intermediates, gets wk and wv wrong there (rel 0.7);
    # and with two 'moe_gru' FFN halves the shared GRU's weights reach the loss through graphs
    # that torch's weight pass frees after their first use ("backward through the graph a second
    # time"); one 'moe_gru' per stage, or plain 'moe' layers, split fine
    titans = any(pattern[i][0].split("_")[0] in TitansConfig.used_by for i in mixers)
    split = not titans and sum(pattern[i][1] == "moe_gru" for i in ffns) < 2
    return StageModule(model, stage, n, in_keys, out_keys, tuple(replicas), split)


SHARED_PARAMS = ("embed.weight", *GRU_KEYS)
"""Names of the parameters that several stages may hold a copy of."""


class SharedParamSync:
    """Sums the gradients of parameters held by several stages and writes the sum into every
    copy: ``embed.weight`` (first stage, and the last when embeddings are tied) and the shared
    GRU ``router_gru.*`` (every stage with a 'moe_gru' FFN half).

    Construct on EVERY rank of the pipeline group with the same ``holders`` (it creates one
    process group per set of ranks, a collective): ``holders[name]`` lists the ranks (in
    ``group``) that hold ``name``; build it with :func:`shared_holders`. ``modules`` are this
    rank's stage modules. Call :meth:`sync` after the backward of a step, before clipping.
    """

    def __init__(
        self,
        modules: list[StageModule],
        holders: dict[str, list[int]],
        group: dist.ProcessGroup | None = None,
        pipelines: list[list[int]] | None = None,
    ) -> None:
        """``pipelines``: with data parallelism, the global ranks of every pipeline (one list per
        data-parallel index, each in pipeline-rank order, ``group`` being one of them); every
        rank then creates the holder groups of all pipelines, in the same order, as
        ``new_group`` requires."""
        self.local: dict[str, list[nn.Parameter]] = {}
        for module in modules:
            for name, p in module.model.named_parameters():
                if name in holders:
                    self.local.setdefault(name, []).append(p)
        self.groups: dict[str, dist.ProcessGroup | None] = {}
        rank = dist.get_rank(group) if dist.is_initialized() else 0
        if pipelines is None:
            pipelines = [[dist.get_global_rank(group, r) for r in range(dist.get_world_size(group))]
                         if group is not None else list(range(dist.get_world_size()))] if dist.is_initialized() else []
        me = dist.get_rank() if dist.is_initialized() else 0
        made: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        for name in sorted(holders):
            ranks = tuple(sorted(set(holders[name])))
            if len(ranks) < 2:
                continue
            if ranks not in made:
                for pipeline in pipelines:  # every rank calls new_group for every pipeline, in order
                    pg = dist.new_group([pipeline[r] for r in ranks])
                    if me in pipeline:
                        made[ranks] = pg
            if rank in ranks:
                self.groups[name] = made[ranks]
    @torch.no_grad()
    def sync(self) -> None:
        """Every copy's ``.grad`` becomes the sum of all copies' gradients (a copy without one
        counts as zero). Bitwise equal on every holder: one reduction, broadcast to all."""
        for name, params in sorted(self.local.items()):
            grads = [_local(p.grad) for p in params if p.grad is not None]
            total = torch.zeros_like(_local(params[0])) if not grads else grads[0].clone()
            for g in grads[1:]:
                total += g
            if name in self.groups:
                dist.all_reduce(total, group=self.groups[name])
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                _local(p.grad).copy_(total)


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (FSDP2 parameters and gradients), else ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


def shared_holders(cfg: ModelConfig, cuts: list[int | str], stage_rank: list[int]) -> dict[str, list[int]]:
    """For each shared parameter, the ranks holding a copy (with repeats when one rank holds
    several stages): ``stage_rank[s]`` is the rank of stage s, ``cuts`` the stages' cut points
    (see :func:`stage_units`); the GRU's copies are on the stages with a 'moe_gru' FFN half."""
    from pretrain.models.layers.moe import uses_router_gru

    n = len(cuts)
    out: dict[str, list[int]] = {"embed.weight": [stage_rank[0]]}
    if cfg.tie_embeddings and n > 1:
        out["embed.weight"].append(stage_rank[n - 1])
    if uses_router_gru(cfg):
        pattern = cfg.pattern()
        with_gru = [
            stage_rank[s]
            for s in range(n)
            if any(pattern[i][1] == "moe_gru" for i in stage_halves(cuts, cfg.n_layers, s)[1])
        ]
        for key in GRU_KEYS:
            out[key] = with_gru
    return out


def clip_grad_norm_(modules: list[StageModule], max_norm: float, group: dist.ProcessGroup | None = None) -> Tensor:
    """The gradient-norm clipping of one process (``torch.nn.utils.clip_grad_norm_``) over a
    pipeline: the global L2 norm of all gradients of the model, each shared parameter counted
    once (call after :meth:`SharedParamSync.sync`, so its copies hold the same sum), from one
    all-reduce of the squared norms of this rank's ``modules`` over the pipeline ``group`` (with
    FSDP2- or tensor-parallel-sharded stages: over every rank, None, see
    :func:`parallel.grad_norm.clip_grad_norm_`). Scales every local gradient, copies included,
    by ``min(1, max_norm / (norm + 1e-6))``. Returns the norm, an fp32 scalar, the same on every
    rank (``inf``/``nan`` left to the caller)."""
    from parallel.grad_norm import clip_grad_norm_ as clip

    grads = [(m, name, p.grad) for m in modules for name, p in m.model.named_parameters() if p.grad is not None]
    copies = [g for m, name, g in grads if name in m.replicas]
    return clip([g for _, _, g in grads], max_norm, group, skip=copies)
