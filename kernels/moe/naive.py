"""The specification of the MoE ops, one expert (or one routing slot) at a time, for tests: no
sort, no index_add, no grouped GEMM. Differentiable by autograd; run it in fp64."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def naive_permute(x: Tensor, expert_idx: Tensor, n_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per expert e, the assignments ``(n, j)`` with ``expert_idx[n, j] == e`` in row-major order:
    their rows of ``x`` (``xs [N*k, D]``), how many (``counts [E]``) and their flat index
    ``n * k + j`` (``order [N*k]``)."""
    k = expert_idx.shape[1]
    order, counts = [], []
    for e in range(n_experts):
        mine = (expert_idx.flatten() == e).nonzero().flatten()
        order.append(mine)
        counts.append(mine.numel())
    order = torch.cat(order)
    return x[order // k], torch.tensor(counts, dtype=torch.long), order


def naive_unpermute(ys: Tensor, order: Tensor, weight: Tensor) -> Tensor:
    """``y[n] = sum_j weight[n, j] * ys[i]`` with ``order[i] = n * k + j``, one slot j at a time."""
    n, k = weight.shape
    row = torch.empty_like(order)
    row[order] = torch.arange(order.numel())
    row = row.view(n, k)
    return sum(weight[:, j, None] * ys[row[:, j]] for j in range(k))


def naive_grouped_mm(xs: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """``out[i] = xs[i] @ w[e]`` for the ``counts[e]`` rows of expert e, one expert at a time."""
    out, start = [], 0
    for e, c in enumerate(counts.tolist()):
        out.append(xs[start : start + c] @ w[e])
        start += c
    return torch.cat(out)


def naive_moe(x: Tensor, w1: Tensor, w3: Tensor, w2: Tensor, expert_idx: Tensor, weight: Tensor) -> Tensor:
    """``y[n] = sum_j weight[n, j] * SwiGLU_{expert_idx[n, j]}(x[n])``: every expert on every
    token, masked by the routing (no permutation at all)."""
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        gate = (weight * (expert_idx == e)).sum(-1, keepdim=True)  # [N, 1]
        y = y + gate * ((F.silu(x @ w1[e]) * (x @ w3[e])) @ w2[e])
    return y


def naive_gru_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """torch.nn.GRUCell's equations (Cho et al. 2014; gates r, z, n in the weights' rows)."""
    hid = h.shape[-1]
    gate = lambda i: x @ w_ih[i * hid : (i + 1) * hid].T + b_ih[i * hid : (i + 1) * hid]  # noqa: E731
    hgate = lambda i: h @ w_hh[i * hid : (i + 1) * hid].T + b_hh[i * hid : (i + 1) * hid]  # noqa: E731
    r = torch.sigmoid(gate(0) + hgate(0))
    z = torch.sigmoid(gate(1) + hgate(1))
    n = torch.tanh(gate(2) + r * hgate(2))
    return (1 - z) * n + z * h
