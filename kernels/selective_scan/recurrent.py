"""Mamba-1 single-token state update in Triton (decoding), mamba_ssm's ``selective_state_update``.

Per channel d and state index n (Gu & Dao 2023, Algorithm 2, one token):

    h' = exp(dt * A) * h + dt * x * B          (h := 0 where reset)
    y  = (C . h' + D * x) * silu(z)            (the gate only when z is given)

One program owns one (batch row, block of ``BLOCK_D`` channels) and its state tile ``[BD, N]``:
it reads the old state once and writes the new one once, which is all a decoding step costs
(the state is N times wider than the token's activations). The new state goes to a fresh fp32
tensor, so the caller's state is never modified (the PyTorch path's contract; a CUDA graph that
wants it in place copies it back). Inputs are read through their batch strides (x, dt and z share
one, B and C another: slices of ``x_proj``'s output need no copy), the state through its batch
and channel strides; the last dimension of each must be contiguous. Offsets are int64: batch
times stride can pass 2^31. Forward only: decoding needs no gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.selective_scan.chunk import shared_strides

POISON_OUTPUTS = False  # tests set True: fresh outputs start as NaN, so an unwritten element shows
BLOCK_D = 32  # channels per program; the whole state dimension N stays in one block


@triton.jit
def _selective_state_update_kernel(h, x, dt, A, B, C, D, z, reset, y, h_new, s_hb, s_hd, s_ub, s_bcb,
                                   DIM: tl.constexpr, N: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
                                   HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_RESET: tl.constexpr):
    i_d, i_b = tl.program_id(0), tl.program_id(1).to(tl.int64)
    o_d = i_d * BD + tl.arange(0, BD)
    o_n = tl.arange(0, BN)
    m_d, m_n = o_d < DIM, o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * N + o_n[None, :]
    b_A = tl.load(A + o_dn, mask=m_dn, other=0.0).to(tl.float32)
    b_h = tl.load(h + i_b * s_hb + o_d[:, None].to(tl.int64) * s_hd + o_n[None, :], mask=m_dn, other=0.0)
    b_x = tl.load(x + i_b * s_ub + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_dt = tl.load(dt + i_b * s_ub + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_B = tl.load(B + i_b * s_bcb + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_C = tl.load(C + i_b * s_bcb + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_a = tl.exp(b_dt[:, None] * b_A)
    if HAS_RESET:
        b_a = tl.where(tl.load(reset + i_b) != 0, 0.0, b_a)
    b_h = b_a * b_h.to(tl.float32) + (b_dt * b_x)[:, None] * b_B[None, :]
    b_y = tl.sum(b_h * b_C[None, :], axis=1)
    if HAS_D:
        b_y += tl.load(D + o_d, mask=m_d, other=0.0).to(tl.float32) * b_x
    if HAS_Z:
        b_z = tl.load(z + i_b * s_ub + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_y = b_y * b_z * tl.sigmoid(b_z)
    tl.store(y + i_b * DIM + o_d, b_y.to(y.dtype.element_ty), mask=m_d)
    tl.store(h_new + i_b * DIM * N + o_dn, b_h, mask=m_dn)


def _new(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def selective_state_update_triton(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One token of the Mamba-1 selective scan (decoding), in Triton.

    Args:
        state: ``[B, D, N]`` state after the previous token (fp32, any float dtype is read).
        x: ``[B, D]`` input after the convolution; dt ``[B, D]`` positive step sizes.
        A: ``[D, N]`` negative diagonal state matrix.
        B, C: ``[B, N]`` input and output projections of the state.
        D: ``[D]`` skip connection, or None.
        z: ``[B, D]`` gate, or None: the output is multiplied by ``silu(z)``.
        reset: ``[B]`` bool, True where this token starts a document: the state is dropped first.

    Returns:
        ``(y [B, D] in x's dtype, new state [B, D, N] fp32)``; the new state is a fresh tensor
        and ``state`` is left unchanged. Computed in fp32.

    Raises:
        ValueError: on mismatched shapes.
    """
    if x.dim() != 2 or dt.shape != x.shape:
        raise ValueError(f"selective_state_update_triton: x {tuple(x.shape)} and dt {tuple(dt.shape)} must match [B, D]")
    b, d = x.shape
    n = A.shape[-1]
    if A.shape != (d, n) or B.shape != (b, n) or C.shape != (b, n) or state.shape != (b, d, n):
        raise ValueError(
            f"selective_state_update_triton: A {tuple(A.shape)}, B {tuple(B.shape)}, C {tuple(C.shape)}, "
            f"state {tuple(state.shape)} must be {(d, n)}, {(b, n)}, {(b, n)}, {(b, d, n)}"
        )
    if (D is not None and D.shape != (d,)) or (z is not None and z.shape != x.shape) or (
        reset is not None and reset.shape != (b,)
    ):
        raise ValueError(f"selective_state_update_triton: D must be {(d,)}, z {(b, d)}, reset {(b,)}")
    x, dt, z = shared_strides(x, dt, z)
    B, C = shared_strides(B, C)
    if state.stride(-1) != 1:
        state = state.contiguous()
    A = A.contiguous()
    D = D.contiguous() if D is not None else None
    reset = reset.to(torch.int32).contiguous() if reset is not None else None
    bd, bn = min(BLOCK_D, triton.next_power_of_2(d)), triton.next_power_of_2(n)
    y = _new((b, d), x.dtype, x.device)
    h_new = _new((b, d, n), torch.float32, x.device)
    _selective_state_update_kernel[(triton.cdiv(d, bd), b)](
        state, x, dt, A, B, C, D, z, reset, y, h_new, state.stride(0), state.stride(1), x.stride(0),
        B.stride(0), DIM=d, N=n, BD=bd, BN=bn, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_RESET=reset is not None)
    return y, h_new
