"""Mamba-1's selective scan from a nonzero initial state, by linearity: what state passing
across devices (context parallelism) adds to a scan from a zero state.

``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t`` is linear in its initial state, so the outputs from
``h_0 = h_in`` are those from zero plus, per channel d,

    y_t[d] += sum_n C_t[n] * exp(A[d, n] * Lambda_t[d]) * h_in[d, n],   Lambda_t = sum_{i <= t} dt_i

(t before any reset), and the final state gains ``exp(A * Lambda_T) * h_in``. The decays are
``[B, T, D, N]``, as wide as the scan's states: the forward and the hand-written backward build
them ``BLOCK`` tokens at a time and keep only the inputs, as the chunked scan does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dispatch import at_least_fp32

BLOCK = 64  # tokens whose [B, BLOCK, D, N] decays exist at once


class _InitialStateOutput(torch.autograd.Function):
    """y[b, t, d] = sum_n C[b, t, n] h[b, d, n] exp(A[d, n] lam[b, t, d]); lam, C, h, A fp32+."""

    @staticmethod
    def forward(ctx, lam, A, C, h):  # type: ignore[override]
        y = lam.new_empty(lam.shape)
        for t0 in range(0, lam.shape[1], BLOCK):
            sl = slice(t0, t0 + BLOCK)
            p = torch.exp(lam[:, sl, :, None] * A).mul_(h[:, None])  # [B, L, D, N]
            y[:, sl] = (p @ C[:, sl, :, None]).squeeze(-1)
        ctx.save_for_backward(lam, A, C, h)
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        lam, A, C, h = ctx.saved_tensors
        g_lam, g_C = torch.empty_like(lam), torch.empty_like(C)
        g_A, g_h = torch.zeros_like(A), torch.zeros_like(h)
        for t0 in range(0, lam.shape[1], BLOCK):
            sl = slice(t0, t0 + BLOCK)
            e = torch.exp(lam[:, sl, :, None] * A)  # [B, L, D, N]
            p = e * h[:, None]
            g_C[:, sl] = (gy[:, sl, None, :] @ p).squeeze(-2)  # sum_d gy p
            w = gy[:, sl, :, None] * C[:, sl, None, :]  # dL/dp [B, L, D, N]
            g_h += (w * e).sum(1)
            q = w.mul_(p)  # dL/d(A lam)
            g_lam[:, sl] = (q * A).sum(-1)
            g_A += torch.einsum("bldn,bld->dn", q, lam[:, sl])
        return g_lam, g_A, g_C, g_h


def selective_scan_total_decay(dt: Tensor, A: Tensor, reset: Tensor | None = None) -> Tensor:
    """The decay a whole sequence applies to the scan's initial state: ``exp(A * sum_t dt_t)``,
    zero in rows where a document starts anywhere in it (t = 0 included).

    Args:
        dt: ``[B, T, D]`` positive step sizes; A: ``[D, N]`` negative diagonal state matrix.
        reset: ``[B, T]`` bool, True where a document starts, or None.

    Returns:
        ``[B, D, N]`` in fp32 or wider: the final state of a scan from ``h_in`` is that from zero
        plus ``decay * h_in``. Differentiable in dt and A.
    """
    decay = torch.exp(at_least_fp32(dt).sum(1)[..., None] * at_least_fp32(A))  # [B, D, N]
    if reset is not None:
        decay = decay * (~reset.any(1)).to(decay.dtype)[:, None, None]
    return decay


def selective_scan_initial_state_output(
    dt: Tensor, A: Tensor, C: Tensor, initial_state: Tensor, reset: Tensor | None = None
) -> Tensor:
    """The part of :func:`kernels.selective_scan.selective_scan`'s ungated output due to its
    initial state: ``y_t[d] = sum_n C_t[n] exp(A[d, n] sum_{i <= t} dt_i[d]) h_in[d, n]`` for
    t before the first document start of the row, 0 from it on (Gu & Dao 2023's recurrence
    unrolled from ``h_in``; the D skip and the inputs belong to the zero-state scan).

    Args:
        dt: ``[B, T, D]`` positive step sizes; A: ``[D, N]`` negative diagonal state matrix.
        C: ``[B, T, N]`` output projections of the state.
        initial_state: ``[B, D, N]`` state before the first token.
        reset: ``[B, T]`` bool, True where a document starts, or None.

    Returns:
        ``[B, T, D]`` in fp32 or wider; with the output gate z, multiply it by ``silu(z)``
        before adding. Differentiable in dt, A, C and initial_state; memory O(B T (D + N))
        plus one block's ``[B, BLOCK, D, N]``.

    Raises:
        ValueError: mismatched shapes.
    """
    b, t, d = dt.shape
    n = A.shape[-1]
    if A.shape != (d, n) or C.shape != (b, t, n) or initial_state.shape != (b, d, n):
        raise ValueError(
            f"selective_scan_initial_state_output: dt {tuple(dt.shape)}, A {tuple(A.shape)}, C {tuple(C.shape)}, "
            f"initial_state {tuple(initial_state.shape)} must be [B, T, D], [D, N], [B, T, N], [B, D, N]"
        )
    if reset is not None and reset.shape != (b, t):
        raise ValueError(f"selective_scan_initial_state_output: reset {tuple(reset.shape)} must be {(b, t)}")
    lam = at_least_fp32(dt).cumsum(1)
    dtype = lam.dtype
    with torch.autocast(dt.device.type, enabled=False):
        y = _InitialStateOutput.apply(lam, A.to(dtype), C.to(dtype), initial_state.to(dtype))
    if reset is not None:
        y = y * (reset.cumsum(1) == 0).to(dtype)[..., None]
    return y
