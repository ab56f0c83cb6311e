"""Chunked Gated Linear Attention (Yang et al. 2023) in Triton, forward and backward.

Per head, with the log forget gate ``g_t <= 0`` (``alpha_t = exp(g_t)``) and reset flags:

    S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t          (S_{t-1} := 0 where reset_t)
    o_t = scale * q_t S_t

The reference is ``kernels.gla.chunk_torch.chunk_gla``. One program owns one (sequence, head,
key block, value block) and walks the chunks of ``BT`` tokens in order, keeping its ``[BK, BV]``
tile of the state in fp32 registers, so no per-chunk states are written to memory; the backward
recomputes them. Everything the recurrence does is a sum over key channels, so the key blocks are
independent and their partial outputs are summed afterwards in a fixed order. Register pressure
sets the tiles: ``BK, BV <= 32`` keeps the pairwise ``[BT, BT, BK]`` decay tile at 8K fp32 values
(32K with the whole of K = 128 in one block), and dk and dv, which each need one pairwise decay
product, run as two launches of one kernel. Compiled offline for sm_90a at K = V = 128
(``python -m kernels.gla.spills``), no kernel spills; with K whole and ``BV = 64`` the forward
spilled 3.8 KB per thread and the dk/dv backward 32 KB. Every exponent is <= 0: inside a chunk
the decays are exact pairwise differences ``cum_i - cum_j`` (i >= j), and across chunks the split
is at the chunk boundary (``q_i exp(cum_i)`` reads the entering state, ``k_j exp(cum_last -
cum_j)`` writes the leaving one).

Sequences: a batch row each, or with ``cu_seqlens`` (B = 1) the packed range ``[bos, eos)`` of
each of N sequences, its chunks aligned to its own start, its own initial and final state.

Backward: dq runs forward over the chunks recomputing the state; dk, dv and the
initial-state gradient run backward carrying dS; dg uses the identity that ``g`` acts only through
its cumulative sum ``b_t``, with ``d b_t = q_t * dq_t - k_t * dk_t`` (plus ``sum_v dS_T * S_T`` at
the last token), so ``dg`` is the reverse cumulative sum of that inside each document.
Partial sums over key or value blocks go to separate buffers reduced afterwards: no atomics, the
backward is bitwise deterministic. Pointer arithmetic only (block pointers are gone in Triton
3.9); every offset is int64 because ``B * T * H * K`` (or a batch stride) can pass 2^31.
q, k, g (and v) may be views with any batch stride: only the ``[T, H, D]`` inside a row must
be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

POISON_OUTPUTS = False  # tests set True: fresh outputs start as NaN, so an unwritten element shows
CHUNK = 16  # tokens per chunk; the pairwise decays cost CHUNK * CHUNK * BK registers
BK_MAX = 32  # channels per program (see the module docstring); tl.dot needs >= 16
BV_MAX = 32


@triton.jit
def sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    """(batch row, first token, length) of sequence ``i_n``: row i_n, or a packed range of row 0."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        i_b = i_n.to(tl.int64) * 0
    else:
        i_b = i_n.to(tl.int64)
        bos = i_b * 0
        eos = bos + T
    return i_b, bos, eos - bos


@triton.jit
def _load_chunk(q, k, v, g, reset, i_b, bos, T_n, i_h, i_t, i_k, i_v, T, s_qk, s_v, H: tl.constexpr,
                K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                HAS_RESET: tl.constexpr):
    """Loads one chunk of a sequence (zero past its end) and the decay quantities every kernel
    shares. ``p_k``/``p_v`` address the contiguous ``[B, T, H, *]`` outputs and gradients."""
    o_t = i_t * BT + tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t = o_t < T_n
    tok = bos + o_t.to(tl.int64)  # token index inside the batch row
    row = i_b * T + tok
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    p_in = (i_b * s_qk + (tok * H + i_h) * K)[:, None] + o_k[None, :]
    b_q = tl.load(q + p_in, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_in, mask=m_tk, other=0.0).to(tl.float32)
    b_g = tl.load(g + p_in, mask=m_tk, other=0.0).to(tl.float32)  # padding: alpha = 1, no decay
    b_v = tl.load(v + (i_b * s_v + (tok * H + i_h) * V)[:, None] + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
    p_k = (row * H + i_h)[:, None] * K + o_k[None, :]
    p_v = (row * H + i_h)[:, None] * V + o_v[None, :]
    if HAS_RESET:
        b_r = tl.load(reset + row, mask=m_t, other=0)
    else:
        b_r = tl.zeros([BT], dtype=tl.int32)
    seg = tl.cumsum(b_r, axis=0)  # document index inside the chunk; 0 = continues the entering state
    seg_last = tl.max(seg, axis=0)
    cum = tl.cumsum(b_g, axis=0)  # log decay from the chunk start through each token
    cum_last = tl.sum(b_g, axis=0)
    o_c = tl.arange(0, BT)
    # pairs (i, j) with j <= i in the same document; the exponent is masked before exp so that
    # the i < j entries (positive exponents) never overflow
    pair = (o_c[:, None] >= o_c[None, :]) & (seg[:, None] == seg[None, :])
    decay = tl.exp(tl.where(pair[:, :, None], cum[:, None, :] - cum[None, :, :], float("-inf")))
    first = (seg == 0)[:, None]  # tokens that see the entering state
    last = (seg == seg_last)[:, None]  # tokens whose keys reach the leaving state
    q_in = tl.where(first, tl.exp(cum), 0.0)  # multiplies q (and dq)
    k_out = tl.where(last, tl.exp(cum_last[None, :] - cum), 0.0)  # multiplies k (and dk)
    carry = tl.where(seg_last == 0, tl.exp(cum_last), 0.0)  # [BK] decay of the state over the chunk
    return b_q, b_k, b_v, p_k, p_v, m_tk, m_tv, decay, q_in, k_out, carry


@triton.jit
def _state_ptrs(i_nh, i_k, i_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    p = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    return p, (o_k < K)[:, None] & (o_v < V)[None, :]


@triton.jit
def initial_state(h0, p_h, m_h, BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr):
    """The fp32 ``[BK, BV]`` state tile before a sequence's first token: h0's, or zeros."""
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + p_h, mask=m_h, other=0.0).to(tl.float32)
    return b_h


@triton.jit
def _chunk_gla_fwd_kernel(q, k, v, g, reset, cu_seqlens, h0, o, ht, scale, T, n_tok, s_qk, s_v,
                          H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                          BK: tl.constexpr, BV: tl.constexpr, HAS_RESET: tl.constexpr,
                          HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """o's part from key block i_k, into ``o[i_k]``."""
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    i_b, bos, T_n = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    p_h, m_h = _state_ptrs(i_nh, i_k, i_v, K, V, BK, BV)
    b_h = initial_state(h0, p_h, m_h, BK, BV, HAS_H0)
    o += i_k.to(tl.int64) * n_tok * H * V
    for i_t in range(0, tl.cdiv(T_n, BT)):
        b_q, b_k, b_v, p_k, p_v, m_tk, m_tv, decay, q_in, k_out, carry = _load_chunk(
            q, k, v, g, reset, i_b, bos, T_n, i_h, i_t, i_k, i_v, T, s_qk, s_v, H, K, V, BT, BK, BV, HAS_RESET)
        b_q = b_q * scale
        scores = tl.sum(b_q[:, None, :] * b_k[None, :, :] * decay, axis=2)  # [BT, BT]
        # ieee: fp32 dots, so the kernel matches the fp32 reference (tf32 would drop 13 bits)
        b_o = tl.dot(scores, b_v, input_precision="ieee")
        b_o += tl.dot(b_q * q_in, b_h, input_precision="ieee")
        tl.store(o + p_v, b_o.to(o.dtype.element_ty), mask=m_tv)
        b_h = carry[:, None] * b_h + tl.dot(tl.trans(b_k * k_out), b_v, input_precision="ieee")
    if STORE_HT:
        tl.store(ht + p_h, b_h, mask=m_h)


@triton.jit
def _chunk_gla_bwd_dq_kernel(q, k, v, g, reset, cu_seqlens, h0, do, dq, scale, T, n_tok, s_qk, s_v,
                             H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
                             BK: tl.constexpr, BV: tl.constexpr, HAS_RESET: tl.constexpr,
                             HAS_H0: tl.constexpr, IS_VARLEN: tl.constexpr):
    """dq of key block i_k from value block i_v, into ``dq[i_v]``; the state is recomputed."""
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    i_b, bos, T_n = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    p_h, m_h = _state_ptrs(i_nh, i_k, i_v, K, V, BK, BV)
    b_h = initial_state(h0, p_h, m_h, BK, BV, HAS_H0)
    dq += i_v.to(tl.int64) * n_tok * H * K
    for i_t in range(0, tl.cdiv(T_n, BT)):
        b_q, b_k, b_v, p_k, p_v, m_tk, m_tv, decay, q_in, k_out, carry = _load_chunk(
            q, k, v, g, reset, i_b, bos, T_n, i_h, i_t, i_k, i_v, T, s_qk, s_v, H, K, V, BT, BK, BV, HAS_RESET)
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0).to(tl.float32)
        d_scores = tl.dot(b_do, tl.trans(b_v), input_precision="ieee")  # [BT, BT]: do_i . v_j
        b_dq = tl.sum(d_scores[:, :, None] * b_k[None, :, :] * decay, axis=1)
        b_dq += tl.dot(b_do, tl.trans(b_h), input_precision="ieee") * q_in
        tl.store(dq + p_k, b_dq * scale, mask=m_tk)
        b_h = carry[:, None] * b_h + tl.dot(tl.trans(b_k * k_out), b_v, input_precision="ieee")


@triton.jit
def _chunk_gla_bwd_dkv_kernel(q, k, v, g, reset, cu_seqlens, do, dht, dk, dv, dh0, scale, T, n_tok,
                              s_qk, s_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                              BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                              HAS_RESET: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                              IS_VARLEN: tl.constexpr, DO_DK: tl.constexpr):
    """Walks the chunks backward with dS, the gradient of the state leaving the current chunk, in
    registers; with DO_DK, dk (partial over value blocks, into ``dk[i_v]``) and dh0, else dv
    (partial over key blocks, into ``dv[i_k]``). Two launches, because dk and dv each need a
    pairwise decay product and both at once spill registers on a GPU."""
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    i_b, bos, T_n = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    p_h, m_h = _state_ptrs(i_nh, i_k, i_v, K, V, BK, BV)
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_dh += tl.load(dht + p_h, mask=m_h, other=0.0).to(tl.float32)
    dk += i_v.to(tl.int64) * n_tok * H * K
    dv += i_k.to(tl.int64) * n_tok * H * V
    n_t = tl.cdiv(T_n, BT)
    for i_r in range(0, n_t):
        i_t = n_t - 1 - i_r
        b_q, b_k, b_v, p_k, p_v, m_tk, m_tv, decay, q_in, k_out, carry = _load_chunk(
            q, k, v, g, reset, i_b, bos, T_n, i_h, i_t, i_k, i_v, T, s_qk, s_v, H, K, V, BT, BK, BV, HAS_RESET)
        b_q = b_q * scale
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0).to(tl.float32)
        if DO_DK:
            d_scores = tl.dot(b_do, tl.trans(b_v), input_precision="ieee")  # [BT, BT]: do_i . v_j
            b_dk = tl.sum(d_scores[:, :, None] * b_q[:, None, :] * decay, axis=0)
            b_dk += tl.dot(b_v, tl.trans(b_dh), input_precision="ieee") * k_out
            tl.store(dk + p_k, b_dk, mask=m_tk)
        else:
            scores = tl.sum(b_q[:, None, :] * b_k[None, :, :] * decay, axis=2)  # [BT, BT]
            b_dv = tl.dot(tl.trans(scores), b_do, input_precision="ieee")
            b_dv += tl.dot(b_k * k_out, b_dh, input_precision="ieee")
            tl.store(dv + p_v, b_dv, mask=m_tv)
        b_dh = carry[:, None] * b_dh + tl.dot(tl.trans(b_q * q_in), b_do, input_precision="ieee")
    if STORE_DH0 and DO_DK:
        tl.store(dh0 + p_h, b_dh, mask=m_h)


@triton.jit
def gla_bwd_dg_kernel(q, k, dq, dk, reset, cu_seqlens, d_last, dg, T, s_qk, H: tl.constexpr,
                      K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, HAS_RESET: tl.constexpr,
                      HAS_DLAST: tl.constexpr, IS_VARLEN: tl.constexpr):
    """dg = reverse cumulative sum, inside each document, of q * dq - k * dk (+ d_last at the
    sequence's last token); zero where a document starts (the gate there multiplies a dropped
    state). Grid (key blocks, N * H); shared with ``fused_recurrent.py``."""
    i_k, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_b, bos, T_n = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    o_c = tl.arange(0, BT)
    b_carry = tl.zeros([BK], dtype=tl.float32)  # sum over the later tokens of the open document
    b_last = tl.zeros([BK], dtype=tl.float32)
    if HAS_DLAST:
        b_last += tl.load(d_last + i_nh.to(tl.int64) * K + o_k, mask=o_k < K, other=0.0)
    n_t = tl.cdiv(T_n, BT)
    for i_r in range(0, n_t):
        i_t = n_t - 1 - i_r
        o_t = i_t * BT + o_c
        m_t = o_t < T_n
        tok = bos + o_t.to(tl.int64)
        row = i_b * T + tok
        p_in = (i_b * s_qk + (tok * H + i_h) * K)[:, None] + o_k[None, :]
        p_k = (row * H + i_h)[:, None] * K + o_k[None, :]
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_d = tl.load(q + p_in, mask=m_tk, other=0.0).to(tl.float32) * tl.load(dq + p_k, mask=m_tk, other=0.0)
        b_d -= tl.load(k + p_in, mask=m_tk, other=0.0).to(tl.float32) * tl.load(dk + p_k, mask=m_tk, other=0.0)
        b_d += tl.where((o_t == T_n - 1)[:, None], b_last[None, :], 0.0)
        if HAS_RESET:
            b_r = tl.load(reset + row, mask=m_t, other=0)
        else:
            b_r = tl.zeros([BT], dtype=tl.int32)
        seg = tl.cumsum(b_r, axis=0)
        seg_last = tl.max(seg, axis=0)
        later = (o_c[:, None] <= o_c[None, :]) & (seg[:, None] == seg[None, :])  # [i, j]: j >= i
        b_dg = tl.sum(tl.where(later[:, :, None], b_d[None, :, :], 0.0), axis=1)
        b_dg += tl.where((seg == seg_last)[:, None], b_carry[None, :], 0.0)
        b_dg = tl.where((b_r != 0)[:, None], 0.0, b_dg)
        tl.store(dg + p_k, b_dg.to(dg.dtype.element_ty), mask=m_tk)
        b_carry = tl.sum(tl.where((seg == 0)[:, None], b_d, 0.0), axis=0) + tl.where(seg_last == 0, b_carry, 0.0)


def new_output(shape, dtype, device) -> Tensor:
    """A fresh buffer: uninitialised, or all NaN when ``POISON_OUTPUTS`` (tests)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def batch_strided(*xs: Tensor) -> tuple[list[Tensor], int]:
    """``xs`` (``[B, T, H, D]``, one layout) and their shared batch stride in elements: views
    whose rows are contiguous ``[T, H, D]`` blocks pass as they are (a slice of a bigger batch is
    not copied), anything else becomes contiguous."""
    b, t, h, d = xs[0].shape

    def rows_contiguous(x):
        return (d == 1 or x.stride(3) == 1) and (h == 1 or x.stride(2) == d) and (t == 1 or x.stride(1) == h * d)

    if all(map(rows_contiguous, xs)) and len({x.stride(0) for x in xs}) == 1:
        return list(xs), xs[0].stride(0) if b > 1 else 0
    return [x.contiguous() for x in xs], t * h * d


def varlen_args(b: int, t: int, cu_seqlens: Tensor | None) -> tuple[int, Tensor | None]:
    """(number of sequences N, int32 offsets or None)."""
    if cu_seqlens is None:
        return b, None
    return len(cu_seqlens) - 1, cu_seqlens.to(torch.int32).contiguous()


def blocks(k_dim: int, v_dim: int, bk: int | None = None, bv: int | None = None) -> tuple[int, int]:
    # tl.dot needs every block dimension >= 16
    bk = max(16, min(BK_MAX, triton.next_power_of_2(k_dim))) if bk is None else bk
    bv = max(16, min(BV_MAX, triton.next_power_of_2(v_dim))) if bv is None else bv
    return bk, bv


def dg_from_identity(q, k, dq, dk, s_qk, reset, cu, d_last, g, bk) -> Tensor:
    """Launches :func:`gla_bwd_dg_kernel`: dg in g's dtype from the summed dq, dk (fp32)."""
    b, t, h, dk_ = q.shape
    n = b if cu is None else len(cu) - 1
    dg = new_output(g.shape, g.dtype, g.device)
    gla_bwd_dg_kernel[(triton.cdiv(dk_, bk), n * h)](
        q, k, dq, dk, reset, cu, d_last, dg, t, s_qk, H=h, K=dk_, BT=CHUNK, BK=bk,
        HAS_RESET=reset is not None, HAS_DLAST=d_last is not None, IS_VARLEN=cu is not None)
    return dg


def chunk_gla_fwd(q, k, v, g, s_qk, s_v, scale, h0, reset, cu, output_final_state, bk=None, bv=None):
    """Launcher: ``o [B, T, H, V]`` in v's dtype and, if asked, the final states ``[N, H, K, V]`` fp32."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    n = b if cu is None else len(cu) - 1
    bk, bv = blocks(dk, dv, bk, bv)
    nk = triton.cdiv(dk, bk)
    o = new_output((nk, b, t, h, dv), v.dtype if nk == 1 else torch.float32, v.device)
    ht = new_output((n, h, dk, dv), torch.float32, v.device) if output_final_state else None
    _chunk_gla_fwd_kernel[(triton.cdiv(dv, bv), nk, n * h)](
        q, k, v, g, reset, cu, h0, o, ht, scale, t, b * t, s_qk, s_v, H=h, K=dk, V=dv, BT=CHUNK, BK=bk,
        BV=bv, HAS_RESET=reset is not None, HAS_H0=h0 is not None, STORE_HT=output_final_state,
        IS_VARLEN=cu is not None)
    return o[0] if nk == 1 else o.sum(0).to(v.dtype), ht  # fixed-order sum over key blocks


def chunk_gla_bwd(q, k, v, g, s_qk, s_v, scale, h0, reset, cu, ht, do, dht, bk=None, bv=None):
    """Launcher: ``(dq, dk, dv, dg, dh0)``; partial sums over key / value blocks are reduced in a
    fixed order."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    n = b if cu is None else len(cu) - 1
    bk, bv = blocks(dk, dv, bk, bv)
    nk, nv = triton.cdiv(dk, bk), triton.cdiv(dv, bv)
    grid = (nv, nk, n * h)
    flags = dict(HAS_RESET=reset is not None, IS_VARLEN=cu is not None)
    dq = new_output((nv, b, t, h, dk), torch.float32, q.device)
    _chunk_gla_bwd_dq_kernel[grid](
        q, k, v, g, reset, cu, h0, do, dq, scale, t, b * t, s_qk, s_v, H=h, K=dk, V=dv, BT=CHUNK, BK=bk,
        BV=bv, HAS_H0=h0 is not None, **flags)
    dk_ = new_output((nv, b, t, h, dk), torch.float32, q.device)
    dv_ = new_output((nk, b, t, h, dv), torch.float32, v.device)
    dh0 = new_output(h0.shape, torch.float32, q.device) if h0 is not None else None
    for do_dk in (True, False):
        _chunk_gla_bwd_dkv_kernel[grid](
            q, k, v, g, reset, cu, do, dht, dk_, dv_, dh0, scale, t, b * t, s_qk, s_v, H=h, K=dk, V=dv,
            BT=CHUNK, BK=bk, BV=bv, HAS_DHT=dht is not None, STORE_DH0=h0 is not None, DO_DK=do_dk, **flags)
    dq, dk_, dv_ = dq.sum(0), dk_.sum(0), dv_.sum(0)
    # the final state's own dependence on the gates, sum_v dS_T * S_T, enters at the last token
    d_last = (dht.float() * ht).sum(-1).contiguous() if dht is not None else None
    dg = dg_from_identity(q, k, dq, dk_, s_qk, reset, cu, d_last, g, bk)
    return dq.to(q.dtype), dk_.to(k.dtype), dv_.to(v.dtype), dg, dh0


def check_args(op, q, k, v, g, initial_state, reset, cu_seqlens) -> int:
    """ValueError on a bad shape; returns N, the number of sequences."""
    if q.dim() != 4 or k.shape != q.shape or g.shape != q.shape:
        raise ValueError(f"{op}: q {tuple(q.shape)}, k {tuple(k.shape)} and g {tuple(g.shape)} must match [B, T, H, K]")
    b, t, h, dk = q.shape
    if v.dim() != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(f"{op}: v {tuple(v.shape)} must be [B, T, H, V] with B, T, H = {(b, t, h)}")
    if t == 0:
        raise ValueError(f"{op}: empty sequence")
    n = b
    if cu_seqlens is not None:
        if b != 1 or cu_seqlens.dim() != 1 or len(cu_seqlens) < 2 or cu_seqlens.dtype.is_floating_point:
            raise ValueError(f"{op}: cu_seqlens must be an integer [N + 1] tensor, with B = 1 (got B = {b})")
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != t or bool((cu_seqlens.diff() <= 0).any()):
            raise ValueError(f"{op}: cu_seqlens {cu_seqlens.tolist()} must rise strictly from 0 to T={t}")
        n = len(cu_seqlens) - 1
    if initial_state is not None and initial_state.shape != (n, h, dk, v.shape[-1]):
        raise ValueError(f"{op}: initial_state {tuple(initial_state.shape)} must be {(n, h, dk, v.shape[-1])}")
    if reset is not None and reset.shape != (b, t):
        raise ValueError(f"{op}: reset {tuple(reset.shape)} must be {(b, t)}")
    return n


def gla_function(fwd, bwd) -> type[torch.autograd.Function]:
    """The autograd Function of a GLA kernel pair (``chunk_gla_fwd``/``_bwd`` here, the fused
    recurrent pair in fused_recurrent.py): both take and save the same tensors."""

    class GLAFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, g, s_qk, s_v, scale, h0, reset, cu, output_final_state):
            o, ht = fwd(q, k, v, g, s_qk, s_v, scale, h0, reset, cu, output_final_state)
            ctx.save_for_backward(q, k, v, g, h0, reset, cu, ht)
            ctx.strides, ctx.scale = (s_qk, s_v), scale
            return o, ht

        @staticmethod
        def backward(ctx, do, dht):
            q, k, v, g, h0, reset, cu, ht = ctx.saved_tensors
            dq, dk, dv, dg, dh0 = bwd(
                q, k, v, g, *ctx.strides, ctx.scale, h0, reset, cu, ht, do.contiguous(),
                dht.contiguous() if dht is not None and ht is not None else None)
            if dh0 is not None:
                dh0 = dh0.to(h0.dtype)
            return dq, dk, dv, dg, None, None, None, dh0, None, None, None

    return GLAFunction


ChunkGLAFunction = gla_function(chunk_gla_fwd, chunk_gla_bwd)


def chunk_gla_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    reset: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention over a whole sequence, chunkwise in Triton (Yang et al. 2023).

    Args:
        q, k: ``[B, T, H, K]`` queries and keys (fp32, bf16 or fp16; computed in fp32).
        v: ``[B, T, H, V]`` values.
        g: ``[B, T, H, K]`` log forget gates (<= 0; ``alpha_t = exp(g_t)``).
        scale: query scale; None is ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` state before the first token of each sequence, or None
            for zeros.
        output_final_state: also return the state after the last token of each sequence.
        reset: ``[B, T]`` bool, True where a document starts: the carried state is dropped
            before that token is added.
        cu_seqlens: ``[N + 1]`` integer offsets of N sequences packed in one row (B = 1), each
            with its own states; None: the N = B rows are the sequences.

    Returns:
        ``o [B, T, H, V]`` in v's dtype, and the final states ``[N, H, K, V]`` fp32 (None unless
        ``output_final_state``). Differentiable in q, k, v, g and initial_state.

    Raises:
        ValueError: on mismatched shapes, bad ``cu_seqlens`` or an empty sequence.
    """
    return apply_gla("chunk_gla_triton", ChunkGLAFunction, q, k, v, g, scale, initial_state, output_final_state,
                     reset, cu_seqlens)


def apply_gla(op, function, q, k, v, g, scale, initial_state, output_final_state, reset, cu_seqlens):
    """Check the arguments of the Triton entry point ``op`` and run its autograd ``function``
    (:func:`gla_function`) on the kernels' layouts."""
    check_args(op, q, k, v, g, initial_state, reset, cu_seqlens)
    b, t, h, dk = q.shape
    scale = dk**-0.5 if scale is None else float(scale)
    (q, k, g), s_qk = batch_strided(q, k, g)
    (v,), s_v = batch_strided(v)
    h0 = initial_state.contiguous() if initial_state is not None else None
    reset = reset.to(torch.int32).contiguous() if reset is not None else None  # int32: cumsum in-kernel
    _, cu = varlen_args(b, t, cu_seqlens)
    return function.apply(q, k, v, g, s_qk, s_v, scale, h0, reset, cu, output_final_state)
