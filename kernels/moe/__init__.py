"""Mixture-of-Experts ops of a dropless top-k MoE layer (Switch, Fedus et al. 2021; Mixtral;
MegaBlocks, Gale et al. 2022) and RMoE's GRU router cell (Qiu et al. 2024), with the names
Megatron-LM and torchtitan use: :func:`permute` / :func:`unpermute` (tokens grouped by expert and
back, gated by the routing weights), :func:`grouped_mm` (one GEMM per expert over its variable
number of rows), :func:`grouped_swiglu` (the SwiGLU experts on it), :func:`gru_cell`.

Layout: ``naive.py`` (the specification, one expert / slot at a time), ``ops_torch.py`` (the
PyTorch path: argsort, per-expert GEMMs, index_add), and the Triton kernels ``permutation.py``,
``grouped_gemm.py`` and ``gru.py`` (forward and backward, deterministic: no atomics). Every public
function takes ``backend`` (``model.kernels``) and picks one with :func:`kernels.dispatch.select`
under the op name 'moe'.

:func:`dispatch_experts` is the layer's pipeline: permute -> an :data:`ExpertCompute` -> unpermute.
The middle step is a replaceable hook: :func:`local_experts` computes all experts here; expert
parallelism (parallel/expert.py) substitutes all-to-all dispatch -> its local experts ->
all-to-all combine. Routing and the gates stay outside it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.dispatch import select
from kernels.moe import ops_torch

__all__ = [
    "ExpertCompute", "dispatch_experts", "grouped_mm", "grouped_swiglu", "gru_cell", "local_experts", "moe_experts",
    "permute", "unpermute",
]

ExpertCompute = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""``(xs [M, d], counts [E] int64, w1, w3, w2) -> (ys [M, d], load [E] int64)``: apply expert e
to its ``counts[e]`` contiguous rows of ``xs`` (rows grouped by expert in ascending order) and
return the outputs in the same row order, plus ``load``: the rows each expert received over
every process that shares the experts (``counts`` itself on one process). ``w1, w3, w2``
are the layer's expert weights as this process holds them (all E, or its shard of them)."""


def _select(device: torch.device, backend: str, module: str) -> str:
    return select("moe", backend, device, module)


def _autocast(*ts: Tensor) -> tuple[tuple[Tensor, ...], contextlib.AbstractContextManager]:
    """The tensors in autocast's dtype when autocast is on (as a torch matmul would take them),
    and a context that turns it off around the kernel."""
    dev = ts[0].device.type
    if not torch.is_autocast_enabled(dev):
        return ts, contextlib.nullcontext()
    dtype = torch.get_autocast_dtype(dev)
    return tuple(t.to(dtype) for t in ts), torch.autocast(dev, enabled=False)


def permute(x: Tensor, expert_idx: Tensor, n_experts: int, *, backend: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Group the N*k token->expert assignments by expert (Megatron-LM's ``permute``).

    Args:
        x: ``[N, D]`` tokens, float.
        expert_idx: ``[N, k]`` int64 in ``[0, n_experts)``, the experts of each token.
        n_experts: E.
        backend: ``model.kernels``: 'auto', 'triton' or 'torch'.

    Returns:
        ``xs [N*k, D]`` (x's dtype; expert 0's rows, then expert 1's, ..., by token within an
        expert), ``counts [E]`` int64 and ``order [N*k]`` int64 (``order[i] = n * k + j``: the
        assignment of row i). Differentiable in ``x`` (the backward sums each token's k rows).

    Raises:
        ValueError: bad shapes or dtypes, or a backend that cannot run.
    """
    if x.ndim != 2 or expert_idx.ndim != 2 or expert_idx.shape[0] != x.shape[0]:
        raise ValueError(f"permute: x {tuple(x.shape)} must be [N, D] and expert_idx {tuple(expert_idx.shape)} [N, k]")
    if expert_idx.dtype != torch.long or not x.is_floating_point():
        raise ValueError(f"permute: expert_idx must be int64 (got {expert_idx.dtype}), x float (got {x.dtype})")
    if _select(x.device, backend, "kernels.moe.permutation") == "torch":
        return ops_torch.permute(x, expert_idx, n_experts)
    from kernels.moe.permutation import permute_triton  # noqa: PLC0415  (only where triton is installed)

    order, counts = ops_torch.sort_by_expert(expert_idx, n_experts)
    return permute_triton(x, order, expert_idx.shape[1]), counts, order


def unpermute(
    ys: Tensor, order: Tensor, weight: Tensor, *, out_dtype: torch.dtype | None = None, backend: str = "auto"
) -> Tensor:
    """The inverse of :func:`permute`, gated: ``y[n] = sum_j weight[n, j] * ys[i]`` where
    ``order[i] = n * k + j`` (Megatron-LM's ``unpermute`` with probs).

    Args:
        ys: ``[N*k, D]`` expert outputs in :func:`permute`'s row order.
        order: ``[N*k]`` int64 from :func:`permute`.
        weight: ``[N, k]`` routing weights (float).
        out_dtype: the result's dtype; None is ``ys``'s.
        backend: ``model.kernels``.

    Returns:
        ``y [N, D]``, differentiable in ``ys`` and ``weight``. The Triton path sums each row's k
        terms in slot order in fp32 (deterministic, no atomics); the PyTorch path index_adds.

    Raises:
        ValueError: bad shapes or dtypes, or a backend that cannot run.
    """
    if ys.ndim != 2 or weight.ndim != 2 or order.shape != (weight.numel(),) or ys.shape[0] != weight.numel():
        raise ValueError(f"unpermute: ys {tuple(ys.shape)}, order {tuple(order.shape)} and weight "
                         f"{tuple(weight.shape)} must be [N*k, D], [N*k] and [N, k]")
    if order.dtype != torch.long or not weight.is_floating_point():
        raise ValueError(f"unpermute: order must be int64 (got {order.dtype}), weight float (got {weight.dtype})")
    out_dtype = out_dtype or ys.dtype
    if _select(ys.device, backend, "kernels.moe.permutation") == "torch":
        return ops_torch.unpermute(ys, order, weight, out_dtype)
    from kernels.moe.permutation import unpermute_triton  # noqa: PLC0415

    return unpermute_triton(ys, order, weight, out_dtype)


def grouped_mm(xs: Tensor, w: Tensor, counts: Tensor, *, backend: str = "auto") -> Tensor:
    """``out[i] = xs[i] @ w[e]`` for the ``counts[e]`` consecutive rows of expert e (torchtitan's
    ``grouped_mm`` with offsets ``cumsum(counts)``; MegaBlocks' grouped GEMM).

    Args:
        xs: ``[M, D]`` rows grouped by expert, float; ``sum(counts) == M``.
        w: ``[E, D, F]`` expert weights, ``xs``'s dtype (or any under autocast).
        counts: ``[E]`` int64 rows per expert (may be 0).
        backend: ``model.kernels``.

    Returns:
        ``[M, F]`` in ``xs``'s dtype (autocast's under autocast), differentiable in ``xs`` and
        ``w``; Triton accumulates in fp32, the weight gradient deterministically.

    Raises:
        ValueError: bad shapes or dtypes, or a backend that cannot run.
    """
    if xs.ndim != 2 or w.ndim != 3 or w.shape[1] != xs.shape[1] or counts.shape != (w.shape[0],):
        raise ValueError(f"grouped_mm: xs {tuple(xs.shape)}, w {tuple(w.shape)}, counts {tuple(counts.shape)} "
                         "must be [M, D], [E, D, F], [E]")
    if counts.dtype != torch.long:
        raise ValueError(f"grouped_mm: counts must be int64, got {counts.dtype}")
    if _select(xs.device, backend, "kernels.moe.grouped_gemm") == "torch":
        return ops_torch.grouped_mm(xs, w, counts.tolist())
    from kernels.moe.grouped_gemm import grouped_mm_triton  # noqa: PLC0415

    (xs, w), ctx = _autocast(xs, w)
    if xs.dtype != w.dtype:
        raise ValueError(f"grouped_mm: xs {xs.dtype} and w {w.dtype} must share a dtype")
    with ctx:
        return grouped_mm_triton(xs, w, counts)


def grouped_swiglu(
    xs: Tensor, counts: Tensor | list[int], w1: Tensor, w3: Tensor, w2: Tensor, *, backend: str = "auto"
) -> Tensor:
    """SwiGLU expert e (``w1[e], w3[e] [d, H]``, ``w2[e] [H, d]``) on its ``counts[e]``
    contiguous rows of ``xs [M, d]``: ``(silu(x w1[e]) * (x w3[e])) w2[e]``; returns ``[M, d]``.
    ``counts`` is ``[E]`` int64 or a list. The Triton path is three :func:`grouped_mm` calls.
    When M = 0 the result still depends on ``xs`` and the weights, so that a collective in
    ``xs``'s history still runs its backward and the weights get a zero gradient."""
    if _select(xs.device, backend, "kernels.moe.grouped_gemm") == "torch":
        return ops_torch.grouped_swiglu(xs, counts.tolist() if isinstance(counts, Tensor) else counts, w1, w3, w2)
    counts = torch.as_tensor(counts, dtype=torch.long, device=xs.device)
    gate, up = (grouped_mm(xs, w, counts, backend="triton") for w in (w1, w3))
    return grouped_mm(F.silu(gate) * up, w2, counts, backend="triton")


def local_experts(
    xs: Tensor, counts: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, *, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """The default :data:`ExpertCompute` (bind ``backend`` with functools.partial): all E
    experts on this process."""
    if _select(xs.device, backend, "kernels.moe.grouped_gemm") == "torch":
        return ops_torch.grouped_swiglu(xs, counts.tolist(), w1, w3, w2), counts  # one host sync per layer
    return grouped_swiglu(xs, counts, w1, w3, w2, backend=backend), counts  # no host sync


def dispatch_experts(
    x: Tensor, expert_idx: Tensor, weight: Tensor, n_experts: int, compute: ExpertCompute, w1: Tensor, w3: Tensor,
    w2: Tensor, *, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Permute the N*k token->expert assignments by expert, run ``compute`` on them and
    scatter the gated outputs back: ``y[n] = sum_j weight[n, j] * expert_{expert_idx[n, j]}(x[n])``.

    ``x [N, d]``, ``expert_idx [N, k]`` int64 in ``[0, n_experts)``, ``weight [N, k]``; ``w1, w3,
    w2`` as ``compute`` takes them. Returns ``y [N, d]`` in ``x``'s dtype and the ``load [E]``
    (int64) that ``compute`` reports.
    """
    xs, counts, order = permute(x, expert_idx, n_experts, backend=backend)
    ys, load = compute(xs, counts, w1, w3, w2)  # [N*k, d], expert-contiguous
    return unpermute(ys, order, weight, out_dtype=x.dtype, backend=backend), load


def moe_experts(
    x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, expert_idx: Tensor, weight: Tensor, *, backend: str = "auto"
) -> Tensor:
    """``y[n] = sum_j weight[n, j] * SwiGLU_{expert_idx[n, j]}(x[n])``.

    Args:
        x: ``[N, d]`` tokens.
        w1, w3: ``[E, d, H]`` gate and up projections of the E experts.
        w2: ``[E, H, d]`` down projections.
        expert_idx: ``[N, k]`` int64, the experts of each token.
        weight: ``[N, k]`` the gate of each (token, expert) pair.
        backend: ``model.kernels``.

    Returns:
        ``[N, d]`` in ``x``'s dtype. Differentiable in x, the weights and ``weight``.

    Raises:
        ValueError: mismatched shapes or dtypes, or a backend that cannot run.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be [N, d], got {tuple(x.shape)}")
    n, d = x.shape
    if w1.ndim != 3 or w1.shape[1] != d or w3.shape != w1.shape:
        raise ValueError(f"w1/w3 must both be [E, {d}, H], got {tuple(w1.shape)} and {tuple(w3.shape)}")
    e, _, h = w1.shape
    if w2.shape != (e, h, d):
        raise ValueError(f"w2 must be {(e, h, d)}, got {tuple(w2.shape)}")
    if expert_idx.ndim != 2 or expert_idx.shape[0] != n or expert_idx.dtype != torch.long:
        raise ValueError(f"expert_idx must be int64 [{n}, k], got {expert_idx.dtype} {tuple(expert_idx.shape)}")
    if weight.shape != expert_idx.shape:
        raise ValueError(f"weight {tuple(weight.shape)} must match expert_idx {tuple(expert_idx.shape)}")

    def compute(xs, counts, a, b, c):
        return local_experts(xs, counts, a, b, c, backend=backend)

    return dispatch_experts(x, expert_idx, weight, e, compute, w1, w3, w2, backend=backend)[0]


def gru_cell(
    x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor, *, backend: str = "auto"
) -> Tensor:
    """One GRU step with torch.nn.GRUCell's equations and weight layout (Cho et al. 2014; gates
    r, z, n), RMoE's router cell:
    r = sig(W_ir x + b_ir + W_hr h + b_hr), z = sig(... z ...),
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h.

    Args:
        x: ``[..., I]`` input; h: ``[..., H]`` state.
        w_ih: ``[3H, I]``, w_hh: ``[3H, H]``, b_ih, b_hh: ``[3H]``.
        backend: ``model.kernels``; Triton fuses the element-wise part (the GEMMs stay torch's).

    Returns:
        ``h' [..., H]``, differentiable in every input.

    Raises:
        ValueError: mismatched shapes, or a backend that cannot run.
    """
    hid = h.shape[-1]
    if w_ih.shape[0] != 3 * hid or w_hh.shape != (3 * hid, hid) or b_ih.shape != (3 * hid,) or b_hh.shape != (3 * hid,):
        raise ValueError(f"gru_cell: w_ih {tuple(w_ih.shape)}, w_hh {tuple(w_hh.shape)}, biases must be "
                         f"[3H, I], [3H, H], [3H] with H = {hid}")
    if x.shape[:-1] != h.shape[:-1] or x.shape[-1] != w_ih.shape[1]:
        raise ValueError(f"gru_cell: x {tuple(x.shape)} and h {tuple(h.shape)} must be [..., I] and [..., H]")
    gi = F.linear(x, w_ih, b_ih)  # [..., 3H]
    gh = F.linear(h, w_hh, b_hh)
    if _select(x.device, backend, "kernels.moe.gru") == "torch":
        return ops_torch.gru_gates(gi, gh, h)
    from kernels.moe.gru import gru_gates_triton  # noqa: PLC0415

    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return gru_gates_triton(gi, gh, h)
    return gru_gates_triton(gi, gh, h)
