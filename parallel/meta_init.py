"""Initialising a model built on the meta device one init unit at a time, so that a rank never
holds the whole model (torchtitan's order: build on meta, apply TP -> activation checkpointing
-> compile -> FSDP to the meta model, then materialise and initialise).

The weights must equal a single process's ``torch.manual_seed(seed); build_model(cfg)`` whatever
the layout. :meth:`~pretrain.models.HybridLM.init_weights` initialises the top-level modules
(``HybridLM.init_units``) in turn, each drawing from the RNG, so replaying that order from the
same seed on a meta build, one unit materialised at a time, draws the same numbers.
:func:`init_units_from_seed` is that replay; a pipeline stage keeps the units it owns
(:func:`parallel.pipeline.stage.build_stage`), and :func:`materialise_sharded` copies each unit
into this rank's shards (TP and FSDP2 DTensors) and releases it, so a rank holds its shards plus
one whole unit at the most.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

if TYPE_CHECKING:
    from pretrain.config import ModelConfig
    from pretrain.models import HybridLM


def init_units_from_seed(
    model: HybridLM, seed: int, device: torch.device, storage: Tensor | None = None
) -> Iterator[tuple[str, nn.Module]]:
    """Materialise and initialise the meta-device ``model``'s init units one at a time on
    ``device``, in ``HybridLM.init_units`` order from ``torch.manual_seed(seed)`` (which this
    sets when iteration starts): yields ``(name, unit)`` after each unit's initialisation, so
    every unit equals the same module of a single-process ``torch.manual_seed(seed);
    build_model(cfg)`` on ``device``. The caller keeps a unit, or releases it (``unit.to("meta")``)
    before asking for the next one. ``storage``: a 1-D tensor on ``device`` that every unit's
    tensors of its dtype are views of (at least :func:`unit_numel` long; reused by each unit in
    turn, so only one unit can be held), else each unit gets storage of its own."""
    torch.manual_seed(seed)
    for name in model.init_units():
        unit = model.get_submodule(name)
        if storage is None:
            unit.to_empty(device=device)
        else:
            _views_of(storage, unit)
        model.init_unit(name)
        yield name, unit


def unit_numel(model: nn.Module, dtype: torch.dtype) -> int:
    """The most elements of ``dtype`` (parameters and buffers) in one init unit of ``model``."""
    return max(
        sum(t.numel() for t in (*model.get_submodule(n).parameters(), *model.get_submodule(n).buffers())
            if t.dtype == dtype)
        for n in model.init_units()
    )


def _views_of(storage: Tensor, unit: nn.Module) -> None:
    """Give ``unit``'s meta tensors storage on ``storage``'s device: consecutive views of
    ``storage`` for those of its dtype, their own for the rest. A freed unit's memory returns to
    the allocator in pieces that the next unit's (other) sizes may not reuse: the host allocator
    then keeps a model's worth of fragments mapped (0.5-0.9 GiB measured for sambay_d16), which
    one buffer reused by every unit avoids."""
    offset = 0
    for module in unit.modules():
        for table in (module._parameters, module._buffers):
            for leaf, t in table.items():
                if t is None:
                    continue
                if t.dtype == storage.dtype:
                    view = storage[offset : offset + t.numel()].view(t.shape)
                    offset += t.numel()
                else:
                    view = torch.empty_like(t, device=storage.device)
                table[leaf] = nn.Parameter(view, t.requires_grad) if isinstance(t, nn.Parameter) else view


def _plain_name(name: str) -> str:
    """A parameter's name without the wrappers that torch.compile inserts."""
    return name.replace("_orig_mod.", "")


def _local_part(full: Tensor, target: Tensor) -> Tensor:
    """This rank's part of ``full`` laid out as ``target``: its local shard when ``target`` is a
    DTensor (any placements, FSDP2's strided ones included; no communication), else ``full``."""
    if isinstance(target, DTensor):
        return distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()
    return full


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _trim_host_heap() -> None:
    """Hand the free pages of glibc's heap back to the OS (``malloc_trim``). The shards' copies
    free tensors of many sizes, and the allocator keeps what it cannot give back whole mapped:
    0.5-0.9 GiB of RSS per rank for sambay_d16 at tp2 without this. A no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@torch.no_grad()
def materialise_sharded(
    model: nn.Module,
    cfg: ModelConfig,
    seed: int,
    device: torch.device,
    init_device: torch.device | None = None,
    slices: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
) -> nn.Module:
    """Give the meta-device HybridLM ``model`` (built from ``cfg``, its parallel plans applied:
    tensor-parallel DTensors, activation checkpointing, compiled blocks, FSDP2) storage on
    ``device`` and fill every parameter and buffer with this rank's part of the single-process
    ``torch.manual_seed(seed); build_model(cfg)`` weights built on ``init_device`` (default:
    ``device``; the CPU reproduces a CPU build's weights on any device). Each init unit is built
    whole on ``init_device`` in turn (:func:`init_units_from_seed` on a second meta build), copied
    into the shards and released. ``slices``: for parameters sharded outside their DTensor
    placements (e.g. expert parallelism's slice of the experts), by name, the function taking the
    full tensor to this rank's part before the placements apply. Returns ``model``. Raises
    ValueError when a parameter's part does not match its shard's shape (a layout this does not
    know)."""
    from pretrain.models import build_model

    init_device = torch.device(init_device) if init_device is not None else torch.device(device)
    slices = slices or {}
    model.to_empty(device=device)
    targets = {_plain_name(n): t for n, t in (*model.named_parameters(), *model.named_buffers())}
    with torch.device("meta"):
        template = build_model(cfg)
    storage = torch.empty(unit_numel(template, torch.get_default_dtype()), device=init_device)
    for unit_name, unit in init_units_from_seed(template, seed, init_device, storage):
        for leaf, full in (*unit.named_parameters(), *unit.named_buffers()):
            name = f"{unit_name}.{leaf}"
            target = targets[name]
            part = _local_part(slices.get(name, lambda t: t)(full), target)
            local = target.to_local() if isinstance(target, DTensor) else target
            if part.shape != local.shape:
                raise ValueError(f"{name}: this rank's part {tuple(part.shape)} does not fit its shard "
                                 f"{tuple(local.shape)}")
            local.copy_(part)
        unit.to("meta")
        _trim_host_heap()
    return model
