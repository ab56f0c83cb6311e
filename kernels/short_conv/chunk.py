"""The short causal depthwise convolution in Triton, forward and backward (training, prefill).

One program owns one (block of ``BLOCK_T`` tokens, block of ``BLOCK_C`` channels, batch row):
the forward reads the W shifted copies of its x tile (the W-1 rows before the tile come from the
initial state at t < 0, from x otherwise; the overlap hits the cache) and writes y once, the SiLU
fused. The backward recomputes the pre-activation where it needs ``du = dy * silu'(u)`` (no u is
stored): ``dx[t] = sum_s keep(t+s, s) w[W-1-s] du[t+s]`` reads du W tokens ahead, so it costs
W^2 cached tile loads for W <= 4, cheaper than a round trip of du through memory. Its time tiles
are shifted back by W-1, so the first one also yields the initial state's gradient. The weight
and bias gradients are per-program partial sums over the tile's output times, written to
``[B, n_t_blocks, C, W]`` / ``[B, n_t_blocks, C]`` fp32 and summed in torch: a deterministic
reduction (no atomics).

Launch: ``BLOCK_T = 64`` tokens x ``BLOCK_C = 64`` channels per program, 4 warps: a 16 KiB fp32
tile, enough loads in flight per SM for a bandwidth-bound op, and B * T/64 * C/64 programs to fill
the GPU at training sizes (e.g. 2 x 4096 tokens x 1536 channels: 3072 programs). Channels are
the contiguous axis, so the tile's rows are coalesced loads.

Layout: x ``[B, T, C]`` read through its batch and time strides (channels contiguous), the
initial state ``[B, C, W-1]`` and positions ``[B, T]`` through all their strides (a transposed
view needs no copy). Offsets are int64: batch or time times a stride can pass 2^31. Compute is
fp32; y and dx are written in x's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

POISON_OUTPUTS = False  # tests set True: fresh outputs start as NaN, so an unwritten element shows
BLOCK_T = 64
BLOCK_C = 64


@triton.jit
def _load_x(x, st, o_t, o_c, m_c, i_b, T, s_xb, s_xt, s_sb, s_sc, s_sw, W: tl.constexpr, HAS_STATE: tl.constexpr):
    """The inputs at times ``o_t [BT]`` (int64; t < 0 reads the initial state) -> ``[BT, BC]`` fp32."""
    m_x = (o_t >= 0) & (o_t < T)
    b_x = tl.load(x + i_b * s_xb + o_t[:, None] * s_xt + o_c[None, :], mask=m_x[:, None] & m_c[None, :], other=0.0)
    b_x = b_x.to(tl.float32)
    if HAS_STATE:
        m_s = (o_t < 0) & (o_t >= 1 - W)
        j = o_t + (W - 1)
        p_s = st + i_b * s_sb + o_c[None, :] * s_sc + j[:, None] * s_sw
        b_x += tl.load(p_s, mask=m_s[:, None] & m_c[None, :], other=0.0).to(tl.float32)
    return b_x


@triton.jit
def _preact(x, st, w, bias, p, o_t, o_c, m_c, i_b, T, s_xb, s_xt, s_sb, s_sc, s_sw, s_pb, s_pt,
            W: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr):
    """The pre-activation u at output times ``o_t`` -> ``[BT, BC]`` fp32 (garbage-free zeros off [0, T))."""
    m_t = (o_t >= 0) & (o_t < T)
    b_u = tl.zeros([o_t.shape[0], o_c.shape[0]], dtype=tl.float32)
    if HAS_POS:
        b_p = tl.load(p + i_b * s_pb + o_t * s_pt, mask=m_t, other=0)
    for s in tl.static_range(W):
        b_x = _load_x(x, st, o_t - s, o_c, m_c, i_b, T, s_xb, s_xt, s_sb, s_sc, s_sw, W, HAS_STATE)
        if HAS_POS:  # a tap never reads before the token's document start
            b_x = tl.where((b_p >= s)[:, None], b_x, 0.0)
        b_w = tl.load(w + o_c * W + (W - 1 - s), mask=m_c, other=0.0).to(tl.float32)
        b_u += b_x * b_w[None, :]
    if HAS_BIAS:
        b_u += tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
    return b_u


@triton.jit
def _fwd_kernel(x, st, w, bias, p, y, T, C, s_xb, s_xt, s_sb, s_sc, s_sw, s_pb, s_pt,
                W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, HAS_STATE: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, SILU: tl.constexpr):
    i_t, i_c, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    b_u = _preact(x, st, w, bias, p, o_t, o_c, m_c, i_b, T, s_xb, s_xt, s_sb, s_sc, s_sw, s_pb, s_pt,
                  W, HAS_STATE, HAS_BIAS, HAS_POS)
    if SILU:
        b_u = b_u * tl.sigmoid(b_u)
    m = (o_t < T)[:, None] & m_c[None, :]
    tl.store(y + i_b * T * C + o_t[:, None] * C + o_c[None, :], b_u.to(y.dtype.element_ty), mask=m)


@triton.jit
def _grad_u(x, st, w, bias, p, dy, o_t, o_c, m_c, i_b, T, s_xb, s_xt, s_sb, s_sc, s_sw, s_pb, s_pt, s_db, s_dt,
            W: tl.constexpr, HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
            SILU: tl.constexpr):
    """du = dy * act'(u) at output times ``o_t`` -> ``[BT, BC]`` fp32, zero off [0, T)."""
    m_t = (o_t >= 0) & (o_t < T)
    b_du = tl.load(dy + i_b * s_db + o_t[:, None] * s_dt + o_c[None, :], mask=m_t[:, None] & m_c[None, :], other=0.0)
    b_du = b_du.to(tl.float32)
    if SILU:
        b_u = _preact(x, st, w, bias, p, o_t, o_c, m_c, i_b, T, s_xb, s_xt, s_sb, s_sc, s_sw, s_pb, s_pt,
                      W, HAS_STATE, HAS_BIAS, HAS_POS)
        sig = tl.sigmoid(b_u)
        b_du = b_du * sig * (1.0 + b_u * (1.0 - sig))
    return b_du


@triton.jit
def _bwd_kernel(x, st, w, bias, p, dy, dx, dst, dw, db, T, C, NT, s_xb, s_xt, s_sb, s_sc, s_sw, s_pb, s_pt,
                s_db, s_dt, W: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
                HAS_STATE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, SILU: tl.constexpr):
    i_t, i_c, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    # input times, shifted by W-1 so that the first tile also covers the initial state (t < 0)
    o_t = i_t * BT - (W - 1) + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    b_dx = tl.zeros([BT, BC], dtype=tl.float32)
    for s in tl.static_range(W):
        o_u = o_t + s  # the outputs that read these inputs s steps back
        b_du = _grad_u(x, st, w, bias, p, dy, o_u, o_c, m_c, i_b, T, s_xb, s_xt, s_sb, s_sc, s_sw, s_pb, s_pt,
                       s_db, s_dt, W, HAS_STATE, HAS_BIAS, HAS_POS, SILU)
        if HAS_POS:
            b_p = tl.load(p + i_b * s_pb + o_u * s_pt, mask=(o_u >= 0) & (o_u < T), other=0)
        if s == 0:  # each output time lies in exactly one tile: its share of dweight and dbias
            part = (i_b * NT + i_t) * C + o_c
            if HAS_BIAS:
                tl.store(db + part, tl.sum(b_du, axis=0), mask=m_c)
            for r in tl.static_range(W):
                b_x = _load_x(x, st, o_t - r, o_c, m_c, i_b, T, s_xb, s_xt, s_sb, s_sc, s_sw, W, HAS_STATE)
                if HAS_POS:
                    b_x = tl.where((b_p >= r)[:, None], b_x, 0.0)
                tl.store(dw + part * W + (W - 1 - r), tl.sum(b_du * b_x, axis=0), mask=m_c)
        if HAS_POS:
            b_du = tl.where((b_p >= s)[:, None], b_du, 0.0)
        b_w = tl.load(w + o_c * W + (W - 1 - s), mask=m_c, other=0.0).to(tl.float32)
        b_dx += b_du * b_w[None, :]
    m = ((o_t >= 0) & (o_t < T))[:, None] & m_c[None, :]
    tl.store(dx + i_b * T * C + o_t[:, None] * C + o_c[None, :], b_dx.to(dx.dtype.element_ty), mask=m)
    if HAS_STATE:
        m_s = ((o_t < 0) & (o_t >= 1 - W))[:, None] & m_c[None, :]
        p_ds = dst + i_b * C * (W - 1) + o_c[None, :] * (W - 1) + (o_t + W - 1)[:, None]
        tl.store(p_ds, b_dx.to(dst.dtype.element_ty), mask=m_s)


def _new(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _strides(x: Tensor, state: Tensor | None, positions: Tensor | None) -> tuple[int, ...]:
    ss = (0, 0, 0) if state is None else state.stride()
    ps = (0, 0) if positions is None else positions.stride()
    return (x.stride(0), x.stride(1), *ss, *ps)


def _channels_last_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, positions, initial_state, activation):
        b, t, c = x.shape
        k = weight.shape[1]
        x = _channels_last_contiguous(x)
        weight = weight.contiguous()
        y = _new((b, t, c), x.dtype, x.device)
        grid = (triton.cdiv(t, BLOCK_T), triton.cdiv(c, BLOCK_C), b)
        _fwd_kernel[grid](
            x, initial_state, weight, bias, positions, y, t, c, *_strides(x, initial_state, positions),
            W=k, BT=BLOCK_T, BC=BLOCK_C, HAS_STATE=initial_state is not None, HAS_BIAS=bias is not None,
            HAS_POS=positions is not None, SILU=activation == "silu", num_warps=4,
        )
        ctx.save_for_backward(x, weight, bias, positions, initial_state)
        ctx.activation = activation
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, positions, initial_state = ctx.saved_tensors
        b, t, c = x.shape
        k = weight.shape[1]
        dy = _channels_last_contiguous(dy)
        n_t = triton.cdiv(t + k - 1, BLOCK_T)
        dx = _new((b, t, c), x.dtype, x.device)
        dw = _new((b, n_t, c, k), torch.float32, x.device)
        db = _new((b, n_t, c), torch.float32, x.device) if bias is not None else None
        dst = _new((b, c, k - 1), initial_state.dtype, x.device) if initial_state is not None else None
        _bwd_kernel[(n_t, triton.cdiv(c, BLOCK_C), b)](
            x, initial_state, weight, bias, positions, dy, dx, dst, dw, db, t, c, n_t,
            *_strides(x, initial_state, positions), dy.stride(0), dy.stride(1),
            W=k, BT=BLOCK_T, BC=BLOCK_C,
            HAS_STATE=initial_state is not None, HAS_BIAS=bias is not None, HAS_POS=positions is not None,
            SILU=ctx.activation == "silu", num_warps=4,
        )
        dweight = dw.sum((0, 1)).to(weight.dtype)
        dbias = None if db is None else db.sum((0, 1)).to(bias.dtype)
        return dx, dweight, dbias, None, dst, None


def causal_conv1d_triton(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    positions: Tensor | None = None,
    initial_state: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """The short causal depthwise conv in Triton, differentiable in x, weight, bias and
    initial_state. Shapes and semantics: :func:`kernels.short_conv.causal_conv1d` (which checks
    the inputs). Returns ``y [B, T, C]`` in x's dtype."""
    return _CausalConv1d.apply(x, weight, bias, positions, initial_state, activation)
