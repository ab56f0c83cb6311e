"""One token of the short causal depthwise convolution in Triton (decoding), the counterpart of
mamba_ssm's ``causal_conv1d_update``.

One program owns one (batch row, block of ``BLOCK_C`` channels): it reads the token and the W-1
previous inputs of its channels once, writes the output (SiLU fused) and the shifted state once
to fresh tensors (the caller's state is never modified, as on the PyTorch path). The state is read
through all its strides, x through its batch stride (channels contiguous); offsets are int64.
Launch: 128 channels, 4 warps a program; decoding is latency-bound, so a few programs per row is
all the parallelism there is. Forward only: decoding needs no gradients.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from kernels.short_conv.chunk import _new

BLOCK_C = 128


@triton.jit
def _update_kernel(x, st, w, bias, p, y, st_new, C, s_xb, s_sb, s_sc, s_sw, s_pb, W: tl.constexpr, BC: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr, SILU: tl.constexpr):
    i_c, i_b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < C
    b_x = tl.load(x + i_b * s_xb + o_c, mask=m_c, other=0.0)
    b_u = b_x.to(tl.float32) * tl.load(w + o_c * W + (W - 1), mask=m_c, other=0.0).to(tl.float32)
    if HAS_POS:
        b_p = tl.load(p + i_b * s_pb)
    p_s = st + i_b * s_sb + o_c * s_sc
    for s in tl.static_range(1, W):
        b_s = tl.load(p_s + (W - 1 - s) * s_sw, mask=m_c, other=0.0).to(tl.float32)
        if HAS_POS:  # a tap never reads before the token's document start
            b_s = tl.where(b_p >= s, b_s, 0.0)
        b_u += b_s * tl.load(w + o_c * W + (W - 1 - s), mask=m_c, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b_u += tl.load(bias + o_c, mask=m_c, other=0.0).to(tl.float32)
    if SILU:
        b_u = b_u * tl.sigmoid(b_u)
    tl.store(y + i_b * C + o_c, b_u.to(y.dtype.element_ty), mask=m_c)
    p_new = st_new + i_b * C * (W - 1) + o_c * (W - 1)
    for j in tl.static_range(W - 2):  # shift left by one
        tl.store(p_new + j, tl.load(p_s + (j + 1) * s_sw, mask=m_c, other=0.0), mask=m_c)
    tl.store(p_new + (W - 2), b_x.to(st_new.dtype.element_ty), mask=m_c)


def causal_conv1d_update_triton(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    positions: Tensor | None = None,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """One token ``x [B, C]`` after ``conv_state [B, C, W-1]`` -> ``(y [B, C] in x's dtype, new
    state [B, C, W-1] in the state's dtype)``, both fresh. Semantics and checks:
    :func:`kernels.short_conv.causal_conv1d_update`. Needs W >= 2."""
    b, c = x.shape
    k = weight.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = _new((b, c), x.dtype, x.device)
    new = _new((b, c, k - 1), conv_state.dtype, x.device)
    _update_kernel[(triton.cdiv(c, BLOCK_C), b)](
        x, conv_state, weight.contiguous(), bias, positions, y, new, c, x.stride(0), *conv_state.stride(),
        0 if positions is None else positions.stride(0),
        W=k, BC=BLOCK_C, HAS_BIAS=bias is not None, HAS_POS=positions is not None, SILU=activation == "silu",
        num_warps=4,
    )
    return y, new
