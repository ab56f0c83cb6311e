"""Mamba-1 selective scan in pure PyTorch, chunked in time: the CPU path, which the Triton kernels
(``chunk.py``, ``recurrent.py``) replace on CUDA. Called through :mod:`kernels.selective_scan`.

The recurrence, per channel d and state index n (``A`` diagonal, one ``B``/``C`` per token):

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t * B_t        (h_{t-1} := 0 where reset_t)
    y_t = (C_t . h_t + D * x_t) * silu(z_t)                  (the gate only when z is given)

The state ``[B, D, N]`` is N times wider than the activations, so the cost is moving those
values, not arithmetic. The forward walks time in chunks of ``SCAN_CHUNK`` tokens whose decay and
state tensors stay in cache, keeps only the state at each chunk start, and the backward
recomputes one chunk at a time (as the CUDA kernels do) instead of storing ``[T, B, D, N]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

import torch.nn.functional as F

from kernels.dispatch import at_least_fp32

SCAN_CHUNK = 8  # tokens per chunk: measured fastest on CPU (8..16) for d_inner=512, N=16, B=8


def _decay(dt: Tensor, A: Tensor, keep: Tensor | None) -> Tensor:
    """exp(dt * A), zeroed where a document starts: [L, B, D, N]."""
    a = torch.mul(dt.unsqueeze(-1), A).exp_()
    if keep is not None:
        a.mul_(keep[..., None, None])
    return a


def _states(a: Tensor, u: Tensor, B: Tensor, h: Tensor) -> Tensor:
    """All states of one chunk that starts from state h: hs[t] = a[t] * hs[t-1] + u[t] (x) B[t],
    with hs[-1] read as h. [L, B, D, N]."""
    hs = torch.mul(u.unsqueeze(-1), B.unsqueeze(-2))
    for t in range(hs.shape[0]):
        h = hs[t].addcmul_(a[t], h)  # in place: one pass over the state per token
    return hs


class _SelectiveScan(torch.autograd.Function):
    """Time-major fp32 tensors: x, dt [T, B, D]; B, C [T, B, N]; h0 [B, D, N]; keep [T, B] or None."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0, keep):  # type: ignore[override]
        u = dt * x
        y = torch.empty_like(x)
        h, starts = h0, []
        for t0 in range(0, x.shape[0], SCAN_CHUNK):
            sl = slice(t0, t0 + SCAN_CHUNK)
            starts.append(h)
            hs = _states(_decay(dt[sl], A, None if keep is None else keep[sl]), u[sl], B[sl], h)
            h = hs[-1].clone()
            torch.matmul(hs, C[sl].unsqueeze(-1), out=y[sl].unsqueeze(-1))  # C_t . h_t
        y.addcmul_(x, D)
        ctx.save_for_backward(x, dt, A, B, C, D, keep, *starts)
        return y, h

    @staticmethod
    def backward(ctx, gy, g_last):  # type: ignore[override]
        x, dt, A, B, C, D, keep, *starts = ctx.saved_tensors
        u = dt * x
        gu, gdt = torch.empty_like(x), torch.empty_like(x)
        gB, gC, gA = torch.empty_like(B), torch.empty_like(C), torch.zeros_like(A)
        # g_next: gradient reaching the last state of the current chunk from later tokens
        g_next = g_last if g_last is not None else torch.zeros_like(starts[0])
        for ci in range(len(starts) - 1, -1, -1):
            sl, h0 = slice(ci * SCAN_CHUNK, (ci + 1) * SCAN_CHUNK), starts[ci]
            a = _decay(dt[sl], A, None if keep is None else keep[sl])
            hs = _states(a, u[sl], B[sl], h0)
            gyc = gy[sl]
            torch.matmul(gyc.unsqueeze(-2), hs, out=gC[sl].unsqueeze(-2))
            G = torch.mul(gyc.unsqueeze(-1), C[sl].unsqueeze(-2))  # dL/dh_t, local part [L, B, D, N]
            G[-1].add_(g_next)
            for t in range(G.shape[0] - 2, -1, -1):
                G[t].addcmul_(a[t + 1], G[t + 1])  # reverse recurrence
            torch.matmul(G, B[sl].unsqueeze(-1), out=gu[sl].unsqueeze(-1))
            torch.matmul(u[sl].unsqueeze(-2), G, out=gB[sl].unsqueeze(-2))
            g_next = a[0] * G[0]
            G[1:].mul_(hs[:-1])  # dL/da_t = G_t * h_{t-1}
            G[0].mul_(h0)
            g_log = G.mul_(a)  # dL/d(dt*A); zero at resets because a is
            torch.sum(g_log * A, -1, out=gdt[sl])
            gA += g_log.mul_(dt[sl].unsqueeze(-1)).sum((0, 1))
        gdt.addcmul_(gu, x)
        gx = gu * dt + gy * D
        gD = (gy * x).sum((0, 1))
        return gx, gdt, gA, gB, gC, gD, g_next, None


@torch.compiler.disable  # dynamo would unroll the time loop; run it eagerly between graphs
def selective_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    h0: Tensor | None = None,
    reset: Tensor | None = None,
    z: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mamba-1 selective scan over a whole sequence (training / prefill).

    Args:
        x: ``[B, T, D]`` input after the convolution.
        dt: ``[B, T, D]`` positive step sizes (softplus already applied).
        A: ``[D, N]`` negative diagonal state matrix.
        B, C: ``[B, T, N]`` input and output projections of the state.
        D: ``[D]`` skip connection.
        h0: ``[B, D, N]`` initial state, or None for zeros (``[N_seq, D, N]`` with cu_seqlens).
        reset: ``[B, T]`` bool, True where a document starts: the carried state is dropped
            before that token is added.
        z: ``[B, T, D]`` output gate, or None: y is multiplied by ``silu(z)`` (in fp32).
        cu_seqlens: ``[N_seq + 1]`` offsets of sequences packed in a batch of one (B = 1), each
            scanned from its own initial state (a loop over the sequences).

    Returns:
        ``y [B, T, D]`` in the dtype of ``x``, and the final state ``[B, D, N]`` (``[N_seq, D, N]``
        with cu_seqlens) in fp32 (fp64 for float64 inputs: the scan never rounds below fp32).
        Shapes are checked by the caller.
    """
    if cu_seqlens is not None:
        ys, hs = [], []
        for i, (bos, eos) in enumerate(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())):
            sl = slice(bos, eos)
            y_i, h_i = selective_scan(
                x[:, sl], dt[:, sl], A, B[:, sl], C[:, sl], D, None if h0 is None else h0[i : i + 1],
                None if reset is None else reset[:, sl], None if z is None else z[:, sl],
            )
            ys.append(y_i)
            hs.append(h_i)
        return torch.cat(ys, dim=1), torch.cat(hs, dim=0)
    b, t, d = x.shape
    n = A.shape[-1]
    dtype = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for a float64 check

    def tm(z: Tensor) -> Tensor:  # [B, T, ...] -> time-major [T, B, ...] in dtype
        return z.transpose(0, 1).to(dtype).contiguous()

    h0 = x.new_zeros(b, d, n, dtype=dtype) if h0 is None else h0.to(dtype)
    keep = None if reset is None else tm(~reset)
    with torch.autocast(x.device.type, enabled=False):  # the recurrence needs fp32
        y, h = _SelectiveScan.apply(tm(x), tm(dt), A.to(dtype), tm(B), tm(C), D.to(dtype), h0, keep)
        if z is not None:
            y = y * F.silu(tm(z))
    return y.transpose(0, 1).to(x.dtype), h  # [B, T, D]


def selective_state_update(
    h: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    reset: Tensor | None = None,
    z: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One recurrent step (decoding): ``h [B, D, N]``, ``x, dt [B, D]``, ``B, C [B, N]``,
    ``reset [B]`` bool, ``z [B, D]`` gate or None. Returns ``(y [B, D] in x's dtype, new h
    [B, D, N] fp32)``; ``h`` is not modified."""
    f = at_least_fp32
    a = torch.exp(f(dt).unsqueeze(-1) * f(A))  # [B, D, N]
    if reset is not None:
        a = a * (~reset).to(a.dtype)[:, None, None]
    h = a * f(h) + (f(dt) * f(x)).unsqueeze(-1) * f(B).unsqueeze(1)
    y = (h @ f(C).unsqueeze(-1)).squeeze(-1) + f(D) * f(x)
    if z is not None:
        y = y * F.silu(f(z))
    return y.to(x.dtype), h


def check_cu_seqlens(op: str, cu_seqlens: Tensor, b: int, t: int) -> None:
    """ValueError unless ``cu_seqlens`` is an integer ``[N + 1]`` tensor rising strictly from 0
    to ``t`` and the batch is one row (a host sync: the offsets are read)."""
    if b != 1 or cu_seqlens.dim() != 1 or len(cu_seqlens) < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"{op}: cu_seqlens must be an integer [N + 1] tensor with B = 1, got B={b}, "
                         f"{tuple(cu_seqlens.shape)} {cu_seqlens.dtype}")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != t or bool((cu_seqlens.diff() <= 0).any()):
        raise ValueError(f"{op}: cu_seqlens {cu_seqlens.tolist()} must rise strictly from 0 to T={t}")
