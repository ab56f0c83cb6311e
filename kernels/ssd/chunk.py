"""Mamba-2's SSD (Dao & Gu 2024, "Transformers are SSMs", section 6: the chunked algorithm) in
Triton, forward and backward, with packed sequences (``cu_seqlens``) and document resets.

Per head h (scalar decay ``A[h]``, B and C shared by the ``H / G`` heads of a group):

    H_t = exp(dt_t A) H_{t-1} + dt_t x_t (x) B_t        (H_{t-1} := 0 where reset_t)
    y_t = H_t C_t + D x_t                                H: [P, N]

The reference is ``kernels.ssd.chunk_torch.ssd_chunked``. One program owns one (sequence, head,
block of ``BP`` head channels) and walks the sequence's chunks of ``BT`` tokens in order with the
state ``[BP, N]`` in fp32 registers: the paper's four steps per chunk are the masked
``(C B^T) * L`` block times ``dt x`` (intra-chunk output), the entering state read through ``C``
(chunk scan), and the chunk's own contribution to the leaving state (chunk state), the state
passing being the register carry from one chunk to the next. No per-chunk state goes to memory;
the backward recomputes them.

Decays: ``L[i, j] = exp(cum_i - cum_j)`` for ``j <= i`` in the same document, with ``cum`` the
cumulative sum of ``dt A <= 0`` from the chunk start. A cumulative sum of non-positive numbers is
non-increasing even after rounding, so every exponent is <= 0 (the ``j > i`` entries are masked
to -inf before the exp) and strong decays underflow to 0 instead of overflowing.

Backward, two kernels. The first walks forward recomputing the state and writes dC; the second
walks backward carrying dS (the gradient of the state leaving the chunk) and writes dx, dB, the
``dt`` factor of dx's path, and the gradient of the log decays: ``dt A`` acts only through the
cumulative log decays ``b_t``, and ``d b_t = C_t . dC_t - B_t . dB_t`` (plus ``sum dS_T * H_T`` at
a sequence's last token), so ``d(dt A)_t`` is the reverse cumulative sum of ``d b`` inside each
document (0 where a document starts: that decay multiplies a dropped state). Sums over channel
blocks and over the heads of a group go to per-block, per-head buffers reduced afterwards in torch
in a fixed order: no atomics, the backward is bitwise deterministic. Pointer arithmetic only
(block pointers are gone in Triton 3.9); token, sequence and state offsets are int64 because
``B * T * H * P`` can pass 2^31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

POISON_OUTPUTS = False  # tests set True: fresh outputs start as NaN, so an unwritten element shows
CHUNK = 64  # tokens per chunk (BT); tl.dot needs >= 16
BLOCK_P = 64  # head channels per program; the whole state dimension N stays in one block


@triton.jit
def _seq(cu, i_n, T, VARLEN: tl.constexpr):
    """(batch row, first token, end) of sequence ``i_n``: a row of ``[B, T]`` or a packed one."""
    if VARLEN:
        bos = tl.load(cu + i_n).to(tl.int64)
        eos = tl.load(cu + i_n + 1).to(tl.int64)
        i_b = i_n * 0
    else:
        bos = i_n.to(tl.int64) * 0
        eos = bos + T
        i_b = i_n
    return i_b.to(tl.int64), bos, eos


@triton.jit
def _load_chunk(x, dt, Bm, Cm, reset, b_A, i_b, i_h, i_g, i_p, bos, eos, i_t, T, sxb, sxt, sxh,
                H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, BT: tl.constexpr,
                BP: tl.constexpr, BN: tl.constexpr, HAS_RESET: tl.constexpr):
    """One chunk (zeros past the sequence end: dt = 0 adds nothing and decays nothing) and the
    decay quantities all three kernels share."""
    o_t = bos + i_t * BT + tl.arange(0, BT).to(tl.int64)
    o_p = i_p * BP + tl.arange(0, BP)
    o_n = tl.arange(0, BN)
    m_t = o_t < eos
    m_tp = m_t[:, None] & (o_p < P)[None, :]
    m_tn = m_t[:, None] & (o_n < N)[None, :]
    row = i_b * T + o_t  # token row of the contiguous [B, T, ...] inputs
    p_x = i_b * sxb + o_t[:, None] * sxt + i_h * sxh + o_p[None, :]  # x may carry any strides
    p_y = (row * H + i_h)[:, None] * P + o_p[None, :]  # y, dy, dx: contiguous
    p_n = (row * G + i_g)[:, None] * N + o_n[None, :]
    b_x = tl.load(x + p_x, mask=m_tp, other=0.0).to(tl.float32)
    b_dt = tl.load(dt + row * H + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_B = tl.load(Bm + p_n, mask=m_tn, other=0.0).to(tl.float32)
    b_C = tl.load(Cm + p_n, mask=m_tn, other=0.0).to(tl.float32)
    if HAS_RESET:
        b_r = tl.load(reset + row, mask=m_t, other=0)
    else:
        b_r = tl.zeros([BT], dtype=tl.int32)
    seg = tl.cumsum(b_r, axis=0)  # document index inside the chunk; 0 continues the entering state
    seg_last = tl.max(seg, axis=0)
    cum = tl.cumsum(b_dt * b_A, axis=0)  # log decay from the chunk start through each token (<= 0)
    cum_last = tl.sum(b_dt * b_A, axis=0)
    o_c = tl.arange(0, BT)
    pair = (o_c[:, None] >= o_c[None, :]) & (seg[:, None] == seg[None, :])
    L = tl.exp(tl.where(pair, cum[:, None] - cum[None, :], float("-inf")))  # [BT, BT], exponents <= 0
    q_in = tl.where(seg == 0, tl.exp(cum), 0.0)  # how much of the entering state each token reads
    k_out = tl.where(seg == seg_last, tl.exp(cum_last - cum), 0.0)  # how much reaches the leaving state
    carry = tl.where(seg_last == 0, tl.exp(cum_last), 0.0)  # decay of the state over the whole chunk
    return (b_x, b_dt, b_B, b_C, b_r, seg, seg_last, L, q_in, k_out, carry, o_t, row, p_y, p_n,
            m_t, m_tp, m_tn)


@triton.jit
def _state_ptrs(i_n, i_h, i_p, H: tl.constexpr, P: tl.constexpr, N: tl.constexpr, BP: tl.constexpr,
                BN: tl.constexpr):
    o_p = i_p * BP + tl.arange(0, BP)
    o_n = tl.arange(0, BN)
    p = (i_n.to(tl.int64) * H + i_h) * P * N + o_p[:, None] * N + o_n[None, :]
    return p, (o_p < P)[:, None] & (o_n < N)[None, :]


@triton.jit
def _ssd_fwd_kernel(x, dt, A, Bm, Cm, D, reset, cu, h0, y, ht, T, sxb, sxt, sxh, H: tl.constexpr,
                    G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, BT: tl.constexpr, BP: tl.constexpr,
                    BN: tl.constexpr, HAS_RESET: tl.constexpr, HAS_H0: tl.constexpr, HAS_D: tl.constexpr,
                    VARLEN: tl.constexpr):
    i_p, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_g = i_h // (H // G)
    i_b, bos, eos = _seq(cu, i_n, T, VARLEN)
    b_A = tl.load(A + i_h).to(tl.float32)
    p_h, m_h = _state_ptrs(i_n, i_h, i_p, H, P, N, BP, BN)
    b_h = tl.zeros([BP, BN], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + p_h, mask=m_h, other=0.0).to(tl.float32)
    for i_t in range(0, tl.cdiv(eos - bos, BT)):
        (b_x, b_dt, b_B, b_C, b_r, seg, seg_last, L, q_in, k_out, carry, o_t, row, p_y, p_n,
         m_t, m_tp, m_tn) = _load_chunk(x, dt, Bm, Cm, reset, b_A, i_b, i_h, i_g, i_p, bos, eos, i_t, T,
                                        sxb, sxt, sxh, H, G, P, N, BT, BP, BN, HAS_RESET)
        # ieee: fp32 dots, so the kernel matches the fp32 reference (tf32 would drop 13 bits)
        scores = tl.dot(b_C, tl.trans(b_B), input_precision="ieee") * L * b_dt[None, :]
        b_y = tl.dot(scores, b_x, input_precision="ieee")
        b_y += tl.dot(b_C, tl.trans(b_h), input_precision="ieee") * q_in[:, None]
        if HAS_D:
            b_y += tl.load(D + i_h).to(tl.float32) * b_x
        tl.store(y + p_y, b_y.to(y.dtype.element_ty), mask=m_tp)
        b_h = carry * b_h + tl.dot(tl.trans(b_x * (b_dt * k_out)[:, None]), b_B, input_precision="ieee")
    tl.store(ht + p_h, b_h, mask=m_h)


@triton.jit
def _ssd_bwd_dc_kernel(x, dt, A, Bm, Cm, reset, cu, h0, dy, dC, T, R, sxb, sxt, sxh, H: tl.constexpr,
                       G: tl.constexpr, P: tl.constexpr, N: tl.constexpr, BT: tl.constexpr,
                       BP: tl.constexpr, BN: tl.constexpr, HAS_RESET: tl.constexpr, HAS_H0: tl.constexpr,
                       VARLEN: tl.constexpr):
    """dC of one head from one channel block, into ``dC[i_p] [rows, H, N]``; the states are recomputed."""
    i_p, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_g = i_h // (H // G)
    i_b, bos, eos = _seq(cu, i_n, T, VARLEN)
    b_A = tl.load(A + i_h).to(tl.float32)
    p_h, m_h = _state_ptrs(i_n, i_h, i_p, H, P, N, BP, BN)
    b_h = tl.zeros([BP, BN], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + p_h, mask=m_h, other=0.0).to(tl.float32)
    dC += i_p.to(tl.int64) * R * H * N  # this channel block's slice
    for i_t in range(0, tl.cdiv(eos - bos, BT)):
        (b_x, b_dt, b_B, b_C, b_r, seg, seg_last, L, q_in, k_out, carry, o_t, row, p_y, p_n,
         m_t, m_tp, m_tn) = _load_chunk(x, dt, Bm, Cm, reset, b_A, i_b, i_h, i_g, i_p, bos, eos, i_t, T,
                                        sxb, sxt, sxh, H, G, P, N, BT, BP, BN, HAS_RESET)
        b_dy = tl.load(dy + p_y, mask=m_tp, other=0.0).to(tl.float32)
        d_scores = tl.dot(b_dy, tl.trans(b_x), input_precision="ieee") * L * b_dt[None, :]  # [BT, BT]
        b_dC = tl.dot(d_scores, b_B, input_precision="ieee")
        b_dC += tl.dot(b_dy, b_h, input_precision="ieee") * q_in[:, None]
        p_dC = (row * H + i_h)[:, None] * N + tl.arange(0, BN)[None, :]
        tl.store(dC + p_dC, b_dC, mask=m_tn)
        b_h = carry * b_h + tl.dot(tl.trans(b_x * (b_dt * k_out)[:, None]), b_B, input_precision="ieee")


@triton.jit
def _ssd_bwd_kernel(x, dt, A, Bm, Cm, D, reset, cu, ht, dy, dht, dC, dx, dB, ddt, da, dh0, T, R, sxb,
                    sxt, sxh, H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
                    BT: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_RESET: tl.constexpr,
                    HAS_D: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                    VARLEN: tl.constexpr):
    """dx, and from one channel block (into slice ``i_p``): dB, dS's share of d dt (``du . x``)
    and the log-decay gradient ``da``; dh0. Walks the chunks last to first carrying dS."""
    i_p, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_g = i_h // (H // G)
    i_b, bos, eos = _seq(cu, i_n, T, VARLEN)
    b_A = tl.load(A + i_h).to(tl.float32)
    p_h, m_h = _state_ptrs(i_n, i_h, i_p, H, P, N, BP, BN)
    b_dh = tl.zeros([BP, BN], dtype=tl.float32)
    d_last = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)  # the final state's own decay term
    if HAS_DHT:
        b_dh += tl.load(dht + p_h, mask=m_h, other=0.0).to(tl.float32)
        d_last = tl.sum(tl.sum(b_dh * tl.load(ht + p_h, mask=m_h, other=0.0), axis=1), axis=0)
    slice_tn = i_p.to(tl.int64) * R * H * N  # this channel block's slices
    slice_t = i_p.to(tl.int64) * R * H
    o_c = tl.arange(0, BT)
    b_carry = tl.sum(tl.zeros([BT], dtype=tl.float32), axis=0)  # sum of d b over the later tokens of the open document
    n_t = tl.cdiv(eos - bos, BT)
    for i_r in range(0, n_t):
        i_t = n_t - 1 - i_r
        (b_x, b_dt, b_B, b_C, b_r, seg, seg_last, L, q_in, k_out, carry, o_t, row, p_y, p_n,
         m_t, m_tp, m_tn) = _load_chunk(x, dt, Bm, Cm, reset, b_A, i_b, i_h, i_g, i_p, bos, eos, i_t, T,
                                        sxb, sxt, sxh, H, G, P, N, BT, BP, BN, HAS_RESET)
        b_dy = tl.load(dy + p_y, mask=m_tp, other=0.0).to(tl.float32)
        p_hn = (row * H + i_h)[:, None] * N + tl.arange(0, BN)[None, :]
        b_dC = tl.load(dC + slice_tn + p_hn, mask=m_tn, other=0.0)
        # dB_j = sum_i L_ij dt_j (dy_i . x_j) C_i + k_out_j dt_j dS^T x_j
        d_scores = tl.dot(b_dy, tl.trans(b_x), input_precision="ieee") * L * b_dt[None, :]
        b_dB = tl.dot(tl.trans(d_scores), b_C, input_precision="ieee")
        b_dB += tl.dot(b_x, b_dh, input_precision="ieee") * (b_dt * k_out)[:, None]
        tl.store(dB + slice_tn + p_hn, b_dB, mask=m_tn)
        # du_j for u_j = dt_j x_j: sum_i (C_i . B_j) L_ij dy_i + k_out_j dS B_j
        cb = tl.dot(b_C, tl.trans(b_B), input_precision="ieee") * L
        b_du = tl.dot(tl.trans(cb), b_dy, input_precision="ieee")
        b_du += tl.dot(b_B, tl.trans(b_dh), input_precision="ieee") * k_out[:, None]
        b_dx = b_du * b_dt[:, None]
        if HAS_D:
            b_dx += tl.load(D + i_h).to(tl.float32) * b_dy
        tl.store(dx + p_y, b_dx.to(dx.dtype.element_ty), mask=m_tp)
        tl.store(ddt + slice_t + row * H + i_h, tl.sum(b_du * b_x, axis=1), mask=m_t)
        # d b_t, then its reverse cumulative sum inside each document
        b_db = tl.sum(b_C * b_dC, axis=1) - tl.sum(b_B * b_dB, axis=1)
        b_db += tl.where(o_t == eos - 1, d_last, 0.0)
        later = (o_c[:, None] <= o_c[None, :]) & (seg[:, None] == seg[None, :])  # [i, j]: j >= i
        b_da = tl.sum(tl.where(later, b_db[None, :], 0.0), axis=1)
        b_da += tl.where(seg == seg_last, b_carry, 0.0)
        b_da = tl.where(b_r != 0, 0.0, b_da)
        tl.store(da + slice_t + row * H + i_h, b_da, mask=m_t)
        b_carry = tl.sum(tl.where(seg == 0, b_db, 0.0), axis=0) + tl.where(seg_last == 0, b_carry, 0.0)
        b_dh = carry * b_dh + tl.dot(tl.trans(b_dy * q_in[:, None]), b_C, input_precision="ieee")
    if STORE_DH0:
        tl.store(dh0 + p_h, b_dh, mask=m_h)


def _new(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(x, B, n_seq):
    """Block sizes and the grid: tl.dot needs every block dimension >= 16."""
    p, n = x.shape[-1], B.shape[-1]
    bp = max(16, min(BLOCK_P, triton.next_power_of_2(p)))
    bn = max(16, triton.next_power_of_2(n))
    return bp, bn, (triton.cdiv(p, bp), n_seq * x.shape[2])


def ssd_chunk_fwd(x, dt, A, B, C, D, h0, reset, cu) -> tuple[Tensor, Tensor]:
    """Launcher: ``y`` (x's shape and dtype, contiguous) and the final states fp32 ``[S, H, P, N]``."""
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    n_seq = b if cu is None else cu.numel() - 1
    bp, bn, grid = _launch(x, B, n_seq)
    y = _new((b, t, h, p), x.dtype, x.device)
    ht = _new((n_seq, h, p, n), torch.float32, x.device)
    _ssd_fwd_kernel[grid](
        x, dt, A, B, C, D, reset, cu, h0, y, ht, t, *x.stride()[:3], H=h, G=g, P=p, N=n, BT=CHUNK, BP=bp,
        BN=bn, HAS_RESET=reset is not None, HAS_H0=h0 is not None, HAS_D=D is not None, VARLEN=cu is not None)
    return y, ht


def ssd_chunk_bwd(x, dt, A, B, C, D, h0, reset, cu, ht, dy, dht) -> tuple[Tensor | None, ...]:
    """Launcher: ``(dx, ddt, dA, dB, dC, dD, dh0)`` in fp32 (dx in x's dtype); the per-block and
    per-head partials are summed here in a fixed order."""
    b, t, h, p = x.shape
    g, n = B.shape[2:]
    n_seq = b if cu is None else cu.numel() - 1
    bp, bn, grid = _launch(x, B, n_seq)
    n_p, rows = grid[0], b * t
    dev = x.device
    dC = _new((n_p, rows, h, n), torch.float32, dev)
    _ssd_bwd_dc_kernel[grid](
        x, dt, A, B, C, reset, cu, h0, dy, dC, t, rows, *x.stride()[:3], H=h, G=g, P=p, N=n, BT=CHUNK, BP=bp,
        BN=bn, HAS_RESET=reset is not None, HAS_H0=h0 is not None, VARLEN=cu is not None)
    dx = _new((b, t, h, p), x.dtype, dev)
    dB = _new((n_p, rows, h, n), torch.float32, dev)
    ddt = _new((n_p, rows, h), torch.float32, dev)
    da = _new((n_p, rows, h), torch.float32, dev)
    dh0 = _new((n_seq, h, p, n), torch.float32, dev) if h0 is not None else None
    _ssd_bwd_kernel[grid](
        x, dt, A, B, C, D, reset, cu, ht, dy, dht, dC, dx, dB, ddt, da, dh0, t, rows, *x.stride()[:3], H=h, G=g,
        P=p, N=n, BT=CHUNK, BP=bp, BN=bn, HAS_RESET=reset is not None, HAS_D=D is not None,
        HAS_DHT=dht is not None, STORE_DH0=h0 is not None, VARLEN=cu is not None)
    # fixed-order reductions over channel blocks, then over the heads of each group
    dB = dB.sum(0).view(b, t, g, h // g, n).sum(3)
    dC = dC.sum(0).view(b, t, g, h // g, n).sum(3)
    da = da.sum(0).view(b, t, h)  # gradient of each step's log decay dt * A
    dt32 = dt.float()
    ddt = ddt.sum(0).view(b, t, h) + da * A.float()
    dA = (da * dt32).sum((0, 1))
    dD = (dy.float() * x.float()).sum((0, 1, 3)) if D is not None else None
    return dx, ddt, dA, dB, dC, dD, dh0


class SSDChunkFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, h0, reset, cu):  # type: ignore[override]
        y, ht = ssd_chunk_fwd(x, dt, A, B, C, D, h0, reset, cu)
        ctx.save_for_backward(x, dt, A, B, C, D, h0, reset, cu, ht)
        ctx.set_materialize_grads(False)
        return y, ht

    @staticmethod
    def backward(ctx, dy, dht):  # type: ignore[override]
        x, dt, A, B, C, D, h0, reset, cu, ht = ctx.saved_tensors
        dy = torch.zeros_like(x, memory_format=torch.contiguous_format) if dy is None else dy.contiguous()
        dht = None if dht is None else dht.contiguous()
        dx, ddt, dA, dB, dC, dD, dh0 = ssd_chunk_bwd(x, dt, A, B, C, D, h0, reset, cu, ht, dy, dht)
        cast = lambda g, like: None if g is None else g.to(like.dtype)  # noqa: E731
        return (dx, cast(ddt, dt), cast(dA, A), cast(dB, B), cast(dC, C), cast(dD, D), cast(dh0, h0),
                None, None)


def ssd_chunked_triton(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    reset: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mamba-2 SSD over whole sequences, chunked, in Triton (Dao & Gu 2024, section 6).

    Args:
        x: ``[B, T, H, P]`` input after the convolution (fp32, bf16 or fp16; computed in fp32).
            Any strides with a unit last one (a view is read in place).
        dt: ``[B, T, H]`` positive step sizes (bias and softplus already applied).
        A: ``[H]`` negative scalar decay per head.
        B, C: ``[B, T, G, N]``; head h reads group ``h // (H / G)``.
        D: ``[H]`` skip connection, or None.
        initial_state: ``[S, H, P, N]`` state before each sequence's first token (S = B, or the
            number of packed sequences), or None for zeros.
        reset: ``[B, T]`` bool, True where a document starts: the carried state (the initial
            state too) is dropped before that token is added.
        cu_seqlens: ``[S + 1]`` integer offsets of S sequences packed along T (B must be 1), or None.

    Returns:
        ``y [B, T, H, P]`` in x's dtype and the final states ``[S, H, P, N]`` fp32. Differentiable
        in x, dt, A, B, C, D and initial_state.

    Raises:
        ValueError: on mismatched shapes, an empty sequence or bad ``cu_seqlens``.
    """
    if x.dim() != 4 or dt.shape != x.shape[:3] or A.shape != x.shape[2:3]:
        raise ValueError(f"ssd_chunked_triton: x {tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}")
    b, t, h, p = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, t) or C.shape != B.shape or h % B.shape[2]:
        raise ValueError(f"ssd_chunked_triton: B {tuple(B.shape)}, C {tuple(C.shape)} must be [{b}, {t}, G | {h}, N]")
    if D is not None and D.shape != (h,):
        raise ValueError(f"ssd_chunked_triton: D {tuple(D.shape)} must be {(h,)}")
    if t == 0:
        raise ValueError("ssd_chunked_triton: empty sequence")
    if reset is not None and reset.shape != (b, t):
        raise ValueError(f"ssd_chunked_triton: reset {tuple(reset.shape)} must be {(b, t)}")
    if cu_seqlens is not None and (b != 1 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2):
        raise ValueError(f"ssd_chunked_triton: cu_seqlens {tuple(cu_seqlens.shape)} needs B = 1 and [S + 1] offsets")
    n_seq = b if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None and initial_state.shape != (n_seq, h, p, B.shape[-1]):
        raise ValueError(f"ssd_chunked_triton: initial_state {tuple(initial_state.shape)} must be {(n_seq, h, p, B.shape[-1])}")
    c = lambda v: None if v is None else v.contiguous()  # noqa: E731
    x = x if x.stride(-1) == 1 else x.contiguous()
    reset = reset.to(torch.int32).contiguous() if reset is not None else None  # int32: cumsum in-kernel
    cu = cu_seqlens.to(torch.int64).contiguous() if cu_seqlens is not None else None
    return SSDChunkFunction.apply(x, c(dt), c(A), c(B), c(C), c(D), c(initial_state), reset, cu)
