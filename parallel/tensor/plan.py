"""Tensor-parallel plans as data: one :class:`RegionPlan` per mixer and FFN type.

A block's mixer and its FFN are each one *tensor-parallel region* (Megatron's column-then-row
pattern, Shoeybi et al. 2019): inside it every rank computes on local tensors — its shard of
the heads, inner channels or experts — and the region's output is a partial sum over the
tensor-parallel ranks (its last projection is row-parallel), which the region's exit reduces
(all-reduce, or reduce-scatter along the sequence with sequence parallelism, Korthikanti et al.
2022). The plan says, for each parameter of the module, how it is laid out over the ``tp``
ranks:

- ``Shard(d)`` (``torch.distributed.tensor.Shard``): split into ``tp`` contiguous chunks
  along dim ``d``; rank r computes with chunk r (heads are contiguous rows of a projection, so
  this is a split by heads);
- :class:`GroupSlice` ``(d, groups)``: kept whole on every rank (replicated), but rank r
  computes with group ``r * groups // tp`` of the ``groups`` equal slices along ``d``: the
  grouped-query K/V heads (or Mamba-2's B/C groups) when there are fewer groups than ranks,
  each group then serving ``tp / groups`` ranks, the way Megatron replicates them;
- anything not named: replicated, computed with in full on every rank.

A replicated parameter's gradient is a sum over the ranks' contributions (each rank uses it with
its own heads) and is all-reduced in the backward; a sharded one's is complete on its rank.
Carry entries (tensors that cross layers: SambaY's memory and shared K/V) named in
``sharded_carry`` are per-rank shards (their layout says along which dimension) produced and
read inside regions sharded the same way; every other carry entry is replicated (the GRU
router's state, the auxiliary loss).

Mixers compute their local sizes from tensor shapes (``view(b, t, -1, head_dim)``), so the
model code runs unchanged on the local shards and never imports torch.distributed.

Partial sums inside a region (``RegionPlan.partial_sums``). A few layers need a sum over ranks
before their output: Mamba-1's ``x_proj`` reads the rank's inner channels, so its dt/B/C are
partial products; Mamba-2's gated RMSNorm, when a group of channels spans several ranks (fewer
B/C groups than ranks), needs the sum of squares of the whole group. Such a module calls
``self.reduce_partial(t)`` on the partial tensor and uses what it returns; the attribute defaults
to the identity (one process: the partial sum is the sum). ``partial_sums`` maps the name of each
such module (relative to the region's module, ``""`` for the region's module itself, as
``nn.Module.get_submodule`` takes it) to ``span``: the number of consecutive tensor-parallel
ranks whose partials add up (``tp``: all of them; ``tp // groups``: the ranks sharing a
GroupSlice group, i.e. ranks ``[span * (r // span), span * (r // span + 1))``). The region code
(parallel/tensor/region.py) must, on each rank r, before the forward:

    module.get_submodule(name).reduce_partial = f   with   f(t) = sum of t over r's span block

where ``f``'s forward is an all-reduce (SUM) of ``t`` over the process group of r's block (the
whole tp group when span == tp; else one group per block, made with ``new_group`` on every rank,
e.g. ``torch.distributed.new_subgroups_by_enumeration``) and its BACKWARD is also an all-reduce
(SUM) of the incoming gradient over the same group: what follows the sum is rank-local (the
rank's channels), so each rank's gradient of the sum is only its own channels' part, and every
partial's true gradient is the sum of them all. region.py's ``_AllReduceBoth``
has exactly this forward and backward; Megatron's identity-backward reduction (for a replicated
consumer) would be wrong here. ``f`` must keep shape and dtype and be called the same number of
times in the same order on every rank (it is: every rank runs the same code; activation
recomputation calls it again on all ranks alike). The hook is a plain attribute, not state: it is
in no state_dict, and with tp == 1 it stays the identity. tests/parallel/tp_reference.py
implements the same protocol in one process (the ranks run in lockstep threads and sum their
partials with autograd, which gives that backward).

Scattered partial sums (``RegionPlan.scatter_partials``). When a rank needs only its own columns
of a sum (Titans MAG: the memory's projected reads ``m [B, T, W]`` summed over the memory heads,
of which each rank gates only its attention heads' ``W / tp`` columns), all-reducing the whole
``[..., W]`` to slice it wastes ``span`` times the bandwidth. Such a module calls
``self.scatter_partial(t)`` on its partial ``t [..., W]`` and gets its block-position's
contiguous chunk ``[..., W / span]`` of the sum: on rank r, with ``i = r % span``, columns
``[i * W / span, (i + 1) * W / span)`` of the sum of ``t`` over r's span block (the same blocks
as ``partial_sums``). The attribute defaults to the identity (one process: span 1, the chunk is
the whole sum); ``scatter_partials`` maps module names to spans as ``partial_sums`` does, and W
must divide by the span (the plan factory checks the sizes that make it so). The region code sets
``scatter_partial = f`` with ``f``'s forward a reduce-scatter (SUM) along the last dimension over
r's block, and its BACKWARD an all-gather of the chunks' gradients along the last dimension:
every partial enters the sum whole, so its gradient is the whole sum's gradient, of which each
rank holds its chunk. Call count and order: as ``reduce_partial``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from torch.distributed.tensor import Shard

if TYPE_CHECKING:
    from pretrain.config import ModelConfig


@dataclass(frozen=True)
class GroupSlice:
    """A replicated parameter of which rank r uses slice ``r * groups // tp`` of ``groups``
    equal slices along ``dim`` (needs ``tp % groups == 0``)."""

    dim: int
    groups: int


Layout = Shard | GroupSlice


@dataclass(frozen=True)
class RegionPlan:
    """How one mixer or FFN module runs as a tensor-parallel region.

    ``params``: parameter-name pattern (``fnmatch``, relative to the module, e.g.
    ``"wq.weight"`` or ``"experts.*"``) -> layout; the first matching pattern wins and
    unmatched parameters are replicated. ``sharded_carry``: carry-key pattern -> the layout of
    those tensors (a per-rank shard along the layout's dimension). ``partial_sums``: submodule
    name (``""``: the module itself) -> span, the consecutive ranks whose partial sums its
    ``reduce_partial`` adds (see the module docstring for the protocol). ``scatter_partials``:
    the same for modules whose ``scatter_partial`` returns the rank's chunk (along the last
    dimension) of the sum over the span.

    A plan factory raises :class:`~pretrain.config.ConfigError` naming the config field when
    the layer cannot be split over tp ranks (e.g. heads not divisible).
    """

    params: Mapping[str, Layout] = field(default_factory=dict)
    sharded_carry: Mapping[str, Layout] = field(default_factory=dict)
    partial_sums: Mapping[str, int] = field(default_factory=dict)
    scatter_partials: Mapping[str, int] = field(default_factory=dict)

    def layout(self, name: str) -> Layout | None:
        """The layout of parameter ``name`` (None: replicated and used whole)."""
        for pattern, layout in self.params.items():
            if fnmatchcase(name, pattern):
                return layout
        return None

    def carry_layout(self, key: str) -> Layout | None:
        """The layout of carry entry ``key`` (None: replicated)."""
        for pattern, layout in self.sharded_carry.items():
            if fnmatchcase(key, pattern):
                return layout
        return None


PlanFactory = Callable[["ModelConfig", int, int], RegionPlan]
"""(model config, layer index, tp) -> the plan of that layer's mixer or FFN."""

MIXER_PLANS: dict[str, PlanFactory] = {}
FFN_PLANS: dict[str, PlanFactory] = {}


def register_plan(table: dict[str, PlanFactory], *names: str) -> Callable[[PlanFactory], PlanFactory]:
    """Decorator: ``factory`` is the plan of the mixers (``MIXER_PLANS``) or FFNs
    (``FFN_PLANS``) registered under ``names`` in pretrain/models/registry.py."""

    def deco(factory: PlanFactory) -> PlanFactory:
        for name in names:
            if name in table:
                raise ValueError(f"tensor-parallel plan for {name!r} is registered twice")
            table[name] = factory
        return factory

    return deco


def group_layout(dim: int, groups: int, tp: int) -> Layout:
    """``Shard(dim)`` when the ``groups`` (heads, KV heads, head pairs) divide over ``tp``
    ranks, else :class:`GroupSlice` (then ``tp`` must be a multiple of ``groups``, a
    requirement the plan factory checks)."""
    return Shard(dim) if groups % tp == 0 else GroupSlice(dim, groups)


def local_slice(layout: Layout, size: int, rank: int, tp: int) -> slice:
    """The slice of a dimension of length ``size`` that ``rank`` of ``tp`` computes with."""
    if isinstance(layout, GroupSlice):
        step = size // layout.groups
        g = rank * layout.groups // tp
        return slice(g * step, (g + 1) * step)
    step = size // tp
    return slice(rank * step, (rank + 1) * step)
