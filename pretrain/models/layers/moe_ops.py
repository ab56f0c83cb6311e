"""The dropless expert computation of a Mixture-of-Experts layer, behind one function.

:func:`moe_experts` is the executable reference that a grouped-GEMM kernel (or expert
parallelism's all-to-all) can replace: tokens are grouped by expert with one stable argsort,
each expert runs one batched SwiGLU over its tokens (a loop over EXPERTS, never over tokens),
and the weighted results are scattered back with ``index_add``. No token is ever dropped.
"""

from __future__ import annotations

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
    n, k = expert_idx.shape
    flat = expert_idx.flatten()  # [N*k] assignment -> expert
    order = torch.argsort(flat, stable=True)  # assignments grouped by expert
    token = order // k  # [N*k] token of each sorted assignment
    counts = torch.bincount(flat, minlength=w1.shape[0]).tolist()  # one host sync per layer
    xs = x[token]  # [N*k, d] gathered, expert-contiguous
    outs = []
    # unbind, not w1[e]: one stacked gradient per weight instead of E full-size zero-filled ones
    for chunk, g, u, dn in zip(xs.split(counts), w1.unbind(0), w3.unbind(0), w2.unbind(0)):
        if chunk.shape[0] > 0:
            outs.append((F.silu(chunk @ g) * (chunk @ u)) @ dn)  # [n_e, d]
    if not outs:
        return torch.zeros_like(x)
    ys = torch.cat(outs) * weight.flatten()[order, None]  # [N*k, d]
    return torch.zeros_like(x).index_add(0, token, ys.to(x.dtype))
