"""Expert parallelism (GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2021; torchtitan's
and Megatron-LM's ``expert_model_parallel_size``): the E experts of every MoE layer sharded over
``ep`` ranks, tokens sent to their experts' rank and back with two all-to-alls.

The ``ep`` ranks are data-parallel ranks: each runs the whole model on its own micro-batch. Rank
r holds experts ``[r E/ep, (r+1) E/ep)`` of every MoE layer (``w1, w3, w2`` keep their names,
sliced along dim 0) and every other parameter whole. In each MoE layer (see
kernels/moe) routing runs locally, exactly as on one process; the
layer's :data:`~kernels.moe.ExpertCompute` hook, which receives the tokens
permuted by expert, is replaced by :class:`ExpertParallel`:

1. all-gather the token count per expert of every rank ([ep, E]; one host sync, needed for the
   all-to-all split sizes anyway), whose sum over ranks is each expert's global load;
2. dispatch: an all-to-all sends each rank's expert-contiguous rows to the experts' owners;
3. the received rows, ordered (source rank, expert), are regrouped by expert and each local
   expert runs one SwiGLU on them (dropless: no capacity, no padding);
4. combine: the inverse all-to-all returns the outputs, in the permuted order the hook got.

Both all-to-alls are ``torch.distributed._functional_collectives.all_to_all_single_autograd``
(torch.distributed.nn.functional's is deprecated in torch 2.13), whose backward is the inverse
all-to-all.

Loss and gradient scaling, with the training loss the mean over ranks of each rank's mean loss
(data parallelism): the balance loss uses the GLOBAL load f (step 1, no gradient) and the local
mean probability P, so the mean over ranks of ``E sum_e f_e P_e`` is the loss of all ranks'
tokens together (equal token counts per rank). A non-expert parameter's gradient is rank-local
and is averaged over the data-parallel ranks as usual. An expert's gradient arrives on its owner
as the SUM over the ep ranks of their losses' gradients; :class:`ExpertParallel` scales it by
1/ep, so that averaging it over the ranks that hold the same experts (the data-parallel ranks
outside the ep group; none when dp = ep) gives the gradient of the global mean loss.

In the Trainer (:func:`parallelize_experts`, torchtitan's layout): ep borrows the inner ep ranks
of 'dp_shard', on a mesh ('dp_replicate', 'dp_shard_mod_ep', 'ep'). Each expert weight is a
DTensor of the global shape ``[E, ...]`` placed (Replicate, Replicate, Shard(0)), so that

- DCP checkpoints hold the global ``[E, ...]`` tensors (and AdamW moments) under the
  one-process names, and reshard between any ep, dp and one process;
- the global gradient norm (parallel/grad_norm.py) counts each expert shard once: its square
  is divided by the dp / ep ranks that hold the same shard.

FSDP2 leaves the expert weights alone (``fully_shard(..., ignored_params=...)``): they are
neither sharded further nor reduced by it, and :func:`average_expert_grads` averages their
gradients over the two Replicate dimensions (nothing to do when dp = ep) before clipping. This
is simpler than FSDP over the 'dp_shard_mod_ep' quotient mesh (which would need the experts in a
module of their own, apart from the router); the cost is that each rank keeps its E/ep experts'
weights and AdamW moments whole.

With tensor parallelism (parallel.tp > 1; the mesh gains an innermost 'tp' dimension, placement
Replicate): each expert is sharded over ep and NOT split over tp (expert tensor parallel size 1,
as torchtitan and Megatron-LM do by default); the MoE region's plan
(parallel/tensor/plans_moe.py ``expert_parallel_moe_plan``) leaves the experts whole on every tp
rank. Inside the region every tp rank holds the same tokens and routes them alike, so dispatching
them all from every tp rank would compute each expert row tp times and the region's exit, a SUM
over tp, would count it tp times. Instead tp rank t dispatches only its contiguous ``1/tp`` of
the expert-sorted rows (``[t M / tp, (t+1) M / tp)``) over its ep group, the ranks with the same
tp coordinate (and pipeline stage), and returns zeros for the other rows: the routed output is
then a partial sum over tp like any row-parallel output, and the region's forward, backward and
gradient rules hold unchanged: the experts, replicated parameters of the region, get their
gradient all-reduced over tp by the region (each tp rank's holds its rows' part), so
:func:`average_expert_grads` leaves 'tp' alone. The global load (balance loss) is still that of
all the rows: the gathered table carries both the rows' and the tp rank's counts.

With pipeline parallelism (parallel.pp > 1) each stage's experts are sharded over the stage's ep
group (the mesh is the stage's slice of the ('pp', ...) mesh) and dispatch per micro-batch: the
balance loss of a micro-batch uses the load of the ep group's ranks' micro-batches of the same
index. Both compose: with pp and tp, an ep group is the ranks of one stage with one tp coordinate.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from kernels.moe import grouped_swiglu
from pretrain.config.errors import require
from pretrain.models.layers.moe import MoE

EXPERT_PARAMS = ("w1", "w3", "w2")
"""Names (in an MoE module) of the stacked expert weights that expert parallelism shards."""


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


class ExpertParallel:
    """The :data:`~kernels.moe.ExpertCompute` of one MoE layer whose
    ``n_experts`` experts are sharded over the ranks of ``group`` (contiguous blocks of
    ``n_experts / ep``, in group-rank order). Every rank of the group must call it the same
    number of times, in the same order, in forward and backward (as a model's layers do)."""

    def __init__(
        self, group: dist.ProcessGroup, n_experts: int, tp_rank: int = 0, tp: int = 1, backend: str = "auto"
    ) -> None:
        """``tp_rank`` of ``tp``: inside a tensor-parallel region (module docstring), this rank
        computes only its contiguous ``1/tp`` of the rows it is given and returns zeros for the
        others, so that the region's sum over the tp ranks is the whole output. ``backend``:
        ``model.kernels`` of the local experts' grouped GEMMs."""
        self.backend = backend
        self.group = group
        self.ep = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.n_local = n_experts // self.ep
        self.tp_rank, self.tp = tp_rank, tp

    def __call__(self, xs: Tensor, counts: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
        """``xs [M, d]`` grouped by global expert with ``counts [E]`` rows each; ``w1, w3
        [E/ep, d, H]``, ``w2 [E/ep, H, d]`` this rank's experts. Returns ``ys [M, d]`` (with
        tp > 1: zero outside this tp rank's rows) and the global load ``[E]`` (rows per expert
        summed over the group, of all M rows)."""
        ep, nl = self.ep, self.n_local
        # DTensor experts (parallelize_experts): compute on the local shard; the gradient
        # returns as a DTensor of the same placements
        w1, w3, w2 = (w.to_local() if isinstance(w, DTensor) else w for w in (w1, w3, w2))
        m = xs.shape[0]
        first, last = self.tp_rank * m // self.tp, (self.tp_rank + 1) * m // self.tp
        mine = counts
        if self.tp > 1:  # this tp rank's rows [first, last): per expert, the overlap with them
            ends = counts.cumsum(0)
            mine = ends.clamp(first, last) - (ends - counts).clamp(first, last)
        table = [torch.empty_like(counts) for _ in range(2 * ep)]
        dist.all_gather(table[:ep], counts.contiguous(), group=self.group)
        if self.tp > 1:
            dist.all_gather(table[ep:], mine.contiguous(), group=self.group)
        load = torch.stack(table[:ep]).sum(0)  # the global load of all the rows, for the balance loss
        table = torch.stack(table[ep:] if self.tp > 1 else table[:ep])  # [ep, E]: rows rank s sends to expert e
        rows = table.tolist()  # the one host sync: split sizes must be Python ints
        lo, hi = self.rank * nl, (self.rank + 1) * nl
        send = [sum(rows[self.rank][j * nl : (j + 1) * nl]) for j in range(ep)]
        recv = [sum(r[lo:hi]) for r in rows]
        per_expert = [sum(r[lo + e] for r in rows) for e in range(nl)]
        xr = all_to_all_single_autograd(xs[first:last], recv, send, self.group)  # ordered (source, expert)
        # regroup by (expert, source): a stable sort on that key of each received row
        got = table[:, lo:hi].flatten()  # [ep * E/ep] rows this rank gets, (source, expert)
        seg = torch.repeat_interleave(torch.arange(ep * nl, device=xs.device), got, output_size=sum(recv))
        order = torch.argsort((seg % nl) * ep + seg // nl, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        scale = 1.0 / ep
        w1, w3, w2 = (_ScaleGrad.apply(w, scale) for w in (w1, w3, w2))
        ys = grouped_swiglu(xr[order], per_expert, w1, w3, w2, backend=self.backend)[inverse]
        ys = all_to_all_single_autograd(ys, send, recv, self.group)
        if self.tp > 1:
            ys = torch.nn.functional.pad(ys, (0, 0, first, m - last))
        return ys, load


def expert_parallel_modules(model: nn.Module) -> dict[str, MoE]:
    """The MoE modules of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MoE)}


def expert_param_names(model: nn.Module) -> set[str]:
    """Qualified names of the expert weights that expert parallelism shards: their gradients
    are NOT averaged over the ep ranks (only over the ranks holding the same experts), unlike
    every other parameter's. The same names before and after :func:`apply_expert_parallel`."""
    modules = expert_parallel_modules(model)
    return {f"{prefix}.{leaf}" if prefix else leaf for prefix in modules for leaf in EXPERT_PARAMS}


@torch.no_grad()
def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup, tp_rank: int = 0, tp: int = 1) -> list[str]:
    """Shard every MoE layer's experts of ``model`` over ``group`` in place: keep this rank's
    contiguous block of ``w1, w3, w2`` along the experts (as new Parameters, same names) and
    install :class:`ExpertParallel`. Call it on every rank of the group, after building (and
    initialising, identically on every rank) the model and before FSDP wrapping and creating
    the optimizer; with tensor parallelism after ``apply_tp(..., ep=ep)``, whose MoE regions then
    keep the experts whole (Replicate) on every tp rank, ``tp_rank`` and ``tp`` being this rank's
    coordinate and the degree (module docstring). Returns the names of the sharded parameters
    (:func:`expert_param_names`). Raises ConfigError (``parallel.ep``) when a layer's experts do
    not divide over the group, ValueError when the experts are split over tp."""
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    names = []
    for prefix, moe in expert_parallel_modules(model).items():
        require(moe.n_experts % ep == 0, "parallel.ep", f"{moe.n_experts} experts do not split over {ep} ranks")
        nl = moe.n_experts // ep
        for leaf in EXPERT_PARAMS:
            full = getattr(moe, leaf)
            if isinstance(full, DTensor):  # a tensor-parallel region's: whole on every tp rank
                if not all(p.is_replicate() for p in full.placements):
                    raise ValueError(f"{prefix}.{leaf} is split over tp: call apply_tp with ep={ep}")
                full = full.to_local()
            setattr(moe, leaf, nn.Parameter(full[rank * nl : (rank + 1) * nl].clone()))
            names.append(f"{prefix}.{leaf}" if prefix else leaf)
        moe.expert_compute = ExpertParallel(group, moe.n_experts, tp_rank, tp, moe.kernels)
    return names


def parallelize_experts(model: nn.Module, mesh: DeviceMesh) -> list[nn.Parameter]:
    """:func:`apply_expert_parallel` over ``mesh['ep']`` (and ``mesh['tp']``'s coordinate when
    the mesh has one), then every sharded expert weight made a DTensor Parameter of the global
    shape, placed Shard(0) on 'ep' and Replicate on every other dimension of ``mesh``
    (:meth:`parallel.dims.ParallelDims.build_ep_mesh`; module docstring). Call it on every rank
    after building the model identically everywhere (and after ``apply_tp(..., ep=ep)``), before
    FSDP (which must ignore the returned parameters) and the optimizer. Returns the expert
    Parameters. Raises ConfigError (``parallel.ep``) when a layer's experts do not divide over
    ``mesh['ep']``."""
    names = mesh.mesh_dim_names
    placements = [Shard(0) if n == "ep" else Replicate() for n in names]
    tp_rank, tp = (mesh["tp"].get_local_rank(), mesh["tp"].size()) if "tp" in names else (0, 1)
    params = []
    for name in apply_expert_parallel(model, mesh.get_group("ep"), tp_rank, tp):
        prefix, _, leaf = name.rpartition(".")
        module = model.get_submodule(prefix)
        local = getattr(module, leaf).data
        param = nn.Parameter(DTensor.from_local(local, mesh, placements, run_check=False))
        setattr(module, leaf, param)
        params.append(param)
    return params


@torch.no_grad()
def average_expert_grads(params: list[nn.Parameter]) -> None:
    """Average (in place) the gradients of :func:`parallelize_experts`'s Parameters over the
    ranks holding the same experts: the mean over every Replicate dimension of their mesh (the
    'ep' shard already carries the 1/ep of :class:`ExpertParallel`) but 'tp', over which the
    tensor-parallel region's backward has already summed them (they are equal there). No
    communication when dp = ep. Parameters without a gradient are skipped (the same on every
    rank)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    mesh, placements = grads[0].device_mesh, grads[0].placements
    copies = [
        i for i, (size, pl, name) in enumerate(zip(mesh.shape, placements, mesh.mesh_dim_names))
        if pl.is_replicate() and size > 1 and name != "tp"
    ]
    if not copies:
        return
    flat = torch.cat([g.to_local().flatten() for g in grads])  # one collective per mesh dimension
    for i in copies:
        dist.all_reduce(flat, group=mesh.get_group(i))  # SUM: gloo has no AVG
        flat /= mesh.size(i)
    for g, part in zip(grads, flat.split([g.to_local().numel() for g in grads])):
        g.to_local().copy_(part.view_as(g.to_local()))
