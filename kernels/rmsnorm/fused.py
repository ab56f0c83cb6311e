"""Triton RMSNorm, forward and backward, with the residual add or Mamba-2's SiLU gate fused in.

One kernel pair serves :func:`kernels.rmsnorm.rms_norm` (one group spanning the row, optionally
``h = x + residual`` first) and :func:`kernels.rmsnorm.gated_rms_norm` (the gate ``silu(z)``
before or after the norm, one mean of squares per group of channels).

Launch configuration: a program holds a ``[BLOCK_M, BLOCK_N]`` tile, ``BLOCK_N`` the group width
rounded up to a power of two (masked), ``BLOCK_M`` rows so that the tile holds about
``TILE_ELEMENTS`` elements (many rows per program for narrow norms, one for wide ones); 4 warps
up to 4096 elements, 8 above (about 16 fp32 values per thread either way). The forward grid is
(row blocks, groups). The backward runs ``PROGRAMS`` persistent programs per group (two per SM
on CUDA) that stride over the row blocks and accumulate the weight gradient of their rows in
registers: each writes one fp32 partial row and torch sums them, a fixed order (deterministic,
no atomics). Offsets are 64-bit: row index times row stride passes 2^31 for large inputs. Under
the interpreter (CPU tensors) the tile is ``INTERPRETER_TILE_ELEMENTS``: fewer, larger programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

POISON_OUTPUTS = False  # tests set True: fresh outputs start as NaN, so an unwritten element shows
TILE_ELEMENTS = 4096
# the interpreter's cost is mostly per program and per op, not per element: larger tiles
INTERPRETER_TILE_ELEMENTS = 2**15
MAX_GROUP = 65536  # widest group held in one tile
INTERPRETER_PROGRAMS = 4  # backward programs per group under the interpreter (no SMs to count)


@triton.jit
def _fwd(X, R, Z, W, Y, H, RSTD, n_rows, GS, stride_x, stride_r, stride_z, eps,
         HAS_RES: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, g = tl.program_id(0), tl.program_id(1)
    n_groups = tl.num_programs(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = g.to(tl.int64) * GS + tl.arange(0, BLOCK_N)
    m_r, m_c = rows < n_rows, tl.arange(0, BLOCK_N) < GS
    mask = m_r[:, None] & m_c[None, :]
    d = n_groups.to(tl.int64) * GS
    a = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        a += tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        a = a.to(H.dtype.element_ty)  # the new residual stream is stored, and normalised, rounded
        tl.store(H + rows[:, None] * d + cols[None, :], a, mask=mask)
        a = a.to(tl.float32)
    if HAS_Z:
        z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gate = z * tl.sigmoid(z)
        if not NORM_BEFORE_GATE:
            a = a * gate
    rstd = 1.0 / tl.sqrt(tl.sum(a * a, axis=1) / GS + eps)
    tl.store(RSTD + rows * n_groups + g, rstd, mask=m_r)
    w = tl.load(W + cols, mask=m_c, other=0.0).to(tl.float32)
    y = a * rstd[:, None] * w[None, :]
    if HAS_Z:
        if NORM_BEFORE_GATE:
            y = y * gate
    tl.store(Y + rows[:, None] * d + cols[None, :], y, mask=mask)


@triton.jit
def _bwd(X, Z, W, RSTD, DY, DH, DX, DR, DZ, DW, n_rows, GS, stride_x, stride_z, stride_dh,
         HAS_RES: tl.constexpr, HAS_DH: tl.constexpr, HAS_Z: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """X is the normalised input as the forward read it (h when the residual was fused)."""
    pid, g = tl.program_id(0), tl.program_id(1)
    n_prog, n_groups = tl.num_programs(0), tl.num_programs(1)
    cols = g.to(tl.int64) * GS + tl.arange(0, BLOCK_N)
    m_c = tl.arange(0, BLOCK_N) < GS
    d = n_groups.to(tl.int64) * GS
    w = tl.load(W + cols, mask=m_c, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for start in range(pid * BLOCK_M, n_rows, n_prog * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
        m_r = rows < n_rows
        mask = m_r[:, None] & m_c[None, :]
        u = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * d + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows * n_groups + g, mask=m_r, other=0.0)
        a = u
        if HAS_Z:
            z = tl.load(Z + rows[:, None] * stride_z + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(z)
            gate = z * sig
            if NORM_BEFORE_GATE:
                dgate = dy * a * rstd[:, None] * w[None, :]
                dy = dy * gate
            else:
                a = a * gate
        xhat = a * rstd[:, None]
        dw += tl.sum(dy * xhat, axis=0)
        dxhat = dy * w[None, :]
        da = rstd[:, None] * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=1) / GS)[:, None])
        du = da
        if HAS_Z:
            if not NORM_BEFORE_GATE:
                dgate = da * u
                du = da * gate
            dz = dgate * sig * (1.0 + z * (1.0 - sig))
            tl.store(DZ + rows[:, None] * d + cols[None, :], dz, mask=mask)
        if HAS_DH:
            du += tl.load(DH + rows[:, None] * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * d + cols[None, :], du, mask=mask)
        if HAS_RES:
            tl.store(DR + rows[:, None] * d + cols[None, :], du, mask=mask)
    tl.store(DW + pid.to(tl.int64) * d + cols, dw, mask=m_c)


def _new(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _rows(t: Tensor | None, d: int) -> Tensor | None:
    """``[..., d]`` -> ``[rows, d]`` with unit column stride (a view where one exists)."""
    if t is None:
        return None
    t = t.reshape(-1, d)
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(gs: int, device: torch.device) -> tuple[int, int, int]:
    if gs > MAX_GROUP:
        raise ValueError(f"rms_norm (triton): a group of {gs} channels exceeds {MAX_GROUP}; use backend='torch'")
    bn = triton.next_power_of_2(gs)
    bm = max(1, (TILE_ELEMENTS if device.type == "cuda" else INTERPRETER_TILE_ELEMENTS) // bn)
    return bm, bn, 4 if bm * bn <= 4096 else 8


def _programs(device: torch.device, n_blocks: int) -> int:
    if device.type == "cuda":
        return min(n_blocks, 2 * torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_blocks, INTERPRETER_PROGRAMS)


class _FusedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, z, weight, eps, gs, norm_before_gate):
        shape, d = x.shape, x.shape[-1]
        x2, r2, z2 = _rows(x, d), _rows(residual, d), _rows(z, d)
        n_rows, n_groups = x2.shape[0], d // gs
        h_dtype = residual.dtype if residual is not None else x.dtype
        y = _new((n_rows, d), h_dtype, x.device)
        h = _new((n_rows, d), h_dtype, x.device) if residual is not None else None
        rstd = _new((n_rows, n_groups), torch.float32, x.device)
        bm, bn, warps = _launch(gs, x.device)
        if n_rows:
            _fwd[(triton.cdiv(n_rows, bm), n_groups)](
                x2, r2, z2, weight, y, h, rstd, n_rows, gs, x2.stride(0),
                0 if r2 is None else r2.stride(0), 0 if z2 is None else z2.stride(0), eps,
                HAS_RES=residual is not None, HAS_Z=z is not None, NORM_BEFORE_GATE=norm_before_gate,
                BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
            )
        ctx.save_for_backward(x2 if h is None else h, z2, weight, rstd)
        ctx.dtypes = (x.dtype, None if residual is None else residual.dtype, None if z is None else z.dtype)
        ctx.gs, ctx.norm_before_gate, ctx.shape = gs, norm_before_gate, shape
        if h is None:
            return y.view(shape)
        return y.view(shape), h.view(shape)

    @staticmethod
    def backward(ctx, dy, dh=None):
        u, z2, weight, rstd = ctx.saved_tensors
        x_dtype, r_dtype, z_dtype = ctx.dtypes
        n_rows, d = u.shape
        gs = ctx.gs
        dy2, dh2 = _rows(dy, d).contiguous(), _rows(dh, d)
        dx = _new((n_rows, d), x_dtype, u.device)
        dr = _new((n_rows, d), r_dtype, u.device) if r_dtype is not None else None
        dz = _new((n_rows, d), z_dtype, u.device) if z_dtype is not None else None
        bm, bn, warps = _launch(gs, u.device)
        programs = _programs(u.device, triton.cdiv(n_rows, bm))
        dw = _new((max(programs, 1), d), torch.float32, u.device)
        if n_rows:
            _bwd[(programs, d // gs)](
                u, z2, weight, rstd, dy2, dh2, dx, dr, dz, dw, n_rows, gs, u.stride(0),
                0 if z2 is None else z2.stride(0), 0 if dh2 is None else dh2.stride(0),
                HAS_RES=dr is not None, HAS_DH=dh2 is not None, HAS_Z=dz is not None,
                NORM_BEFORE_GATE=ctx.norm_before_gate, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
            )
        else:
            dw.zero_()
        shape = ctx.shape
        dr = None if dr is None else dr.view(shape)
        dz = None if dz is None else dz.view(shape)
        return dx.view(shape), dr, dz, dw.sum(0).to(weight.dtype), None, None, None


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """Launcher behind :func:`kernels.rmsnorm.rms_norm` (inputs already checked)."""
    return _FusedRMSNorm.apply(x, residual, None, weight.contiguous(), eps, x.shape[-1], False)


def gated_rms_norm_triton(x: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int,
                          norm_before_gate: bool) -> Tensor:
    """Launcher behind :func:`kernels.rmsnorm.gated_rms_norm` (inputs already checked)."""
    return _FusedRMSNorm.apply(x, None, z, weight.contiguous(), eps, group_size, norm_before_gate)
