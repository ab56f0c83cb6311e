"""One token of Mamba-2's SSD (Dao & Gu 2024) in Triton: the decoding step behind
:func:`kernels.ssd.ssd_step`, forward only.

Per head h: ``H' = exp(dt A_h) H + dt x (x) B`` (``H := 0`` where reset), ``y = H' C + D_h x``.
One program owns one (batch, head, block of ``BP`` head channels) with the state block ``[BP, N]``
in registers; the new state goes to a fresh fp32 tensor (the old one is only read, so a caller
may keep it). The reference is ``kernels.ssd.chunk_torch.ssd_step``. Batch and state offsets are
int64: ``B * H * P * N`` can pass 2^31 at large decoding batches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

POISON_OUTPUTS = False  # tests set True: fresh outputs start as NaN, so an unwritten element shows
BLOCK_P = 64  # head channels per program; the whole state dimension N stays in one block


@triton.jit
def _ssd_step_kernel(state, x, dt, A, Bm, Cm, D, reset, y, new, H: tl.constexpr, G: tl.constexpr,
                     P: tl.constexpr, N: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                     HAS_RESET: tl.constexpr, HAS_D: tl.constexpr):
    i_p, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = (i_bh // H).to(tl.int64), i_bh % H
    i_g = i_h // (H // G)
    o_p = i_p * BP + tl.arange(0, BP)
    o_n = tl.arange(0, BN)
    m_p, m_n = o_p < P, o_n < N
    p_h = (i_b * H + i_h) * P * N + o_p[:, None] * N + o_n[None, :]
    m_h = m_p[:, None] & m_n[None, :]
    p_x = (i_b * H + i_h) * P + o_p
    b_x = tl.load(x + p_x, mask=m_p, other=0.0).to(tl.float32)
    b_dt = tl.load(dt + i_b * H + i_h).to(tl.float32)
    b_B = tl.load(Bm + (i_b * G + i_g) * N + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_C = tl.load(Cm + (i_b * G + i_g) * N + o_n, mask=m_n, other=0.0).to(tl.float32)
    decay = tl.exp(b_dt * tl.load(A + i_h).to(tl.float32))
    if HAS_RESET:
        decay = tl.where(tl.load(reset + i_b) != 0, 0.0, decay)
    b_h = tl.load(state + p_h, mask=m_h, other=0.0).to(tl.float32)
    b_h = decay * b_h + (b_dt * b_x)[:, None] * b_B[None, :]
    b_y = tl.sum(b_h * b_C[None, :], axis=1)
    if HAS_D:
        b_y += tl.load(D + i_h).to(tl.float32) * b_x
    tl.store(new + p_h, b_h, mask=m_h)
    tl.store(y + p_x, b_y.to(y.dtype.element_ty), mask=m_p)


def ssd_step_triton(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One recurrent SSD step in Triton (decoding; no autograd).

    Args:
        state: ``[B, H, P, N]`` state before the token (any float dtype; read in fp32).
        x: ``[B, H, P]`` the token's input after the convolution.
        dt: ``[B, H]`` positive step sizes.
        A: ``[H]`` negative scalar decay per head; D: ``[H]`` skip, or None.
        B, C: ``[B, G, N]``; head h reads group ``h // (H / G)``.
        reset: ``[B]`` bool, True where the token starts a document (the state is dropped first).

    Returns:
        ``(y [B, H, P]`` in x's dtype, the new state ``[B, H, P, N]`` fp32, a fresh tensor).

    Raises:
        ValueError: on mismatched shapes.
    """
    if x.dim() != 3 or B.dim() != 3 or C.shape != B.shape:
        raise ValueError(f"ssd_step_triton: x {tuple(x.shape)} must be [B, H, P], B and C {tuple(B.shape)} [B, G, N]")
    b, h, p = x.shape
    g, n = B.shape[1:]
    if state.shape != (b, h, p, n) or dt.shape != (b, h) or A.shape != (h,) or B.shape[0] != b or h % g:
        raise ValueError(
            f"ssd_step_triton: state {tuple(state.shape)}, x {tuple(x.shape)}, dt {tuple(dt.shape)}, "
            f"A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    if D is not None and D.shape != (h,):
        raise ValueError(f"ssd_step_triton: D {tuple(D.shape)} must be {(h,)}")
    if reset is not None and reset.shape != (b,):
        raise ValueError(f"ssd_step_triton: reset {tuple(reset.shape)} must be {(b,)}")
    bp = max(16, min(BLOCK_P, triton.next_power_of_2(p)))
    bn = max(16, triton.next_power_of_2(n))
    alloc = (lambda *s, **kw: torch.full(s, float("nan"), **kw)) if POISON_OUTPUTS else torch.empty
    y = alloc(b, h, p, dtype=x.dtype, device=x.device)
    new = alloc(b, h, p, n, dtype=torch.float32, device=x.device)
    c = lambda v: None if v is None else v.contiguous()  # noqa: E731
    reset = reset.to(torch.int32).contiguous() if reset is not None else None
    _ssd_step_kernel[(triton.cdiv(p, bp), b * h)](
        c(state), c(x), c(dt), c(A), c(B), c(C), c(D), reset, y, new, H=h, G=g, P=p, N=n, BP=bp, BN=bn,
        HAS_RESET=reset is not None, HAS_D=D is not None)
    return y, new
