"""Mamba-2's state space duality (SSD) in pure PyTorch, chunked: the CPU path, and what a Triton
kernel would replace on CUDA. Called through :mod:`kernels.ssd`.

The recurrence, per head h (scalar decay ``A[h]``; heads share ``B``/``C`` within a group):

    H_t = exp(dt_t * A) * H_{t-1} + dt_t * x_t (x) B_t        (H_{t-1} := 0 where reset_t)
    y_t = H_t . C_t + D * x_t                                  H: [P, N] per head

:func:`ssd_chunked` is the chunked algorithm of the paper's listing (Dao & Gu 2024, "ssd_minimal"):
quadratic attention-like blocks inside each chunk, one state per chunk, a scan over chunk states,
and the states' contribution to every output. A reset is a log-decay of -inf on the carried path:
all decays are sums taken without subtracting cumulative sums (``segsum``), so -inf stays -inf,
exp(-inf) = 0, and no -inf - -inf (NaN) ever appears, in the forward or the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.dispatch import at_least_fp32


def segsum(a: Tensor) -> Tensor:
    """``a [..., L]`` -> ``[..., L, L]``: out[i, j] = a[j+1] + ... + a[i] for j <= i (0 on the
    diagonal), -inf above it. Summed directly, not as cumsum[i] - cumsum[j]: more accurate, and
    an -inf entry (a reset) makes every sum across it -inf instead of NaN."""
    L = a.shape[-1]
    below = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device), diagonal=-1)
    x = a.unsqueeze(-1).expand(*a.shape, L).masked_fill(~below, 0.0)  # x[..., i, j] = a[i] for i > j
    out = torch.cumsum(x, dim=-2)
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool, device=a.device))
    return out.masked_fill(~causal, float("-inf"))


def _check_shapes(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None) -> None:
    b, t, h, _ = x.shape
    if dt.shape != (b, t, h) or A.shape != (h,) or (D is not None and D.shape != (h,)):
        raise ValueError(
            f"ssd: x {tuple(x.shape)} needs dt {(b, t, h)}, A and D {(h,)}; got dt {tuple(dt.shape)}, "
            f"A {tuple(A.shape)}, D {None if D is None else tuple(D.shape)}"
        )
    if B.ndim != 4 or B.shape[:2] != (b, t) or C.shape != B.shape or h % B.shape[2]:
        raise ValueError(
            f"ssd: B {tuple(B.shape)} and C {tuple(C.shape)} must be [{b}, {t}, G, N] with G dividing {h} heads"
        )


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    h0: Tensor | None = None,
    reset: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Mamba-2 SSD over a whole sequence (training / prefill), chunk by chunk.

    Args:
        x: ``[B, T, H, P]`` input after the convolution.
        dt: ``[B, T, H]`` positive step sizes (bias and softplus already applied).
        A: ``[H]`` negative scalar decay per head.
        B, C: ``[B, T, G, N]`` input and output projections of the state; head h uses group
            ``h // (H // G)``.
        D: ``[H]`` skip connection, or None.
        h0: ``[B, H, P, N]`` initial state, or None for zeros.
        reset: ``[B, T]`` bool, True where a document starts: the carried state is dropped
            before that token is added.
        chunk_size: tokens per chunk; T need not be a multiple of it.

    Returns:
        ``y [B, T, H, P]`` in the dtype of ``x``, and the final state ``[B, H, P, N]`` in fp32
        (fp64 for float64 inputs).
    """
    _check_shapes(x, dt, A, B, C, D)
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    if t == 0:
        raise ValueError("ssd_chunked: empty sequence")
    if h0 is not None and h0.shape != (b, h, p, n):
        raise ValueError(f"ssd_chunked: h0 {tuple(h0.shape)} must be {(b, h, p, n)}")
    if reset is not None and reset.shape != (b, t):
        raise ValueError(f"ssd_chunked: reset {tuple(reset.shape)} must be {(b, t)}")
    if chunk_size <= 0:
        raise ValueError(f"ssd_chunked: chunk_size must be > 0, got {chunk_size}")
    with torch.autocast(x.device.type, enabled=False):  # decays and states need fp32
        f = at_least_fp32  # fp64 stays fp64: a float64 check is not rounded to fp32
        y, h_last = _ssd(f(x), f(dt), f(A), f(B), f(C), h0, reset, chunk_size)
        if D is not None:
            y = y + f(x) * f(D)[:, None]
    return y.to(x.dtype), h_last


def _ssd(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, h0: Tensor | None, reset: Tensor | None, q: int
) -> tuple[Tensor, Tensor]:
    """The four steps of the listing on fp32 tensors (shapes as in :func:`ssd_chunked`)."""
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    k = h // g  # heads per group
    a = dt * A  # [B, T, H] log-decay of each step
    if reset is not None:
        a = a.masked_fill(reset.unsqueeze(-1), float("-inf"))
    xdt = x * dt.unsqueeze(-1)
    pad = -t % q  # padded steps: decay 1 (a = 0), input 0, so the final state is unchanged
    if pad:
        xdt, B, C = (F.pad(z, (0, 0, 0, 0, 0, pad)) for z in (xdt, B, C))
        a = F.pad(a, (0, 0, 0, pad))
    c = (t + pad) // q
    xdt = xdt.view(b, c, q, g, k, p)
    B, C = B.view(b, c, q, g, n), C.view(b, c, q, g, n)
    a = a.view(b, c, q, g, k).permute(0, 3, 4, 1, 2)  # [B, G, K, c, q]
    a_cum = a.cumsum(-1)  # decay from the chunk start through step l (no subtraction: -inf is safe)
    decay = segsum(a).exp()  # [B, G, K, c, l, s]: decay from step s to step l of one chunk

    # 1. inside each chunk: attention-like y_l = sum_{s <= l} (C_l . B_s) decay[l, s] x_s dt_s
    scores = torch.einsum("bclgn,bcsgn->bgcls", C, B).unsqueeze(2) * decay  # [B, G, K, c, l, s]
    y = torch.einsum("bgkcls,bcsgkp->bclgkp", scores, xdt)
    # 2. each chunk's final state from its own inputs (the last row of decay: s -> chunk end)
    to_end = decay[..., -1, :].permute(0, 3, 4, 1, 2).unsqueeze(-1)  # [B, c, s, G, K, 1]
    states = torch.einsum("bcsgn,bcsgkp->bcgkpn", B, xdt * to_end)
    # 3. pass states across chunks: the state entering chunk z sums every earlier chunk's
    #    state (and h0) decayed by the chunks in between
    start = x.new_zeros(b, g, k, p, n) if h0 is None else h0.to(x.dtype).reshape(b, g, k, p, n)
    states = torch.cat([start.unsqueeze(1), states], dim=1)  # [B, c+1, G, K, P, N]
    chunk_decay = segsum(F.pad(a_cum[..., -1], (1, 0))).exp()  # [B, G, K, c+1, c+1]
    states = torch.einsum("bgkzc,bcgkpn->bzgkpn", chunk_decay, states)
    # 4. the entering state's contribution to each output, decayed from the chunk start
    from_start = a_cum.exp().permute(0, 3, 4, 1, 2).unsqueeze(-1)  # [B, c, l, G, K, 1]
    y = y + torch.einsum("bclgn,bcgkpn->bclgkp", C, states[:, :-1]) * from_start
    y = y.reshape(b, c * q, h, p)[:, :t]
    return y, states[:, -1].reshape(b, h, p, n)


def ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One recurrent step (decoding): ``state [B, H, P, N]``, ``x [B, H, P]``, ``dt [B, H]``,
    ``B, C [B, G, N]``, ``reset [B]`` bool. Returns ``(y [B, H, P] in x's dtype, new state fp32)``."""
    b, h, p = x.shape
    g = B.shape[1]
    if dt.shape != (b, h) or B.shape != C.shape or B.shape[0] != b or h % g or state.shape[:3] != (b, h, p):
        raise ValueError(
            f"ssd_step: state {tuple(state.shape)}, x {tuple(x.shape)}, dt {tuple(dt.shape)}, "
            f"B {tuple(B.shape)}, C {tuple(C.shape)}"
        )
    f = at_least_fp32
    Bh = f(B).repeat_interleave(h // g, dim=1)  # [B, H, N]
    Ch = f(C).repeat_interleave(h // g, dim=1)
    decay = torch.exp(f(dt) * f(A))  # [B, H]
    if reset is not None:
        decay = decay * (~reset).to(decay.dtype)[:, None]
    xf = f(x)
    new = decay[..., None, None] * f(state) + (xf * f(dt)[..., None]).unsqueeze(-1) * Bh.unsqueeze(2)
    y = (new @ Ch.unsqueeze(-1)).squeeze(-1)  # [B, H, P]
    if D is not None:
        y = y + xf * f(D)[:, None]
    return y.to(x.dtype), new
