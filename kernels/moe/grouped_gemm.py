"""Grouped expert GEMMs in Triton over variable per-expert row counts (dropless MoE; the
``grouped_mm`` of torchtitan / Megatron-LM's GroupedGEMM, MegaBlocks' block-sparse view of it).

``xs [M, D]`` holds the rows of expert 0, then expert 1, ... (``counts [E]``); expert e's rows
are multiplied by ``w[e] [D, F]``. Forward and the input gradient are the same kernel (dx =
dout @ w[e]^T is ``w`` read through transposed strides); the weight gradient ``dw[e] =
xs_e^T dout_e`` has its own kernel.

Tiles never cross an expert boundary: the row tiles are laid out per expert (``ceil(c_e / BM)``
each, the last one masked), from a schedule computed on the device without a host sync; the
grid has the upper bound ``ceil(M / BM) + E`` row tiles and the unused ones are fully masked.
The weight gradient: one program per (expert, BK x BN tile of w) loops over that expert's rows
in order, so it is deterministic (no split-K atomics); an expert without rows writes zeros.

Launch: BM = BN = 64, BK = 32, 4 warps, fp32 accumulation (fp32 tiles with
``input_precision="ieee"``: no TF32, so fp32 results match the PyTorch path; bf16 tiles on the
tensor cores), 64-bit row offsets. Under the interpreter the tiles are widened to fp32 before
``tl.dot``, which misreads bf16 there.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.moe.permutation import plain

POISON_OUTPUTS = False  # tests set True: fresh outputs start as NaN, so an unwritten element shows
BM, BN, BK = 64, 64, 32
NUM_WARPS = 4


def _empty(*shape, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    out = torch.empty(*shape, dtype=dtype or like.dtype, device=like.device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


@triton.jit
def _dot(x, y, acc, UPCAST: tl.constexpr):
    """acc + x @ y in fp32: fp32 tiles without TF32, bf16/fp16 tiles on the tensor cores; UPCAST
    (the interpreter, whose tl.dot misreads bf16 in Triton 3.9) widens them to fp32 first."""
    if UPCAST:
        x = x.to(tl.float32)
        y = y.to(tl.float32)
    if x.dtype == tl.float32:
        acc += tl.dot(x, y, input_precision="ieee")
    else:
        acc += tl.dot(x, y)
    return acc


def _upcast() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _grouped_mm_kernel(a, b, c, sched, n_tiles, K, N, s_am, s_ak, s_be, s_bk, s_bn, s_cm, s_cn,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """c[rows] = a[rows] @ b[e] for row tile t = (expert e, first row, end row) of ``sched``."""
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(sched + t).to(tl.int64)
    start = tl.load(sched + n_tiles + t)
    end = tl.load(sched + 2 * n_tiles + t)
    rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = rows < end
    cm = cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        km = ks < K
        x = tl.load(a + rows[:, None] * s_am + ks[None, :] * s_ak, mask=rm[:, None] & km[None, :], other=0.0)
        w = tl.load(b + e * s_be + ks[:, None] * s_bk + cols[None, :] * s_bn, mask=km[:, None] & cm[None, :],
                    other=0.0)
        acc = _dot(x, w, acc, UPCAST)
    tl.store(c + rows[:, None] * s_cm + cols[None, :] * s_cn, acc.to(c.dtype.element_ty),
             mask=rm[:, None] & cm[None, :])


@triton.jit
def _grouped_mm_dw_kernel(a, g, dw, offsets, counts, K, N, s_am, s_ak, s_gm, s_gn, s_we, s_wk, s_wn,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr):
    """dw[e, ks, ns] = sum over expert e's rows r, in order, of a[r, ks]^T g[r, ns]."""
    e = tl.program_id(0).to(tl.int64)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    km = ks < K
    nm = ns < N
    start = tl.load(offsets + e)
    end = start + tl.load(counts + e)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M).to(tl.int64)
        rm = rows < end
        x = tl.load(a + rows[:, None] * s_am + ks[None, :] * s_ak, mask=rm[:, None] & km[None, :], other=0.0)
        y = tl.load(g + rows[:, None] * s_gm + ns[None, :] * s_gn, mask=rm[:, None] & nm[None, :], other=0.0)
        acc = _dot(tl.trans(x), y, acc, UPCAST)
    tl.store(dw + e * s_we + ks[:, None] * s_wk + ns[None, :] * s_wn, acc.to(dw.dtype.element_ty),
             mask=km[:, None] & nm[None, :])


def tile_schedule(counts: Tensor, m: int, block_m: int) -> Tensor:
    """``[3, ceil(m / block_m) + E]`` int64 rows (expert, first row, end row) of every row tile,
    each inside one expert; tiles past the last expert's are empty (first = end = 0). On the
    device, no host sync."""
    e = counts.numel()
    n_tiles = triton.cdiv(m, block_m) + e
    ends = counts.cumsum(0)
    tiles = (counts + block_m - 1) // block_m
    tile_ends = tiles.cumsum(0)
    t = torch.arange(n_tiles, device=counts.device)
    expert = torch.searchsorted(tile_ends, t, right=True)
    valid = expert < e
    ex = expert.clamp(max=e - 1)
    start = ends[ex] - counts[ex] + (t - (tile_ends[ex] - tiles[ex])) * block_m
    zero = torch.zeros_like(start)
    return torch.stack([ex, torch.where(valid, start, zero), torch.where(valid, ends[ex], zero)])


def _mm(a: Tensor, b: Tensor, sched: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``[M, N]``: row tiles of ``a [M, K]`` times ``b[e] [K, N]`` (any strides)."""
    m, kdim = a.shape
    n = b.shape[2]
    c = _empty(m, n, like=a, dtype=out_dtype)
    if m and n:
        n_tiles = sched.shape[1]
        _grouped_mm_kernel[(n_tiles, triton.cdiv(n, BN))](
            a, b, c, sched, n_tiles, kdim, n, a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
            c.stride(0), c.stride(1), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, UPCAST=_upcast(), num_warps=NUM_WARPS,
        )
    return c


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs: Tensor, w: Tensor, counts: Tensor) -> Tensor:
        xs, w = plain(xs), plain(w)
        sched = tile_schedule(counts, xs.shape[0], BM)
        ctx.save_for_backward(xs, w, counts, sched)
        return _mm(xs, w, sched, xs.dtype)

    @staticmethod
    def backward(ctx, dout: Tensor):
        xs, w, counts, sched = ctx.saved_tensors
        dout = plain(dout)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _mm(dout, w.transpose(1, 2), sched, xs.dtype)
        if ctx.needs_input_grad[1]:
            e, kdim, n = w.shape
            dw = _empty(e, kdim, n, like=w, dtype=torch.float32)
            if dw.numel():
                offsets = counts.cumsum(0) - counts
                _grouped_mm_dw_kernel[(e, triton.cdiv(kdim, BK), triton.cdiv(n, BN))](
                    xs, dout, dw, offsets, counts, kdim, n, xs.stride(0), xs.stride(1), dout.stride(0),
                    dout.stride(1), dw.stride(0), dw.stride(1), dw.stride(2), BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK,
                    UPCAST=_upcast(), num_warps=NUM_WARPS,
                )
            dw = dw.to(w.dtype)
        return dx, dw, None


def grouped_mm_triton(xs: Tensor, w: Tensor, counts: Tensor) -> Tensor:
    """``[M, F]`` in ``xs``'s dtype (``xs`` and ``w`` of one dtype); differentiable in both."""
    return _GroupedMM.apply(xs, w, counts)
