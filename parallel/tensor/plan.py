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
    those tensors (a per-rank shard along the layout's dimension).

    A plan factory raises :class:`~pretrain.config.ConfigError` naming the config field when
    the layer cannot be split over tp ranks (e.g. heads not divisible).
    """

    params: Mapping[str, Layout] = field(default_factory=dict)
    sharded_carry: Mapping[str, Layout] = field(default_factory=dict)

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
