"""Gated Linear Attention token by token in Triton (the fused recurrent kernel, for decoding and
short sequences), forward and backward. Yang et al. 2023, "Gated Linear Attention Transformers
with Hardware-Efficient Training"; the layout of fla's ``fused_recurrent`` kernels.

Per head, with the log forget gate ``g_t <= 0`` and reset flags:

    S_t = Diag(exp(g_t)) S_{t-1} + k_t^T v_t          (S_{t-1} := 0 where reset_t)
    o_t = scale * q_t S_t

One program owns one (sequence, head, key block, value block) and loops over the tokens of its
sequence with its ``[BK, BV]`` tile of the state in fp32 registers; o is a sum over key channels,
so key blocks write partial outputs that are summed afterwards in a fixed order.

Backward, one kernel on the same grid: a forward loop recomputes the states and writes dq
(``scale * S_t do_t``); a reverse loop carries ``dS`` (``dS += scale q_t^T do_t``, then
``dk_t = dS v_t``, ``dv_t = k_t dS``, ``dS *= exp(g_t)``) and leaves dh0. dg comes from the
identity of ``kernels/gla/chunk.py`` (``d cumsum(g)_t = q_t dq_t - k_t dk_t``, plus
``sum_v dS_T S_T`` at the last token, reverse-summed inside each document) with its kernel.
Partial sums over blocks go to separate buffers: no atomics, the backward is bitwise
deterministic. Pointer arithmetic only, int64 offsets. ``chunk.POISON_OUTPUTS`` also poisons
this module's fresh outputs (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.gla import chunk
from kernels.gla.chunk import sequence_bounds

BK_MAX = 64  # the state tile is BK x BV fp32 registers; at 64 x 64 ptxas (sm_90a) reports no spills
BV_MAX = 64


@triton.jit
def _token(q, k, v, g, reset, i_b, tok, i_h, o_k, o_v, m_k, m_v, T, s_qk, s_v, H: tl.constexpr,
           K: tl.constexpr, V: tl.constexpr, HAS_RESET: tl.constexpr):
    """One token's q, k, v, alpha (0 where a document starts) and its contiguous offsets."""
    p_in = i_b * s_qk + (tok * H + i_h) * K + o_k
    b_q = tl.load(q + p_in, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + p_in, mask=m_k, other=0.0).to(tl.float32)
    b_a = tl.exp(tl.load(g + p_in, mask=m_k, other=0.0).to(tl.float32))
    b_v = tl.load(v + i_b * s_v + (tok * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
    row = i_b * T + tok
    if HAS_RESET:
        b_a = tl.where(tl.load(reset + row) != 0, 0.0, b_a)
    return b_q, b_k, b_v, b_a, (row * H + i_h) * K + o_k, (row * H + i_h) * V + o_v


@triton.jit
def _fused_recurrent_gla_fwd_kernel(q, k, v, g, reset, cu_seqlens, h0, o, ht, scale, T, n_tok, s_qk, s_v,
                                    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                                    BV: tl.constexpr, HAS_RESET: tl.constexpr, HAS_H0: tl.constexpr,
                                    STORE_HT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """o's part from key block i_k, into ``o[i_k]``."""
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    i_b, bos, T_n = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    p_h = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    m_h = m_k[:, None] & m_v[None, :]
    b_h = chunk.initial_state(h0, p_h, m_h, BK, BV, HAS_H0)
    o += i_k.to(tl.int64) * n_tok * H * V
    for i_t in range(0, T_n):
        b_q, b_k, b_v, b_a, p_k, p_v = _token(
            q, k, v, g, reset, i_b, bos + i_t, i_h, o_k, o_v, m_k, m_v, T, s_qk, s_v, H, K, V, HAS_RESET)
        b_h = b_a[:, None] * b_h + b_k[:, None] * b_v[None, :]
        b_o = tl.sum((b_q * scale)[:, None] * b_h, axis=0)
        tl.store(o + p_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_HT:
        tl.store(ht + p_h, b_h, mask=m_h)


@triton.jit
def _fused_recurrent_gla_bwd_kernel(q, k, v, g, reset, cu_seqlens, h0, do, dht, dq, dk, dv, dh0, scale, T,
                                    n_tok, s_qk, s_v, H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
                                    BK: tl.constexpr, BV: tl.constexpr, HAS_RESET: tl.constexpr,
                                    HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr,
                                    IS_VARLEN: tl.constexpr):
    """dq and dk of key block i_k from value block i_v (into ``dq[i_v]``, ``dk[i_v]``), dv of
    value block i_v from key block i_k (into ``dv[i_k]``), and the (i_k, i_v) tile of dh0."""
    i_v, i_k, i_nh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n, i_h = i_nh // H, i_nh % H
    i_b, bos, T_n = sequence_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    p_h = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    m_h = m_k[:, None] & m_v[None, :]
    dq += i_v.to(tl.int64) * n_tok * H * K
    dk += i_v.to(tl.int64) * n_tok * H * K
    dv += i_k.to(tl.int64) * n_tok * H * V
    b_h = chunk.initial_state(h0, p_h, m_h, BK, BV, HAS_H0)
    for i_t in range(0, T_n):  # forward: recompute S_t, dq_t = scale * S_t do_t
        b_q, b_k, b_v, b_a, p_k, p_v = _token(
            q, k, v, g, reset, i_b, bos + i_t, i_h, o_k, o_v, m_k, m_v, T, s_qk, s_v, H, K, V, HAS_RESET)
        b_h = b_a[:, None] * b_h + b_k[:, None] * b_v[None, :]
        b_do = tl.load(do + p_v, mask=m_v, other=0.0).to(tl.float32)
        tl.store(dq + p_k, tl.sum(b_h * b_do[None, :], axis=1) * scale, mask=m_k)
    b_dh = tl.zeros([BK, BV], dtype=tl.float32)  # gradient of S_t, carried backward
    if HAS_DHT:
        b_dh += tl.load(dht + p_h, mask=m_h, other=0.0).to(tl.float32)
    for i_r in range(0, T_n):
        i_t = T_n - 1 - i_r
        b_q, b_k, b_v, b_a, p_k, p_v = _token(
            q, k, v, g, reset, i_b, bos + i_t, i_h, o_k, o_v, m_k, m_v, T, s_qk, s_v, H, K, V, HAS_RESET)
        b_do = tl.load(do + p_v, mask=m_v, other=0.0).to(tl.float32)
        b_dh += (b_q * scale)[:, None] * b_do[None, :]
        tl.store(dk + p_k, tl.sum(b_dh * b_v[None, :], axis=1), mask=m_k)
        tl.store(dv + p_v, tl.sum(b_dh * b_k[:, None], axis=0), mask=m_v)
        b_dh = b_a[:, None] * b_dh
    if STORE_DH0:
        tl.store(dh0 + p_h, b_dh, mask=m_h)


def _blocks(k_dim: int, v_dim: int) -> tuple[int, int]:
    return min(BK_MAX, triton.next_power_of_2(k_dim)), min(BV_MAX, triton.next_power_of_2(v_dim))


def fused_recurrent_gla_fwd(q, k, v, g, s_qk, s_v, scale, h0, reset, cu, output_final_state):
    """Launcher: ``o [B, T, H, V]`` in v's dtype and, if asked, the final states ``[N, H, K, V]`` fp32."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    n = b if cu is None else len(cu) - 1
    bk, bv = _blocks(dk, dv)
    nk = triton.cdiv(dk, bk)
    o = chunk.new_output((nk, b, t, h, dv), v.dtype if nk == 1 else torch.float32, v.device)
    ht = chunk.new_output((n, h, dk, dv), torch.float32, v.device) if output_final_state else None
    _fused_recurrent_gla_fwd_kernel[(triton.cdiv(dv, bv), nk, n * h)](
        q, k, v, g, reset, cu, h0, o, ht, scale, t, b * t, s_qk, s_v, H=h, K=dk, V=dv, BK=bk, BV=bv,
        HAS_RESET=reset is not None, HAS_H0=h0 is not None, STORE_HT=output_final_state, IS_VARLEN=cu is not None)
    return o[0] if nk == 1 else o.sum(0).to(v.dtype), ht  # fixed-order sum over key blocks


def fused_recurrent_gla_bwd(q, k, v, g, s_qk, s_v, scale, h0, reset, cu, ht, do, dht):
    """Launcher: ``(dq, dk, dv, dg, dh0)``."""
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    n = b if cu is None else len(cu) - 1
    bk, bv = _blocks(dk, dv)
    nk, nv = triton.cdiv(dk, bk), triton.cdiv(dv, bv)
    dq = chunk.new_output((nv, b, t, h, dk), torch.float32, q.device)
    dk_ = chunk.new_output((nv, b, t, h, dk), torch.float32, q.device)
    dv_ = chunk.new_output((nk, b, t, h, dv), torch.float32, q.device)
    dh0 = chunk.new_output(h0.shape, torch.float32, q.device) if h0 is not None else None
    _fused_recurrent_gla_bwd_kernel[(nv, nk, n * h)](
        q, k, v, g, reset, cu, h0, do, dht, dq, dk_, dv_, dh0, scale, t, b * t, s_qk, s_v, H=h, K=dk, V=dv,
        BK=bk, BV=bv, HAS_RESET=reset is not None, HAS_H0=h0 is not None, HAS_DHT=dht is not None,
        STORE_DH0=h0 is not None, IS_VARLEN=cu is not None)
    dq, dk_, dv_ = dq.sum(0), dk_.sum(0), dv_.sum(0)  # fixed order: deterministic
    d_last = (dht.float() * ht).sum(-1).contiguous() if dht is not None else None
    dg = chunk.dg_from_identity(q, k, dq, dk_, s_qk, reset, cu, d_last, g, chunk.blocks(dk, dv)[0])
    return dq.to(q.dtype), dk_.to(k.dtype), dv_.to(v.dtype), dg, dh0


FusedRecurrentGLAFunction = chunk.gla_function(fused_recurrent_gla_fwd, fused_recurrent_gla_bwd)


def fused_recurrent_gla(
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
    """Gated linear attention token by token in Triton (Yang et al. 2023), for decoding: the
    recurrence of :func:`kernels.gla.chunk.chunk_gla_triton`, with its arguments, returns (also
    differentiable) and errors."""
    return chunk.apply_gla("fused_recurrent_gla", FusedRecurrentGLAFunction, q, k, v, g, scale, initial_state,
                           output_final_state, reset, cu_seqlens)
