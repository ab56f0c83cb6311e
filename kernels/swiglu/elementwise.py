"""Triton ``silu(gate) * up``, forward and backward; the backward recomputes ``silu(gate)`` from
the saved inputs, so the product is never stored for it (the FFN's down projection keeps its own
input).

Launch configuration: the inputs are viewed as ``[rows, N]`` (unit column stride, any row stride);
a program covers a ``[BLOCK_M, BLOCK_N]`` tile of ``TILE_ELEMENTS`` elements, ``BLOCK_N`` the
width rounded up to a power of two up to 1024 (masked), 4 warps (8 fp32 values per thread at
the 1024-element tile a memory-bound kernel needs to keep loads in flight, 32 at 4096). Grid:
(row blocks, column blocks). Offsets are 64-bit (row times row stride may pass 2^31). Under the
interpreter (CPU tensors) the tile is ``INTERPRETER_TILE_ELEMENTS``: fewer, larger programs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

POISON_OUTPUTS = False  # tests set True: fresh outputs start as NaN, so an unwritten element shows
TILE_ELEMENTS = 4096
MAX_BLOCK_N = 1024
# the interpreter's cost is mostly per program and per op, not per element: one large tile
INTERPRETER_TILE_ELEMENTS = 2**15
INTERPRETER_MAX_BLOCK_N = 2**12


@triton.jit
def _fwd(G, U, Y, n_rows, N, stride_g, stride_u, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * N + cols[None, :], g * tl.sigmoid(g) * u, mask=mask)


@triton.jit
def _bwd(G, U, DY, DG, DU, n_rows, N, stride_g, stride_u, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    dense = rows[:, None] * N + cols[None, :]
    g = tl.load(G + rows[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + dense, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(DG + dense, dy * u * sig * (1.0 + g * (1.0 - sig)), mask=mask)
    tl.store(DU + dense, dy * g * sig, mask=mask)


def _new(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _rows(t: Tensor) -> Tensor:
    t = t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)
    return t if t.stride(-1) == 1 else t.contiguous()


def _grid(n_rows: int, n: int, device: torch.device) -> tuple[int, int, tuple[int, int]]:
    cuda = device.type == "cuda"
    tile = TILE_ELEMENTS if cuda else INTERPRETER_TILE_ELEMENTS
    max_n = MAX_BLOCK_N if cuda else INTERPRETER_MAX_BLOCK_N
    bn = min(max_n, triton.next_power_of_2(max(n, 1)))
    bm = max(1, tile // bn)
    return bm, bn, (triton.cdiv(n_rows, bm), triton.cdiv(n, bn))


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        g2, u2 = _rows(gate), _rows(up)
        n_rows, n = g2.shape
        y = _new((n_rows, n), torch.promote_types(gate.dtype, up.dtype), gate.device)
        bm, bn, grid = _grid(n_rows, n, gate.device)
        if y.numel():
            _fwd[grid](g2, u2, y, n_rows, n, g2.stride(0), u2.stride(0), BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return y.view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        n_rows, n = g2.shape
        dy2 = dy.reshape(n_rows, n).contiguous()
        dg, du = _new((n_rows, n), g2.dtype, g2.device), _new((n_rows, n), u2.dtype, u2.device)
        bm, bn, grid = _grid(n_rows, n, g2.device)
        if dg.numel():
            _bwd[grid](g2, u2, dy2, dg, du, n_rows, n, g2.stride(0), u2.stride(0), BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu_triton(gate: Tensor, up: Tensor) -> Tensor:
    """Launcher behind :func:`kernels.swiglu.swiglu` (inputs already checked)."""
    return _SwiGLU.apply(gate, up)
