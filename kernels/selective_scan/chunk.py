"""Mamba-1 selective scan (Gu & Dao 2023) in Triton, forward and backward.

Per channel d and state index n, with ``A`` diagonal and one ``B``/``C`` per token:

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t * B_t        (h_{t-1} := 0 where reset_t)
    y_t = (C_t . h_t + D * x_t) * silu(z_t)                  (the gate only when z is given)

The reference is ``kernels.selective_scan.naive``. One program owns one (sequence, block of ``BD``
channels) and walks its tokens one by one with its state ``[BD, N]`` in fp32 registers: the state
is N times wider than the activations, so it is never written per token. A sequence is a batch row,
or with ``cu_seqlens`` (B = 1, packed) the tokens ``[bos, eos)`` of one packed sequence, which
then has its own initial and final state. The forward stores only the state entering each chunk
of ``CHUNK`` tokens. The backward walks the chunks last to first: it recomputes the chunk's states
from that checkpoint into a per-program scratch buffer (``CHUNK + 1`` states, L2-resident), then
runs the reverse-time recurrence ``G_{t-1} = exp(dt_t A) G_t + dL/dh_{t-1}`` reading them back.
Dividing by the decay to run the state backwards would blow up for strong decays, hence the recompute.

Inputs are read through their batch and token strides (x, dt and z share one pair, B and C
another), so the model's views of one projection (B and C are slices of ``x_proj``'s output)
need no copy; the channel dimension must be contiguous.

Determinism: dB and dC sum over channels, so each channel block writes its own partial slice; dA
and dD sum over sequences and time, accumulated in registers over time and written per sequence.
The slices are reduced afterwards with ``sum(0)``: no atomics, the backward is bitwise
deterministic. Pointer arithmetic only (block pointers are gone in Triton 3.9); every offset that
multiplies a sequence, token or stride index is int64 because ``B * T * D`` can pass 2^31 (the
field's kernels went wrong there, mamba#1015).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.selective_scan.chunk_torch import check_cu_seqlens

POISON_OUTPUTS = False  # tests set True: fresh outputs start as NaN, so an unwritten element shows
CHUNK = 64  # tokens between state checkpoints: checkpoints cost T / CHUNK states, scratch CHUNK + 1
BLOCK_D = 32  # channels per program; the whole state dimension N stays in one block


@triton.jit
def _load_token(x, dt, B, C, reset, p_u, p_bc, i_r, o_d, o_n, m_d, m_n, b_A, HAS_RESET: tl.constexpr):
    """One token's inputs in fp32 and its decay exp(dt * A), zero where a document starts.
    ``p_u``/``p_bc``: the token's offsets into x/dt and B/C; ``i_r`` its index into ``reset``.
    Masked lanes load zeros: their decay is 1 and their input 0, so they stay 0."""
    b_x = tl.load(x + p_u + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_dt = tl.load(dt + p_u + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_B = tl.load(B + p_bc + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_C = tl.load(C + p_bc + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_a = tl.exp(b_dt[:, None] * b_A)
    if HAS_RESET:
        b_a = tl.where(tl.load(reset + i_r) != 0, 0.0, b_a)
    return b_x, b_dt, b_B, b_C, b_a


@triton.jit
def _block(A, D, i_d, DIM: tl.constexpr, N: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
           HAS_D: tl.constexpr):
    """Offsets and masks of a channel block, with its rows of A and D in fp32."""
    o_d = i_d * BD + tl.arange(0, BD)
    o_n = tl.arange(0, BN)
    m_d = o_d < DIM
    m_n = o_n < N
    m_dn = m_d[:, None] & m_n[None, :]
    o_dn = o_d[:, None] * N + o_n[None, :]
    b_A = tl.load(A + o_dn, mask=m_dn, other=0.0).to(tl.float32)
    if HAS_D:
        b_D = tl.load(D + o_d, mask=m_d, other=0.0).to(tl.float32)
    else:
        b_D = tl.zeros([BD], dtype=tl.float32)
    return o_d, o_n, m_d, m_n, m_dn, o_dn, b_A, b_D


@triton.jit
def _span(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """(batch row, first token, end token) of sequence ``i_n``, int64."""
    if IS_VARLEN:
        i_b = tl.zeros([], dtype=tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        i_b = i_n.to(tl.int64)
        bos = tl.zeros([], dtype=tl.int64)
        eos = bos + T
    return i_b, bos, eos


@triton.jit
def _selective_scan_fwd_kernel(x, dt, A, B, C, D, z, reset, h0, cu_seqlens, y, ht, ckpt, T, NC,
                               s_ub, s_ut, s_bcb, s_bct, DIM: tl.constexpr, N: tl.constexpr,
                               CH: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
                               HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_RESET: tl.constexpr,
                               HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr):
    i_d, i_n = tl.program_id(0), tl.program_id(1)
    o_d, o_n, m_d, m_n, m_dn, o_dn, b_A, b_D = _block(A, D, i_d, DIM, N, BD, BN, HAS_D)
    i_b, bos, eos = _span(cu_seqlens, i_n, T, IS_VARLEN)
    p_h = i_n.to(tl.int64) * DIM * N + o_dn
    b_h = tl.zeros([BD, BN], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + p_h, mask=m_dn, other=0.0).to(tl.float32)
    for i_c in range(0, tl.cdiv(eos - bos, CH)):
        tl.store(ckpt + (i_n.to(tl.int64) * NC + i_c) * DIM * N + o_dn, b_h, mask=m_dn)
        for i_t in range(bos + i_c * CH, tl.minimum(eos, bos + i_c * CH + CH)):  # int64, as bos
            row = i_b * T + i_t  # into the contiguous outputs and reset
            p_u, p_bc = i_b * s_ub + i_t * s_ut, i_b * s_bcb + i_t * s_bct
            b_x, b_dt, b_B, b_C, b_a = _load_token(x, dt, B, C, reset, p_u, p_bc, row, o_d, o_n, m_d, m_n,
                                                   b_A, HAS_RESET)
            b_h = b_a * b_h + (b_dt * b_x)[:, None] * b_B[None, :]
            b_y = tl.sum(b_h * b_C[None, :], axis=1) + b_D * b_x
            if HAS_Z:
                b_z = tl.load(z + p_u + o_d, mask=m_d, other=0.0).to(tl.float32)
                b_y = b_y * b_z * tl.sigmoid(b_z)
            tl.store(y + row * DIM + o_d, b_y.to(y.dtype.element_ty), mask=m_d)
    if STORE_HT:
        tl.store(ht + p_h, b_h, mask=m_dn)


@triton.jit
def _selective_scan_bwd_kernel(x, dt, A, B, C, D, z, reset, cu_seqlens, ckpt, dy, dht, scratch, dx, ddt, dz,
                               dA_part, dB_part, dC_part, dD_part, dh0, T, NC, NR, s_ub, s_ut, s_bcb, s_bct,
                               DIM: tl.constexpr, N: tl.constexpr, CH: tl.constexpr, BD: tl.constexpr,
                               BN: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                               HAS_RESET: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                               IS_VARLEN: tl.constexpr):
    """All gradients of one (sequence, channel block). ``b_g`` is dL/dh of the current token
    through the later tokens (and the final state); dB and dC go to this block's slice ``[i_d]``
    of ``NR = B * T`` token rows."""
    i_d, i_n = tl.program_id(0), tl.program_id(1)
    o_d, o_n, m_d, m_n, m_dn, o_dn, b_A, b_D = _block(A, D, i_d, DIM, N, BD, BN, HAS_D)
    i_b, bos, eos = _span(cu_seqlens, i_n, T, IS_VARLEN)
    p_h = i_n.to(tl.int64) * DIM * N + o_dn
    b_g = tl.zeros([BD, BN], dtype=tl.float32)
    if HAS_DHT:
        b_g += tl.load(dht + p_h, mask=m_dn, other=0.0).to(tl.float32)
    b_dA = tl.zeros([BD, BN], dtype=tl.float32)
    b_dD = tl.zeros([BD], dtype=tl.float32)
    scratch += i_n.to(tl.int64) * (CH + 1) * DIM * N  # slot j holds the state after j chunk tokens
    dB_part += i_d.to(tl.int64) * NR * N
    dC_part += i_d.to(tl.int64) * NR * N
    n_c = tl.cdiv(eos - bos, CH)
    for i_r in range(0, n_c):
        i_c = n_c - 1 - i_r
        t0 = bos + i_c * CH
        t1 = tl.minimum(eos, t0 + CH)
        b_h = tl.load(ckpt + (i_n.to(tl.int64) * NC + i_c) * DIM * N + o_dn, mask=m_dn, other=0.0)
        tl.store(scratch + o_dn, b_h, mask=m_dn)
        for i_t in range(t0, t1):
            p_u, p_bc = i_b * s_ub + i_t * s_ut, i_b * s_bcb + i_t * s_bct
            b_x, b_dt, b_B, b_C, b_a = _load_token(x, dt, B, C, reset, p_u, p_bc, i_b * T + i_t, o_d, o_n,
                                                   m_d, m_n, b_A, HAS_RESET)
            b_h = b_a * b_h + (b_dt * b_x)[:, None] * b_B[None, :]
            tl.store(scratch + (i_t - t0 + 1) * DIM * N + o_dn, b_h, mask=m_dn)
        tl.debug_barrier()  # compiled: the threads that read a state back may not be those that wrote it
        for i_k in range(0, t1 - t0):
            i_t = t1 - 1 - i_k
            row = i_b * T + i_t
            p_u, p_bc = i_b * s_ub + i_t * s_ut, i_b * s_bcb + i_t * s_bct
            b_x, b_dt, b_B, b_C, b_a = _load_token(x, dt, B, C, reset, p_u, p_bc, row, o_d, o_n, m_d, m_n,
                                                   b_A, HAS_RESET)
            b_hp = tl.load(scratch + (i_t - t0) * DIM * N + o_dn, mask=m_dn, other=0.0)  # h_{t-1}
            b_dy = tl.load(dy + row * DIM + o_d, mask=m_d, other=0.0).to(tl.float32)
            if HAS_Z:
                b_z = tl.load(z + p_u + o_d, mask=m_d, other=0.0).to(tl.float32)
                b_sig = tl.sigmoid(b_z)
                b_y = tl.sum(b_h * b_C[None, :], axis=1) + b_D * b_x  # the ungated output, recomputed
                b_dz = b_dy * b_y * b_sig * (1.0 + b_z * (1.0 - b_sig))  # silu' = sig (1 + z (1 - sig))
                tl.store(dz + row * DIM + o_d, b_dz.to(dz.dtype.element_ty), mask=m_d)
                b_dy = b_dy * b_z * b_sig
            b_g += b_dy[:, None] * b_C[None, :]  # now dL/dh_t in full
            tl.store(dC_part + row * N + o_n, tl.sum(b_dy[:, None] * b_h, axis=0), mask=m_n)
            b_u = b_dt * b_x
            b_du = tl.sum(b_g * b_B[None, :], axis=1)
            tl.store(dB_part + row * N + o_n, tl.sum(b_g * b_u[:, None], axis=0), mask=m_n)
            b_dlog = b_g * b_hp * b_a  # dL/d(dt * A); zero at resets because the decay is
            b_dA += b_dlog * b_dt[:, None]
            b_dD += b_dy * b_x
            b_ddt = tl.sum(b_dlog * b_A, axis=1) + b_du * b_x
            tl.store(ddt + row * DIM + o_d, b_ddt.to(ddt.dtype.element_ty), mask=m_d)
            tl.store(dx + row * DIM + o_d, (b_du * b_dt + b_dy * b_D).to(dx.dtype.element_ty), mask=m_d)
            b_g = b_a * b_g
            b_h = b_hp
        tl.debug_barrier()  # the next chunk overwrites the scratch states read above
    if STORE_DH0:
        tl.store(dh0 + p_h, b_g, mask=m_dn)
    tl.store(dA_part + p_h, b_dA, mask=m_dn)
    tl.store(dD_part + i_n.to(tl.int64) * DIM + o_d, b_dD, mask=m_d)


def _new(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _blocks(dim: int, n: int) -> tuple[int, int]:
    return min(BLOCK_D, triton.next_power_of_2(dim)), triton.next_power_of_2(n)


def shared_strides(*ts: Tensor | None) -> list[Tensor | None]:
    """``ts`` as they are when all share one stride layout with a contiguous last dimension (the
    kernels then read them through those strides), else contiguous copies."""
    given = [v for v in ts if v is not None]
    if all(v.stride() == given[0].stride() for v in given) and given[0].stride(-1) == 1:
        return list(ts)
    return [None if v is None else v.contiguous() for v in ts]


def _sequences(x: Tensor, cu_seqlens: Tensor | None) -> tuple[int, int]:
    """(number of sequences, checkpoints per sequence)."""
    if cu_seqlens is None:
        return x.shape[0], triton.cdiv(x.shape[1], CHUNK)
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if len(cu_seqlens) > 1 else 0
    return len(cu_seqlens) - 1, max(1, triton.cdiv(longest, CHUNK))


def selective_scan_fwd(x, dt, A, B, C, D, z, h0, reset, cu_seqlens, output_final_state):
    """Launcher: ``y [B, T, D]`` in x's dtype, the final states ``[N_seq, D, N]`` fp32 if asked,
    and the chunk checkpoints ``[N_seq, NC, D, N]`` fp32 the backward starts from."""
    b, t, dim = x.shape
    n = A.shape[-1]
    bd, bn = _blocks(dim, n)
    n_seq, nc = _sequences(x, cu_seqlens)
    y = _new((b, t, dim), x.dtype, x.device)
    ht = _new((n_seq, dim, n), torch.float32, x.device) if output_final_state else None
    ckpt = _new((n_seq, nc, dim, n), torch.float32, x.device)
    _selective_scan_fwd_kernel[(triton.cdiv(dim, bd), n_seq)](
        x, dt, A, B, C, D, z, reset, h0, cu_seqlens, y, ht, ckpt, t, nc, x.stride(0), x.stride(1),
        B.stride(0), B.stride(1), DIM=dim, N=n, CH=CHUNK, BD=bd, BN=bn, HAS_D=D is not None,
        HAS_Z=z is not None, HAS_RESET=reset is not None, HAS_H0=h0 is not None,
        STORE_HT=output_final_state, IS_VARLEN=cu_seqlens is not None)
    return y, ht, ckpt


def selective_scan_bwd(x, dt, A, B, C, D, z, h0, reset, cu_seqlens, ckpt, dy, dht) -> tuple[Tensor | None, ...]:
    """Launcher: ``(dx, ddt, dA, dB, dC, dD, dz, dh0)``; partial sums reduced in a fixed order."""
    b, t, dim = x.shape
    n = A.shape[-1]
    bd, bn = _blocks(dim, n)
    nd, n_seq, nc = triton.cdiv(dim, bd), ckpt.shape[0], ckpt.shape[1]
    dx, ddt = _new(x.shape, x.dtype, x.device), _new(dt.shape, dt.dtype, dt.device)
    dz = _new(z.shape, z.dtype, z.device) if z is not None else None
    dA_part = _new((n_seq, dim, n), torch.float32, x.device)
    dB_part = _new((nd, b, t, n), torch.float32, x.device)
    dC_part = _new((nd, b, t, n), torch.float32, x.device)
    dD_part = _new((n_seq, dim), torch.float32, x.device)
    dh0 = _new((n_seq, dim, n), torch.float32, x.device) if h0 is not None else None
    scratch = _new((n_seq, CHUNK + 1, dim, n), torch.float32, x.device)
    _selective_scan_bwd_kernel[(nd, n_seq)](
        x, dt, A, B, C, D, z, reset, cu_seqlens, ckpt, dy, dht, scratch, dx, ddt, dz, dA_part, dB_part,
        dC_part, dD_part, dh0, t, nc, b * t, x.stride(0), x.stride(1), B.stride(0), B.stride(1), DIM=dim,
        N=n, CH=CHUNK, BD=bd, BN=bn, HAS_D=D is not None, HAS_Z=z is not None, HAS_RESET=reset is not None,
        HAS_DHT=dht is not None, STORE_DH0=h0 is not None, IS_VARLEN=cu_seqlens is not None)
    dA = dA_part.sum(0).to(A.dtype)
    dB, dC = dB_part.sum(0).to(B.dtype), dC_part.sum(0).to(C.dtype)
    dD = dD_part.sum(0).to(D.dtype) if D is not None else None
    return dx, ddt, dA, dB, dC, dD, dz, None if dh0 is None else dh0.to(h0.dtype)


class SelectiveScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, h0, reset, cu_seqlens, output_final_state):  # type: ignore[override]
        y, ht, ckpt = selective_scan_fwd(x, dt, A, B, C, D, z, h0, reset, cu_seqlens, output_final_state)
        ctx.save_for_backward(x, dt, A, B, C, D, z, h0, reset, cu_seqlens, ckpt)
        return y, ht

    @staticmethod
    def backward(ctx, dy, dht):  # type: ignore[override]
        x, dt, A, B, C, D, z, h0, reset, cu_seqlens, ckpt = ctx.saved_tensors
        grads = selective_scan_bwd(x, dt, A, B, C, D, z, h0, reset, cu_seqlens, ckpt, dy.contiguous(),
                                   dht.contiguous() if dht is not None else None)
        return *grads, None, None, None


def selective_scan_triton(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    reset: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Mamba-1 selective scan over whole sequences in Triton (Gu & Dao 2023, Algorithm 2).

    Same recurrence and layout as ``kernels.selective_scan.naive``, plus the optional fused
    output gate ``y * silu(z)`` of the Mamba block.

    Args:
        x: ``[B, T, D]`` input after the convolution (fp32, bf16 or fp16; computed in fp32).
        dt: ``[B, T, D]`` positive step sizes (softplus already applied).
        A: ``[D, N]`` negative diagonal state matrix.
        B, C: ``[B, T, N]`` input and output projections of the state.
        D: ``[D]`` skip connection, or None for none.
        z: ``[B, T, D]`` gate, or None: the output is multiplied by ``silu(z)``.
        initial_state: ``[N_seq, D, N]`` state before the first token of each sequence, or None
            for zeros (``N_seq`` is B, or the number of packed sequences with ``cu_seqlens``).
        output_final_state: also return the state after the last token of each sequence.
        reset: ``[B, T]`` bool, True where a document starts: the carried state is dropped
            before that token is added.
        cu_seqlens: ``[N_seq + 1]`` integer offsets of packed sequences in a batch of B = 1,
            rising from 0 to T; each sequence starts from its own initial state.

    Returns:
        ``y [B, T, D]`` in x's dtype, and the final states ``[N_seq, D, N]`` fp32 (None unless
        ``output_final_state``). Differentiable in x, dt, A, B, C, D, z and initial_state.

    Raises:
        ValueError: on mismatched shapes, an empty sequence or bad ``cu_seqlens``.
    """
    if x.dim() != 3 or dt.shape != x.shape:
        raise ValueError(f"selective_scan_triton: x {tuple(x.shape)} and dt {tuple(dt.shape)} must match [B, T, D]")
    b, t, d = x.shape
    n = A.shape[-1]
    if A.shape != (d, n) or (D is not None and D.shape != (d,)):
        raise ValueError(f"selective_scan_triton: A {tuple(A.shape)} must be {(d, 'N')}, D {None if D is None else tuple(D.shape)} {(d,)}")
    if B.shape != (b, t, n) or C.shape != (b, t, n):
        raise ValueError(f"selective_scan_triton: B {tuple(B.shape)} and C {tuple(C.shape)} must be {(b, t, n)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"selective_scan_triton: z {tuple(z.shape)} must be {tuple(x.shape)}")
    if t == 0:
        raise ValueError("selective_scan_triton: empty sequence")
    n_seq = b
    if cu_seqlens is not None:
        check_cu_seqlens("selective_scan_triton", cu_seqlens, b, t)
        n_seq = len(cu_seqlens) - 1
        cu_seqlens = cu_seqlens.to(torch.int64).contiguous()
    if initial_state is not None and initial_state.shape != (n_seq, d, n):
        raise ValueError(f"selective_scan_triton: initial_state {tuple(initial_state.shape)} must be {(n_seq, d, n)}")
    if reset is not None and reset.shape != (b, t):
        raise ValueError(f"selective_scan_triton: reset {tuple(reset.shape)} must be {(b, t)}")
    c = lambda v: None if v is None else v.contiguous()  # noqa: E731
    x, dt, z = shared_strides(x, dt, z)
    B, C = shared_strides(B, C)
    reset = reset.to(torch.int32).contiguous() if reset is not None else None
    return SelectiveScanFunction.apply(x, dt, c(A), B, C, c(D), z, c(initial_state), reset, cu_seqlens,
                                       output_final_state)

