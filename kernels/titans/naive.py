"""Titans' neural long-term memory, the executable specification: Behrouz et al. 2024 ("Titans:
Learning to Memorize at Test Time", eqs. 13-14 with mini-batch gradients at the chunk start)
one token at a time, each inner gradient taken by autograd (differentiable: create_graph), in
fp32 (fp64 for fp64 inputs). Chunks, resets and reads as in :func:`kernels.titans.memory_scan`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.dispatch import at_least_fp32
from kernels.titans.chunk_torch import MemoryState


def naive_memory(ws: list[Tensor], x: Tensor) -> Tensor:
    """The memory MLP: ``x W`` for one layer, else ``x + W_L silu(... silu(x W_1))``;
    ws ``[B, H, d_in, d_out]`` per layer, x ``[B, H, L, D]``."""
    if len(ws) == 1:
        return x @ ws[0]
    h = x
    for w in ws[:-1]:
        h = F.silu(h @ w)
    return x + h @ ws[-1]


def naive_memory_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    state: MemoryState,
    init: list[Tensor],
    positions: Tensor,
    chunk_size: int,
    reset: Tensor | None = None,
    read: str = "chunk_start",
) -> tuple[Tensor, MemoryState]:
    """Per token t: at a reset, weights back to ``init`` and momentum to 0; the loss
    ``||M_{W0}(k_t) - v_t||^2`` at the chunk-start weights W0;
    ``S_t = eta_t S_{t-1} - theta_t grad``, ``M_t = (1 - alpha_t) M_{t-1} + S_t``; the read
    ``y_t = M_{W0}(q_t)`` ('chunk_start') or ``M_t(q_t)`` ('per_token'); after a token whose
    ``position % chunk_size == chunk_size - 1``, W0 becomes M_t. Arguments and returns as
    :func:`kernels.titans.memory_scan`.
    """
    f = at_least_fp32
    q, k, v, theta, eta, alpha = (f(z) for z in (q, k, v, theta, eta, alpha))
    init = [f(p) for p in init]
    w0, m, s = ([f(x) for x in xs] for xs in (state.w0, state.m, state.s))
    ys = []
    for t in range(q.shape[1]):
        if reset is not None:
            r = reset[:, t].view(-1, 1, 1, 1)
            w0 = [torch.where(r, p, x) for p, x in zip(init, w0)]
            m = [torch.where(r, p, x) for p, x in zip(init, m)]
            s = [torch.where(r, torch.zeros_like(x), x) for x in s]
        qt, kt, vt = (x[:, t].unsqueeze(2) for x in (q, k, v))  # [B, H, 1, D]
        if read == "chunk_start":
            ys.append(naive_memory(w0, qt)[:, :, 0])
        with torch.enable_grad():
            if not any(w.requires_grad for w in w0):  # nothing to train through: a leaf copy
                w0 = [w.detach().requires_grad_() for w in w0]
            loss = ((naive_memory(w0, kt) - vt) ** 2).sum()  # the (b, h) memories are independent
            grads = torch.autograd.grad(loss, w0, create_graph=True)
        th, et, al = (x[:, t].view(x.shape[0], -1, 1, 1) for x in (theta, eta, alpha))
        s = [et * si - th * g for si, g in zip(s, grads)]
        m = [(1 - al) * mi + si for mi, si in zip(m, s)]
        if read == "per_token":
            ys.append(naive_memory(m, qt)[:, :, 0])
        done = (positions[:, t] % chunk_size == chunk_size - 1).view(-1, 1, 1, 1)
        w0 = [torch.where(done, mi, wi) for mi, wi in zip(m, w0)]
    return torch.stack(ys, dim=1), MemoryState(w0, m, s)
