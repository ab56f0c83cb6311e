"""The element-wise part of the GRU router cell (RMoE, Qiu et al. 2024; torch.nn.GRUCell's
equations, Cho et al. 2014) fused in Triton, forward and backward. The two projections
``gi = W_ih x + b_ih`` and ``gh = W_hh h + b_hh`` (``[R, 3H]``, gates r, z, n) stay torch GEMMs;
one kernel then computes

    r = sig(gi_r + gh_r)   z = sig(gi_z + gh_z)   n = tanh(gi_n + r * gh_n)   h' = (1 - z) n + z h

and the backward recomputes r, z, n from the saved ``gi, gh, h`` (nothing else stored) and
writes ``dgi, dgh [R, 3H]`` and ``dh [R, H]``: with ``a_n = (1 - n^2)(1 - z) dh'``,
``dgi_n = a_n``, ``dgh_n = r a_n``, ``dgi_r = dgh_r = gh_n a_n r (1 - r)``,
``dgi_z = dgh_z = (h - n) dh' z (1 - z)``, ``dh = z dh'``. Each element is written by one
program: deterministic. Inputs may have any row stride. One program per (block of BR rows,
block of BH channels): 4 warps over
a 16 x 128 tile; row offsets int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.moe.permutation import plain

POISON_OUTPUTS = False  # tests set True: fresh outputs start as NaN, so an unwritten element shows
BR, BH = 16, 128
NUM_WARPS = 4


def _empty(*shape, like: Tensor, dtype: torch.dtype) -> Tensor:
    out = torch.empty(*shape, dtype=dtype, device=like.device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


@triton.jit
def _sigmoid(v):
    return 1.0 / (1.0 + tl.exp(-v))


@triton.jit
def _tanh(v):
    return 2.0 * _sigmoid(2.0 * v) - 1.0


@triton.jit
def _tile(R, H, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (rows < R)[:, None] & (cols < H)[None, :]
    return rows[:, None], cols[None, :], mask


@triton.jit
def _gates(gi, gh, oi, oh, H, mask):
    """r, z, n and gh_n at the r gate's offsets ``oi`` (in gi), ``oh`` (in gh); z at +H, n at +2H."""
    i_r = tl.load(gi + oi, mask=mask, other=0.0).to(tl.float32)
    i_z = tl.load(gi + oi + H, mask=mask, other=0.0).to(tl.float32)
    i_n = tl.load(gi + oi + 2 * H, mask=mask, other=0.0).to(tl.float32)
    h_r = tl.load(gh + oh, mask=mask, other=0.0).to(tl.float32)
    h_z = tl.load(gh + oh + H, mask=mask, other=0.0).to(tl.float32)
    h_n = tl.load(gh + oh + 2 * H, mask=mask, other=0.0).to(tl.float32)
    r = _sigmoid(i_r + h_r)
    z = _sigmoid(i_z + h_z)
    n = _tanh(i_n + r * h_n)
    return r, z, n, h_n


@triton.jit
def _gru_fwd_kernel(gi, gh, h, out, R, H, s_gi, s_gh, s_h, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    rows, cols, mask = _tile(R, H, BLOCK_R, BLOCK_H)
    r, z, n, h_n = _gates(gi, gh, rows * s_gi + cols, rows * s_gh + cols, H, mask)
    hv = tl.load(h + rows * s_h + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + rows * H + cols, ((1.0 - z) * n + z * hv).to(out.dtype.element_ty), mask=mask)


@triton.jit
def _gru_bwd_kernel(gi, gh, h, dout, dgi, dgh, dh, R, H, s_gi, s_gh, s_h, BLOCK_R: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    """dout, dh: contiguous [R, H]; dgi, dgh: contiguous [R, 3H]."""
    rows, cols, mask = _tile(R, H, BLOCK_R, BLOCK_H)
    r, z, n, h_n = _gates(gi, gh, rows * s_gi + cols, rows * s_gh + cols, H, mask)
    hv = tl.load(h + rows * s_h + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dout + rows * H + cols, mask=mask, other=0.0).to(tl.float32)
    a_n = g * (1.0 - z) * (1.0 - n * n)
    a_r = a_n * h_n * r * (1.0 - r)
    a_z = g * (hv - n) * z * (1.0 - z)
    og = rows * 3 * H + cols
    ti = dgi.dtype.element_ty
    th = dgh.dtype.element_ty
    tl.store(dgi + og, a_r.to(ti), mask=mask)
    tl.store(dgi + og + H, a_z.to(ti), mask=mask)
    tl.store(dgi + og + 2 * H, a_n.to(ti), mask=mask)
    tl.store(dgh + og, a_r.to(th), mask=mask)
    tl.store(dgh + og + H, a_z.to(th), mask=mask)
    tl.store(dgh + og + 2 * H, (a_n * r).to(th), mask=mask)
    tl.store(dh + rows * H + cols, (g * z).to(dh.dtype.element_ty), mask=mask)


def _rows(t: Tensor) -> Tensor:
    """``t`` as ``[rows, width]`` with unit column stride; a 2-D view keeps its row stride."""
    t = plain(t)
    t = t if t.ndim == 2 else t.reshape(-1, t.shape[-1])
    return t if t.stride(1) == 1 else t.contiguous()


def _grid(r: int, hid: int) -> tuple[int, int]:
    return triton.cdiv(r, BR), triton.cdiv(hid, BH)


class _GRUGates(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
        shape = h.shape
        hid = shape[-1]
        gi, gh, h = (_rows(t) for t in (gi, gh, h))
        r = h.shape[0]
        out = _empty(r, hid, like=h, dtype=torch.promote_types(torch.promote_types(gi.dtype, gh.dtype), h.dtype))
        if out.numel():
            _gru_fwd_kernel[_grid(r, hid)](gi, gh, h, out, r, hid, gi.stride(0), gh.stride(0), h.stride(0),
                                           BLOCK_R=BR, BLOCK_H=BH, num_warps=NUM_WARPS)
        ctx.save_for_backward(gi, gh, h)
        ctx.shape = shape
        return out.view(shape)

    @staticmethod
    def backward(ctx, dout: Tensor):
        gi, gh, h = ctx.saved_tensors
        r, hid = h.shape
        dout = plain(dout).reshape(r, hid).contiguous()
        dgi = _empty(r, 3 * hid, like=h, dtype=gi.dtype)
        dgh = _empty(r, 3 * hid, like=h, dtype=gh.dtype)
        dh = _empty(r, hid, like=h, dtype=h.dtype)
        if dh.numel():
            _gru_bwd_kernel[_grid(r, hid)](gi, gh, h, dout, dgi, dgh, dh, r, hid, gi.stride(0), gh.stride(0),
                                           h.stride(0), BLOCK_R=BR, BLOCK_H=BH, num_warps=NUM_WARPS)
        lead = ctx.shape[:-1]
        return dgi.view(*lead, 3 * hid), dgh.view(*lead, 3 * hid), dh.view(ctx.shape)


def gru_gates_triton(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    """h' from ``gi, gh [..., 3H]`` and ``h [..., H]`` (dtype: their promotion); differentiable in all."""
    return _GRUGates.apply(gi, gh, h)
