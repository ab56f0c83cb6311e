"""The PyTorch path of the MoE ops (formerly pretrain/models/layers/moe_ops.py): the token
permutation by expert as one stable argsort and a gather, each expert's SwiGLU as one batched
GEMM chain over its contiguous rows (a loop over EXPERTS, never over tokens), and the weighted
un-permutation as ``index_add``. Autograd differentiates it; on CPU ``index_add`` is
deterministic. The Triton kernels (``permutation.py``, ``grouped_gemm.py``, ``gru.py``) replace it on
CUDA; ``kernels/moe/__init__.py`` picks one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def sort_by_expert(expert_idx: Tensor, n_experts: int) -> tuple[Tensor, Tensor]:
    """``order [N*k]`` int64: the flat assignments ``n * k + j`` grouped by expert (stable: by
    token within an expert), and ``counts [E]`` int64. Shared by both paths: the index work."""
    flat = expert_idx.flatten()
    return torch.argsort(flat, stable=True), torch.bincount(flat, minlength=n_experts)


def permute(x: Tensor, expert_idx: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """``xs [N*k, D]`` = the rows of ``x`` in expert order, ``counts [E]``, ``order [N*k]``."""
    order, counts = sort_by_expert(expert_idx, n_experts)
    return x[order // expert_idx.shape[1]], counts, order


def unpermute(ys: Tensor, order: Tensor, weight: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``y[n] = sum_j weight[n, j] * ys[row of (n, j)]`` as ``index_add`` into zeros."""
    n, k = weight.shape
    out = ys * weight.flatten()[order, None]
    return torch.zeros(n, ys.shape[1], dtype=out_dtype, device=ys.device).index_add(0, order // k, out.to(out_dtype))


def grouped_mm(xs: Tensor, w: Tensor, counts: list[int]) -> Tensor:
    """``xs [M, D]`` rows of expert e times ``w[e] [D, F]``, one GEMM per expert with rows."""
    outs = [chunk @ we for chunk, we in zip(xs.split(counts), w.unbind(0)) if chunk.shape[0] > 0]
    return torch.cat(outs) if outs else xs.new_zeros(0, w.shape[2]) + 0 * (xs.sum() + w.sum())


def grouped_swiglu(xs: Tensor, counts: list[int], w1: Tensor, w3: Tensor, w2: Tensor) -> Tensor:
    """SwiGLU expert e on its ``counts[e]`` contiguous rows of ``xs [M, d]``; returns ``[M, d]``.
    When M = 0 the result still depends on ``xs`` and the weights, so that a collective in
    ``xs``'s history still runs its backward on this process and the weights get a zero
    gradient, as experts without tokens do beside others that have some."""
    outs = []
    # unbind, not w1[e]: one stacked gradient per weight instead of E full-size zero-filled ones
    for chunk, g, u, dn in zip(xs.split(counts), w1.unbind(0), w3.unbind(0), w2.unbind(0)):
        if chunk.shape[0] > 0:
            outs.append((F.silu(chunk @ g) * (chunk @ u)) @ dn)  # [n_e, d]
    if outs:
        return torch.cat(outs)
    return xs * 0 + 0 * (w1.sum() + w3.sum() + w2.sum())  # [0, d]


def gru_gates(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    """torch.nn.GRUCell's element-wise part from ``gi = W_ih x + b_ih``, ``gh = W_hh h + b_hh``
    (``[..., 3h]``, gates r, z, n) and ``h [..., h]``."""
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h
