"""Tensor and sequence parallelism on the 'tp' mesh dimension: the plans of plan.py applied
to a built :class:`~pretrain.models.HybridLM` (or a pipeline stage's part of one).

Parameters become DTensors on the tp mesh — ``Shard(d)`` per the plans, ``Replicate()``
otherwise — so FSDP2 composes with them and DCP checkpoints reshard between any layouts. The
model code never sees a DTensor: forward hooks swap each module's DTensor parameters for their
local shards for the duration of its forward, and convert the activations at region borders
(Megatron's conjugate operators f / g, Shoeybi et al. 2019; with sequence parallelism their
all-gather / reduce-scatter forms, Korthikanti et al. 2022), expressed as DTensor
redistributions:

- entering a region (a mixer, an FFN, the head): the input ``[B, T, d]`` (``[B, T/tp, d]`` with
  sequence parallelism) becomes the full replicated input; in the backward the ranks' partial
  input gradients are all-reduced (reduce-scattered along the sequence);
- leaving it: the output, a partial sum over ranks (row-parallel last projection), is
  all-reduced (reduce-scattered along the sequence); replicated carry entries a region writes
  (the GRU router's state, the running auxiliary loss) leave unchanged with their gradient
  divided by tp, since every rank then feeds the same gradient back into the region;
- replicated parameters used inside a region, or on sequence-sharded tokens (the norms under
  sequence parallelism), get their gradient all-reduced: each rank holds only its part of it;
- the embedding is vocabulary-parallel (each rank looks up its vocabulary rows, zeros the rest,
  and the partial sums are reduced), the head column-parallel over the vocabulary: logits stay
  sharded ``[B, T, V/tp]``, and the loss fused with the head (the model's ``labels`` path,
  :mod:`kernels.linear_cross_entropy`) combines each token's max, sum of exponentials and
  target logit over the tp ranks (Megatron's vocab-parallel cross-entropy), never gathering
  the logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from parallel.tensor.plan import FFN_PLANS, MIXER_PLANS, GroupSlice, Layout, RegionPlan, local_slice


# ----------------------------------------------------------------- border operators


def enter_region(x: Tensor, mesh: DeviceMesh, sequence_parallel: bool) -> Tensor:
    """Megatron's f: the full input of a region. Forward: identity (all-gather along dim 1 with
    sequence parallelism); backward: all-reduce (reduce-scatter along dim 1)."""
    if not sequence_parallel:
        return _all_reduce_grad(x, mesh)
    d = DTensor.from_local(x, mesh, [Shard(1)], run_check=False).redistribute(mesh, [Replicate()])
    return d.to_local(grad_placements=[Partial()])


def exit_region(y: Tensor, mesh: DeviceMesh, sequence_parallel: bool) -> Tensor:
    """Megatron's g: the sum over ranks of the partial outputs ``y``. Forward: all-reduce
    (reduce-scatter along dim 1 with sequence parallelism); backward: identity (all-gather)."""
    target = Shard(1) if sequence_parallel else Replicate()
    return DTensor.from_local(y, mesh, [Partial()], run_check=False).redistribute(mesh, [target]).to_local()


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


def _all_reduce_grad(t: Tensor, mesh: DeviceMesh) -> Tensor:
    """Identity whose backward all-reduces the gradient over the tp ranks."""
    return DTensor.from_local(t, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def _span_groups(mesh: DeviceMesh) -> dict[int, Any]:
    """For each span s dividing tp, the process group of this rank's block of s consecutive tp
    ranks (tp is the innermost mesh dimension, so such blocks are consecutive global ranks).
    Made once per process for every span, in the same order on every rank (new_group is
    collective over the world)."""
    tp, world = mesh.size(), dist.get_world_size()
    key = (tp, world)
    if key not in _SPAN_GROUPS:
        groups: dict[int, Any] = {tp: mesh.get_group()}
        for span in range(2, tp):
            if tp % span == 0:
                mine, _ = dist.new_subgroups_by_enumeration([list(range(i, i + span)) for i in range(0, world, span)])
                groups[span] = mine
        _SPAN_GROUPS[key] = groups
    return _SPAN_GROUPS[key]


_SPAN_GROUPS: dict[tuple[int, int], dict[int, Any]] = {}


class _AllReduceBoth(torch.autograd.Function):
    """All-reduce (sum) over ``group`` in the forward and in the backward."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _partial_sum(group: Any) -> Any:
    """``reduce_partial`` of plan.py: all-reduce (sum) over ``group`` in the forward and, since
    what follows is rank-local, in the backward too (torch.distributed.nn.functional.all_reduce
    does the same but is deprecated)."""
    return lambda t: _AllReduceBoth.apply(t, group)


def _scatter_partial(mesh: DeviceMesh, group: Any) -> Any:
    """``scatter_partial`` of plan.py over the ranks of ``group`` (this rank's span block; the tp
    ``mesh`` itself when the block is all of it): a reduce-scatter (sum) of ``t [..., W]`` along
    its last dimension to the rank's ``[..., W / span]`` chunk. Backward: DTensor's gradient of a
    Partial -> Shard redistribution is Shard -> Replicate, an all-gather of the chunks'
    gradients, the whole gradient every partial needs. Raises ValueError if W does not divide."""
    block = mesh if group is mesh.get_group() else DeviceMesh.from_group(group, mesh.device_type)
    span = block.size()

    def scatter_partial(t: Tensor) -> Tensor:
        if t.shape[-1] % span:
            raise ValueError(f"scatter_partial: width {t.shape[-1]} does not split over {span} ranks")
        d = DTensor.from_local(t, block, [Partial()], run_check=False)
        return d.redistribute(block, [Shard(t.dim() - 1)]).to_local()

    return scatter_partial


# ----------------------------------------------------------------- parameters


def _distribute(module: nn.Module, layouts: dict[str, Layout | None], mesh: DeviceMesh) -> None:
    """Turn ``module``'s parameters into DTensors on ``mesh``: Shard(d) as ``layouts`` say,
    Replicate for the rest (GroupSlice parameters too: every rank keeps them whole)."""
    for name, param in list(module.named_parameters()):
        if isinstance(param, DTensor):
            continue
        layout = layouts.get(name)
        placement = layout if isinstance(layout, Shard) else Replicate()
        owner, _, leaf = name.rpartition(".")
        dt = distribute_tensor(param.detach(), mesh, [placement], src_data_rank=None)
        setattr(module.get_submodule(owner), leaf, nn.Parameter(dt, requires_grad=param.requires_grad))


@contextmanager
def _local_params(module: nn.Module, view: dict[str, Any]) -> Iterator[None]:
    """Inside: ``module``'s DTensor parameters replaced by ``view[name](param)``."""
    saved = []
    for name, param in module.named_parameters():
        if name in view:
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name)
            saved.append((owner, leaf, param))
            owner._parameters[leaf] = view[name](param)  # a plain tensor: bypasses the Parameter check
    try:
        yield
    finally:
        for owner, leaf, param in saved:
            owner._parameters[leaf] = param


class _Swap:
    """Forward pre-/post-hooks that hold :func:`_local_params` open for one forward."""

    def __init__(self, module: nn.Module, view: dict[str, Any]) -> None:
        self.view = view
        self.open: list[Any] = []
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post, always_call=True)

    def _pre(self, module: nn.Module, args: Any) -> None:
        cm = _local_params(module, self.view)
        cm.__enter__()
        self.open.append(cm)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.open:
            self.open.pop().__exit__(None, None, None)


def _region_view(plan: RegionPlan, mesh: DeviceMesh, module: nn.Module) -> dict[str, Any]:
    """Local views of a region's parameters: a shard as is; a replicated parameter with its
    gradient all-reduced (each rank uses it with its own heads), a GroupSlice one sliced."""
    rank, tp = mesh.get_local_rank(), mesh.size()
    views: dict[str, Any] = {}
    for name, _ in module.named_parameters():
        layout = plan.layout(name)
        if isinstance(layout, Shard):
            views[name] = lambda p: p.to_local()
        elif isinstance(layout, GroupSlice):
            def group(p: DTensor, layout: GroupSlice = layout) -> Tensor:
                full = _all_reduce_grad(p.to_local(), mesh)
                s = local_slice(layout, full.shape[layout.dim], rank, tp)
                return full.narrow(layout.dim, s.start, s.stop - s.start)

            views[name] = group
        else:
            views[name] = lambda p: _all_reduce_grad(p.to_local(), mesh)
    return views


# ----------------------------------------------------------------- regions


class Region:
    """One mixer or FFN run as a tensor-parallel region (see the module docstring)."""

    def __init__(self, module: nn.Module, plan: RegionPlan, mesh: DeviceMesh, sequence_parallel: bool) -> None:
        self.plan, self.mesh, self.sp = plan, mesh, sequence_parallel
        self.uses_carry = getattr(module, "uses_carry", False)
        self.tp = mesh.size()
        _distribute(module, {n: plan.layout(n) for n, _ in module.named_parameters()}, mesh)
        _Swap(module, _region_view(plan, mesh, module))  # the local shards during its forward
        if plan.partial_sums or plan.scatter_partials:
            groups = _span_groups(mesh)
            for name, span in plan.partial_sums.items():
                # an instance attribute: shadows the class's identity, in no state_dict
                module.get_submodule(name).reduce_partial = _partial_sum(groups[span])
            for name, span in plan.scatter_partials.items():
                module.get_submodule(name).scatter_partial = _scatter_partial(mesh, groups[span])
        self.entered: list[dict[int, Tensor]] = []
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post, always_call=True)

    def _pre(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        args = list(args)
        args[0] = enter_region(args[0], self.mesh, self.sp)
        originals: dict[int, Tensor] = {}
        if self.uses_carry:
            carry = {}
            for k, v in args[-1].items():
                if isinstance(v, DTensor):  # the shared GRU's (replicated) weights
                    v = v.to_local()
                if self.plan.carry_layout(k) is None and v.requires_grad:
                    # a replicated entry: each rank's use of it gives part of its gradient
                    v2 = _all_reduce_grad(v, self.mesh)
                    originals[id(v2)] = v
                    v = v2
                carry[k] = v
            args[-1] = carry
        self.entered.append(originals)
        return tuple(args)

    def _post(self, module: nn.Module, args: Any, output: Any) -> Any:
        originals = self.entered.pop()
        if output is None:  # the forward raised
            return None
        y, carry = output if self.uses_carry else (output, None)
        y = exit_region(y, self.mesh, self.sp)
        if carry is None:
            return y
        out = {}
        for k, v in carry.items():
            if id(v) in originals:  # passed through untouched: hand back the caller's tensor
                v = originals[id(v)]
            elif self.plan.carry_layout(k) is None and v.requires_grad:
                v = _ScaleGrad.apply(v, 1.0 / self.tp)
            out[k] = v
        return y, out


# ----------------------------------------------------------------- the model


def tp_plans(cfg: Any, tp: int, ep: int = 1) -> list[tuple[RegionPlan, RegionPlan | None]]:
    """The (mixer, FFN) plans of every layer of ``cfg`` at ``tp`` (and expert-parallel degree
    ``ep``: the MoE FFNs then keep their experts whole, parallel/tensor/plans_moe.py); raises
    ConfigError naming the field when a layer cannot be split (or has no plan yet)."""
    from parallel.tensor.plans_moe import EXPERT_PARALLEL_FFN_PLANS
    from pretrain.config.errors import require

    ffn_plans = {**FFN_PLANS, **EXPERT_PARALLEL_FFN_PLANS} if ep > 1 else FFN_PLANS
    plans = []
    for i, (mixer, ffn) in enumerate(cfg.pattern()):
        require(mixer in MIXER_PLANS, "parallel.tp", f"mixer {mixer!r} has no tensor-parallel plan")
        require(ffn == "none" or ffn in ffn_plans, "parallel.tp", f"FFN {ffn!r} has no tensor-parallel plan")
        plans.append((MIXER_PLANS[mixer](cfg, i, tp), ffn_plans[ffn](cfg, i, tp) if ffn != "none" else None))
    return plans


def apply_tp(model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool, ep: int = 1) -> None:
    """Apply tensor (and sequence) parallelism to the HybridLM ``model`` (a pipeline stage's
    model may lack blocks, the embedding or the head) over the 1-D tp ``mesh``, in place.
    With parallel.ep = ``ep`` > 1 the MoE experts stay whole on every tp rank, for
    :func:`parallel.expert.parallelize_experts` (called next) to shard over 'ep'.

    Materialised, every rank must hold the same full weights before (a seeded build): each keeps
    its shards. On the meta device the shards stay meta, for
    :func:`parallel.meta_init.materialise_sharded` to fill.
    Under sequence parallelism the hidden states between regions are ``[B, T/tp, d_model]``
    local shards, T must divide by tp, and ``position_ids [B, T]`` must be passed to the model
    (its masks are built from them). The logits are ``[B, T, V/tp]`` shards; the model's loss
    (``labels``) is the full vocabulary's, replicated on the tp ranks. Every hook is on the
    module that uses the parameters, so FSDP2 (applied after) may gather and release them
    around it.
    """
    cfg = model.cfg
    plans = tp_plans(cfg, mesh.size(), ep)
    for name, block in model.blocks.items():
        mixer_plan, ffn_plan = plans[int(name)]
        if block.mixer is not None:  # None: a pipeline stage holds only the block's FFN half
            Region(block.mixer, mixer_plan, mesh, sequence_parallel)
        if block.ffn is not None:
            Region(block.ffn, ffn_plan, mesh, sequence_parallel)
    # Outside the regions: the embedding and head split the vocabulary (Shard(0)); the norms
    # and the shared GRU are replicated. A norm under sequence parallelism sees only this
    # rank's tokens, so its weight's gradient is all-reduced.
    outside = {n for n, p in model.named_parameters() if not isinstance(p, DTensor)}
    _distribute(model, {n: Shard(0) for n in outside if n in ("embed.weight", "head.weight")}, mesh)
    local = lambda p: p.to_local()  # noqa: E731
    on_tokens = (lambda p: _all_reduce_grad(p.to_local(), mesh)) if sequence_parallel else local
    for name, module in model.named_modules():
        if name.endswith(("norm1", "norm2")) or name == "norm":
            _Swap(module, {"weight": on_tokens})
    vocab_rows = local_slice(Shard(0), cfg.vocab_size, mesh.get_local_rank(), mesh.size())
    if model.head is not None:
        _Swap(model.head, {"weight": local})
    if model.tied_head is not None:
        model.tied_head.register_forward_pre_hook(lambda m, args: (args[0], args[1].to_local(), *args[2:]))
    for head in (model.head, model.tied_head):
        if head is not None:
            head.vocab_start, head.all_reduce = vocab_rows.start, _vocab_all_reduce(mesh)
    if model.embed is not None:
        _Swap(model.embed, {"weight": local})
        _vocab_parallel_embedding(model.embed, mesh, sequence_parallel)
    if model.norm is not None and (model.head is not None or cfg.tie_embeddings):
        # the head is a region: its input is the whole sequence, its gradient a partial sum
        model.norm.register_forward_hook(lambda m, a, out: enter_region(out, mesh, sequence_parallel))


def _vocab_parallel_embedding(embed: nn.Embedding, mesh: DeviceMesh, sequence_parallel: bool) -> None:
    rank, tp = mesh.get_local_rank(), mesh.size()
    rows = local_slice(Shard(0), embed.num_embeddings, rank, tp)
    masks: list[Tensor] = []

    def pre(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        ids = args[0]
        outside = (ids < rows.start) | (ids >= rows.stop)
        masks.append(outside)
        return ((ids - rows.start).masked_fill(outside, 0), *args[1:])

    def post(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        out = out.masked_fill(masks.pop().unsqueeze(-1), 0.0)
        return exit_region(out, mesh, sequence_parallel)

    embed.register_forward_pre_hook(pre)
    embed.register_forward_hook(post)


def _vocab_all_reduce(mesh: DeviceMesh):
    """The reduction over the tp ranks that a vocabulary-parallel fused loss combines its
    per-token statistics with (:data:`kernels.linear_cross_entropy.AllReduce`); called inside
    the loss's forward, where autograd is off."""
    group = mesh.get_group()

    def all_reduce(x: Tensor, op: str) -> Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
        return x

    return all_reduce
