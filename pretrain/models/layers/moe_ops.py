"""The dropless expert computation of a Mixture-of-Experts layer.

:func:`moe_experts` is the executable reference: tokens are grouped by expert with one stable
argsort (the *permutation*), each expert runs one batched SwiGLU over its contiguous tokens (a
loop over EXPERTS, never over tokens) and the weighted results are scattered back with
``index_add`` (the *un-permutation*). No token is ever dropped.

The middle step, "compute these experts for these permuted tokens", is a replaceable
:data:`ExpertCompute` (:func:`dispatch_experts` takes one; ``MoE.expert_compute`` holds it):
:func:`local_experts` computes on this process; expert parallelism (parallel/expert.py)
substitutes all-to-all dispatch -> its local experts -> all-to-all combine, and a grouped-GEMM
kernel could substitute itself the same way. Routing and the gates stay outside it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, expert_idx: Tensor, weight: Tensor) -> None:
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


ExpertCompute = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
"""``(xs [M, d], counts [E] int64, w1, w3, w2) -> (ys [M, d], load [E] int64)``: apply expert e
to its ``counts[e]`` contiguous rows of ``xs`` (rows grouped by expert in ascending order) and
return the outputs in the same row order, plus ``load``: the rows each expert received over
every process that shares the experts (``counts`` itself on one process). ``w1, w3, w2``
are the layer's expert weights as this process holds them (all E, or its shard of them)."""


def grouped_swiglu(xs: Tensor, counts: list[int], w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """SwiGLU expert e (``w1[e], w3[e] [d, H]``, ``w2[e] [H, d]``) on its ``counts[e]``
    contiguous rows of ``xs [M, d]`` (``sum(counts) == M``, ``len(counts) == w1.shape[0]``);
    returns ``[M, d]``. When M = 0 the result still depends on ``xs`` and the weights, so that
    a collective in ``xs``'s history still runs its backward on this process and the weights get
    a zero gradient, as experts without tokens do beside others that have some."""
    outs = []
    # unbind, not w1[e]: one stacked gradient per weight instead of E full-size zero-filled ones
    for chunk, g, u, dn in zip(xs.split(counts), w1.unbind(0), w3.unbind(0), w2.unbind(0)):
        if chunk.shape[0] > 0:
            outs.append((F.silu(chunk @ g) * (chunk @ u)) @ dn)  # [n_e, d]
    if outs:
        return torch.cat(outs)
    return xs * 0 + 0 * (w1.sum() + w3.sum() + w2.sum())  # [0, d]


def local_experts(xs: Tensor, counts: Tensor, w1: Tensor, w3: Tensor, w2: Tensor) -> tuple[Tensor, Tensor]:
    """The default :data:`ExpertCompute`: all E experts on this process."""
    return grouped_swiglu(xs, counts.tolist(), w1, w3, w2), counts  # one host sync per layer


def dispatch_experts(
    x: Tensor, expert_idx: Tensor, weight: Tensor, n_experts: int, compute: ExpertCompute, w1: Tensor, w3: Tensor,
    w2: Tensor,
) -> tuple[Tensor, Tensor]:
    """Permute the N*k token->expert assignments by expert, run ``compute`` on them and
    scatter the gated outputs back: ``y[n] = sum_j weight[n, j] * expert_{expert_idx[n, j]}(x[n])``.

    ``x [N, d]``, ``expert_idx [N, k]`` int64 in ``[0, n_experts)``, ``weight [N, k]``; ``w1, w3,
    w2`` as ``compute`` takes them. Returns ``y [N, d]`` in ``x``'s dtype and the ``load [E]``
    (int64) that ``compute`` reports.
    """
    n, k = expert_idx.shape
    flat = expert_idx.flatten()  # [N*k] assignment -> expert
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert
    token = order // k  # [N*k] token of each sorted assignment
    counts = torch.bincount(flat, minlength=n_experts)
    ys, load = compute(x[token], counts, w1, w3, w2)  # [N*k, d], expert-contiguous
    ys = ys * weight.flatten()[order, None]
    return torch.zeros_like(x).index_add(0, token, ys.to(x.dtype)), load


def moe_experts(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, expert_idx: Tensor, weight: Tensor) -> Tensor:
    """``y[n] = sum_j weight[n, j] * SwiGLU_{expert_idx[n, j]}(x[n])``.

    Args:
        x: ``[N, d]`` tokens.
        w1, w3: ``[E, d, H]`` gate and up projections of the E experts.
        w2: ``[E, H, d]`` down projections.
        expert_idx: ``[N, k]`` int64, the experts of each token.
        weight: ``[N, k]`` the gate of each (token, expert) pair.

    Returns:
        ``[N, d]`` in ``x``'s dtype. Differentiable in x, the weights and ``weight``.
    """
    _check(x, w1, w3, w2, expert_idx, weight)
    return dispatch_experts(x, expert_idx, weight, w1.shape[0], local_experts, w1, w3, w2)[0]
