"""Chunked Gated Linear Attention (Yang et al. 2023) in Triton, forward and backward.

Per head, with the log forget gate ``g_t <= 0`` (``alpha_t = exp(g_t)``) and reset flags:

    S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t          (S_{t-1} := 0 where reset_t)
    o_t = scale * q_t S_t

The reference is ``kernels.gla.chunk_torch.chunk_gla``. One program owns one (batch, head,
value block) and walks the chunks of ``BT`` tokens in order, keeping the state ``[K, BV]`` in
fp32 registers, so no per-chunk states are written to memory; the backward recomputes them.
Every exponent is <= 0: inside a chunk the decays are exact pairwise differences
``cum_i - cum_j`` (i >= j), and across chunks the split is at the chunk boundary
(``q_i exp(cum_i)`` reads the entering state, ``k_j exp(cum_last - cum_j)`` writes the leaving
one). ``BT`` is 16, so the pairwise ``[BT, BT, K]`` decay tensor is the secondary chunk itself.

Backward, three kernels: dq runs forward over the chunks recomputing the state; dk, dv and the
initial-state gradient run backward carrying dS; dg uses the identity that ``g`` acts only through
its cumulative sum ``b_t``, with ``d b_t = q_t * dq_t - k_t * dk_t`` (plus ``sum_v dS_T * S_T`` at
the last token), so ``dg`` is the reverse cumulative sum of that inside each document.
Partial sums over value blocks go to separate buffers reduced afterwards: no atomics, the backward
is bitwise deterministic. Pointer arithmetic only (block pointers are gone in Triton 3.9); batch
and time offsets are int64 because ``B * T * H * K`` can pass 2^31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

POISON_OUTPUTS = False  # tests set True: fresh outputs start as NaN, so an unwritten element shows
CHUNK = 16  # tokens per chunk; the pairwise decays cost CHUNK * CHUNK * K registers


@triton.jit
def _load_chunk(q, k, v, g, reset, i_b, i_h, i_t, i_v, T, H: tl.constexpr, K: tl.constexpr,
                V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                HAS_RESET: tl.constexpr):
    """Loads one chunk (zero past T) and the decay quantities every kernel shares."""
    o_t = i_t * BT + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t = o_t < T
    row = i_b.to(tl.int64) * T + o_t.to(tl.int64)  # int64: B * T * H * K can pass 2^31
    p_k = (row * H + i_h)[:, None] * K + o_k[None, :]
    p_v = (row * H + i_h)[:, None] * V + o_v[None, :]
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    m_tv = m_t[:, None] & (o_v < V)[None, :]
    b_q = tl.load(q + p_k, mask=m_tk, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_k, mask=m_tk, other=0.0).to(tl.float32)
    b_g = tl.load(g + p_k, mask=m_tk, other=0.0).to(tl.float32)  # padding: alpha = 1, no decay
    b_v = tl.load(v + p_v, mask=m_tv, other=0.0).to(tl.float32)
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
    return b_q, b_k, b_v, b_r, p_k, p_v, m_tk, m_tv, seg, seg_last, decay, q_in, k_out, carry


@triton.jit
def _state_ptrs(i_bh, i_v, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    p = i_bh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    return p, (o_k < K)[:, None] & (o_v < V)[None, :]


@triton.jit
def _chunk_gla_fwd_kernel(q, k, v, g, reset, h0, o, ht, scale, T, H: tl.constexpr, K: tl.constexpr,
                          V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                          HAS_RESET: tl.constexpr, HAS_H0: tl.constexpr, STORE_HT: tl.constexpr):
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    p_h, m_h = _state_ptrs(i_bh, i_v, K, V, BK, BV)
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + p_h, mask=m_h, other=0.0).to(tl.float32)
    for i_t in range(0, tl.cdiv(T, BT)):
        b_q, b_k, b_v, b_r, p_k, p_v, m_tk, m_tv, seg, seg_last, decay, q_in, k_out, carry = _load_chunk(
            q, k, v, g, reset, i_b, i_h, i_t, i_v, T, H, K, V, BT, BK, BV, HAS_RESET)
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
def _chunk_gla_bwd_dq_kernel(q, k, v, g, reset, h0, do, dq, scale, T, H: tl.constexpr, K: tl.constexpr,
                             V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                             HAS_RESET: tl.constexpr, HAS_H0: tl.constexpr):
    """dq for one value block, into its own slice ``dq[i_v]``; the state is recomputed."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    B = tl.num_programs(1) // H
    p_h, m_h = _state_ptrs(i_bh, i_v, K, V, BK, BV)
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + p_h, mask=m_h, other=0.0).to(tl.float32)
    dq += i_v.to(tl.int64) * B * T * H * K
    for i_t in range(0, tl.cdiv(T, BT)):
        b_q, b_k, b_v, b_r, p_k, p_v, m_tk, m_tv, seg, seg_last, decay, q_in, k_out, carry = _load_chunk(
            q, k, v, g, reset, i_b, i_h, i_t, i_v, T, H, K, V, BT, BK, BV, HAS_RESET)
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0).to(tl.float32)
        d_scores = tl.dot(b_do, tl.trans(b_v), input_precision="ieee")  # [BT, BT]: do_i . v_j
        b_dq = tl.sum(d_scores[:, :, None] * b_k[None, :, :] * decay, axis=1)
        b_dq += tl.dot(b_do, tl.trans(b_h), input_precision="ieee") * q_in
        tl.store(dq + p_k, b_dq * scale, mask=m_tk)
        b_h = carry[:, None] * b_h + tl.dot(tl.trans(b_k * k_out), b_v, input_precision="ieee")


@triton.jit
def _chunk_gla_bwd_dkv_kernel(q, k, v, g, reset, do, dht, dk, dv, dh0, scale, T, H: tl.constexpr,
                              K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                              BV: tl.constexpr, HAS_RESET: tl.constexpr, HAS_DHT: tl.constexpr,
                              STORE_DH0: tl.constexpr):
    """dk (partial over value blocks, into ``dk[i_v]``), dv and dh0, walking the chunks backward
    with dS, the gradient of the state leaving the current chunk, in registers."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    B = tl.num_programs(1) // H
    p_h, m_h = _state_ptrs(i_bh, i_v, K, V, BK, BV)
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DHT:
        b_dh += tl.load(dht + p_h, mask=m_h, other=0.0).to(tl.float32)
    dk += i_v.to(tl.int64) * B * T * H * K
    for i_r in range(0, tl.cdiv(T, BT)):
        i_t = tl.cdiv(T, BT) - 1 - i_r
        b_q, b_k, b_v, b_r, p_k, p_v, m_tk, m_tv, seg, seg_last, decay, q_in, k_out, carry = _load_chunk(
            q, k, v, g, reset, i_b, i_h, i_t, i_v, T, H, K, V, BT, BK, BV, HAS_RESET)
        b_q = b_q * scale
        b_do = tl.load(do + p_v, mask=m_tv, other=0.0).to(tl.float32)
        scores = tl.sum(b_q[:, None, :] * b_k[None, :, :] * decay, axis=2)  # [BT, BT]
        b_dv = tl.dot(tl.trans(scores), b_do, input_precision="ieee")
        b_dv += tl.dot(b_k * k_out, b_dh, input_precision="ieee")
        tl.store(dv + p_v, b_dv.to(dv.dtype.element_ty), mask=m_tv)
        d_scores = tl.dot(b_do, tl.trans(b_v), input_precision="ieee")  # [BT, BT]: do_i . v_j
        b_dk = tl.sum(d_scores[:, :, None] * b_q[:, None, :] * decay, axis=0)
        b_dk += tl.dot(b_v, tl.trans(b_dh), input_precision="ieee") * k_out
        tl.store(dk + p_k, b_dk, mask=m_tk)
        b_dh = carry[:, None] * b_dh + tl.dot(tl.trans(b_q * q_in), b_do, input_precision="ieee")
    if STORE_DH0:
        tl.store(dh0 + p_h, b_dh, mask=m_h)


@triton.jit
def _chunk_gla_bwd_dg_kernel(q, k, dq, dk, reset, d_last, dg, T, H: tl.constexpr, K: tl.constexpr,
                             BT: tl.constexpr, BK: tl.constexpr, HAS_RESET: tl.constexpr,
                             HAS_DLAST: tl.constexpr):
    """dg = reverse cumulative sum, inside each document, of q * dq - k * dk (+ d_last at T - 1);
    zero where a document starts (the gate there multiplies a dropped state)."""
    i_bh = tl.program_id(0)
    i_b, i_h = i_bh // H, i_bh % H
    o_k = tl.arange(0, BK)
    o_c = tl.arange(0, BT)
    b_carry = tl.zeros([BK], dtype=tl.float32)  # sum over the later tokens of the open document
    b_last = tl.zeros([BK], dtype=tl.float32)
    if HAS_DLAST:
        b_last += tl.load(d_last + i_bh.to(tl.int64) * K + o_k, mask=o_k < K, other=0.0)
    for i_r in range(0, tl.cdiv(T, BT)):
        i_t = tl.cdiv(T, BT) - 1 - i_r
        o_t = i_t * BT + o_c
        m_t = o_t < T
        row = i_b.to(tl.int64) * T + o_t.to(tl.int64)
        p_k = (row * H + i_h)[:, None] * K + o_k[None, :]
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        b_d = tl.load(q + p_k, mask=m_tk, other=0.0).to(tl.float32) * tl.load(dq + p_k, mask=m_tk, other=0.0)
        b_d -= tl.load(k + p_k, mask=m_tk, other=0.0).to(tl.float32) * tl.load(dk + p_k, mask=m_tk, other=0.0)
        b_d += tl.where((o_t == T - 1)[:, None], b_last[None, :], 0.0)
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


def _new(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _blocks(k_dim: int, v_dim: int, bv: int | None) -> tuple[int, int]:
    # tl.dot needs every block dimension >= 16; the whole key dimension stays in one block
    bk = max(16, triton.next_power_of_2(k_dim))
    bv = max(16, min(64, triton.next_power_of_2(v_dim))) if bv is None else bv
    return bk, bv


def chunk_gla_fwd(q, k, v, g, scale, h0, reset, output_final_state, bv=None) -> tuple[Tensor, Tensor | None]:
    """Launcher: ``o [B, T, H, V]`` in v's dtype and, if asked, the final state fp32."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    bk, bv = _blocks(dk, dv, bv)
    o = _new((b, t, h, dv), v.dtype, v.device)
    ht = _new((b, h, dk, dv), torch.float32, v.device) if output_final_state else None
    grid = (triton.cdiv(dv, bv), b * h)
    _chunk_gla_fwd_kernel[grid](
        q, k, v, g, reset, h0, o, ht, scale, t, H=h, K=dk, V=dv, BT=CHUNK, BK=bk, BV=bv,
        HAS_RESET=reset is not None, HAS_H0=h0 is not None, STORE_HT=output_final_state)
    return o, ht


def chunk_gla_bwd(q, k, v, g, scale, h0, reset, ht, do, dht, bv=None) -> tuple[Tensor, ...]:
    """Launcher: ``(dq, dk, dv, dg, dh0)``; dq and dk are summed over value blocks in a fixed order."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    bk, bv = _blocks(dk, dv, bv)
    nv = triton.cdiv(dv, bv)
    grid = (nv, b * h)
    dq = _new((nv, b, t, h, dk), torch.float32, q.device)
    _chunk_gla_bwd_dq_kernel[grid](
        q, k, v, g, reset, h0, do, dq, scale, t, H=h, K=dk, V=dv, BT=CHUNK, BK=bk, BV=bv,
        HAS_RESET=reset is not None, HAS_H0=h0 is not None)
    dk_ = _new((nv, b, t, h, dk), torch.float32, q.device)
    dv_ = _new(v.shape, v.dtype, v.device)
    dh0 = _new(h0.shape, torch.float32, q.device) if h0 is not None else None
    _chunk_gla_bwd_dkv_kernel[grid](
        q, k, v, g, reset, do, dht, dk_, dv_, dh0, scale, t, H=h, K=dk, V=dv, BT=CHUNK, BK=bk, BV=bv,
        HAS_RESET=reset is not None, HAS_DHT=dht is not None, STORE_DH0=h0 is not None)
    dq, dk_ = dq.sum(0), dk_.sum(0)  # fixed-order reduction over value blocks: deterministic
    # the final state's own dependence on the gates, sum_v dS_T * S_T, enters at the last token
    d_last = (dht.float() * ht).sum(-1).contiguous() if dht is not None else None
    dg = _new(g.shape, g.dtype, g.device)
    _chunk_gla_bwd_dg_kernel[(b * h,)](
        q, k, dq, dk_, reset, d_last, dg, t, H=h, K=dk, BT=CHUNK, BK=bk,
        HAS_RESET=reset is not None, HAS_DLAST=d_last is not None)
    return dq.to(q.dtype), dk_.to(k.dtype), dv_, dg, dh0


class ChunkGLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, h0, reset, output_final_state):
        o, ht = chunk_gla_fwd(q, k, v, g, scale, h0, reset, output_final_state)
        ctx.save_for_backward(q, k, v, g, h0, reset, ht)
        ctx.scale = scale
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, h0, reset, ht = ctx.saved_tensors
        dq, dk, dv, dg, dh0 = chunk_gla_bwd(
            q, k, v, g, ctx.scale, h0, reset, ht, do.contiguous(),
            dht.contiguous() if dht is not None and ht is not None else None)
        if dh0 is not None:
            dh0 = dh0.to(h0.dtype)
        return dq, dk, dv, dg, None, dh0, None, None


def chunk_gla_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention over a whole sequence, chunkwise in Triton (Yang et al. 2023).

    Args:
        q, k: ``[B, T, H, K]`` queries and keys (fp32, bf16 or fp16; computed in fp32).
        v: ``[B, T, H, V]`` values.
        g: ``[B, T, H, K]`` log forget gates (<= 0; ``alpha_t = exp(g_t)``).
        scale: query scale; None is ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` state before the first token, or None for zeros.
        output_final_state: also return the state after the last token.
        reset: ``[B, T]`` bool, True where a document starts: the carried state is dropped
            before that token is added.

    Returns:
        ``o [B, T, H, V]`` in v's dtype, and the final state ``[B, H, K, V]`` fp32 (None unless
        ``output_final_state``). Differentiable in q, k, v, g and initial_state.

    Raises:
        ValueError: on mismatched shapes or an empty sequence.
    """
    if q.dim() != 4 or k.shape != q.shape or g.shape != q.shape:
        raise ValueError(f"chunk_gla_triton: q {tuple(q.shape)}, k {tuple(k.shape)} and g {tuple(g.shape)} must match [B, T, H, K]")
    b, t, h, dk = q.shape
    if v.dim() != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(f"chunk_gla_triton: v {tuple(v.shape)} must be [B, T, H, V] with B, T, H = {(b, t, h)}")
    if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
        raise ValueError(f"chunk_gla_triton: initial_state {tuple(initial_state.shape)} must be {(b, h, dk, v.shape[-1])}")
    if reset is not None and reset.shape != (b, t):
        raise ValueError(f"chunk_gla_triton: reset {tuple(reset.shape)} must be {(b, t)}")
    if t == 0:
        raise ValueError("chunk_gla_triton: empty sequence")
    scale = dk**-0.5 if scale is None else float(scale)
    h0 = initial_state.contiguous() if initial_state is not None else None
    reset = reset.to(torch.int32).contiguous() if reset is not None else None  # int32: cumsum in-kernel
    return ChunkGLAFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(),
                                  scale, h0, reset, output_final_state)
