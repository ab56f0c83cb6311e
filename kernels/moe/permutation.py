"""Token permutation by expert and its inverse in Triton (Megatron-LM's ``permute`` /
``unpermute``, torchtitan's token reordering), forward and backward.

The index work (one stable argsort of the flat assignments, the per-expert counts) is torch's,
shared with the PyTorch path. Then, with ``order[i] = n * k + j`` the assignment of sorted row i
and ``row[n * k + j] = i`` its inverse:

- permute:    ``xs[i] = x[order[i] // k]``              (a row gather)
  backward:   ``dx[n] = sum_j dxs[row[n, j]]``          (a combine without weights)
- unpermute:  ``y[n] = sum_j w[n, j] * ys[row[n, j]]``  (a combine)
  backward:   ``dys[i] = w[order[i]] * dy[order[i] // k]`` and ``dw[n, j] = dy[n] . ys[row[n, j]]``

Every output row is written by one program that sums its k contributions in slot order in fp32:
no atomics, no scatter, so the results are bitwise deterministic. One program per row walks D in
blocks of ``BLOCK_D`` (1024 elements, 4 warps: 8 elements a thread per load, memory-bound);
row offsets are int64 (``rows * stride`` passes 2^31 at 16k tokens x k=2 x D=64k).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.distributed._functional_collectives import AsyncCollectiveTensor

POISON_OUTPUTS = False  # tests set True: fresh outputs start as NaN, so an unwritten element shows
BLOCK_D = 1024
NUM_WARPS = 4


def _empty(*shape, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    out = torch.empty(*shape, dtype=dtype or like.dtype, device=like.device)
    return out.fill_(float("nan")) if POISON_OUTPUTS else out


def plain(t: Tensor) -> Tensor:
    """The plain tensor inside a functional collective's result (expert parallelism's
    all-to-all returns an AsyncCollectiveTensor, whose storage a kernel cannot address),
    waited for; any other tensor as it is. Call it inside an autograd.Function (the graph is
    the Function's)."""
    if isinstance(t, AsyncCollectiveTensor):
        return t.trigger_wait()
    return t


def _block(d: int) -> int:
    return min(BLOCK_D, max(16, triton.next_power_of_2(d)))


@triton.jit
def _gather_kernel(src, dst, order, D, K: tl.constexpr, s_src, s_dst, BD: tl.constexpr):
    """dst[i] = src[order[i] // K]."""
    i = tl.program_id(0).to(tl.int64)
    a = tl.load(order + i)
    src_row = src + (a // K) * s_src
    dst_row = dst + i * s_dst
    for d0 in range(0, D, BD):
        o = d0 + tl.arange(0, BD)
        m = o < D
        tl.store(dst_row + o, tl.load(src_row + o, mask=m, other=0.0), mask=m)


@triton.jit
def _combine_kernel(src, dst, row, weight, D, K: tl.constexpr, s_src, s_dst, HAS_WEIGHT: tl.constexpr,
                    BD: tl.constexpr):
    """dst[n] = sum_j (weight[n, j] *) src[row[n * K + j]], j ascending, in fp32."""
    n = tl.program_id(0).to(tl.int64)
    for d0 in range(0, D, BD):
        o = d0 + tl.arange(0, BD)
        m = o < D
        acc = tl.zeros([BD], dtype=tl.float32)
        for j in tl.static_range(K):
            r = tl.load(row + n * K + j)
            v = tl.load(src + r * s_src + o, mask=m, other=0.0).to(tl.float32)
            if HAS_WEIGHT:
                v = v * tl.load(weight + n * K + j).to(tl.float32)
            acc += v
        tl.store(dst + n * s_dst + o, acc.to(dst.dtype.element_ty), mask=m)


@triton.jit
def _unpermute_bwd_kernel(dy, ys, weight, order, dys, dw, D, K: tl.constexpr, s_dy, s_ys, s_dys,
                          BD: tl.constexpr):
    """Sorted row i of assignment a = order[i]: dys[i] = w[a] dy[a // K], dw[a] = dy[a // K] . ys[i]."""
    i = tl.program_id(0).to(tl.int64)
    a = tl.load(order + i)
    w = tl.load(weight + a).to(tl.float32)
    acc = tl.zeros([BD], dtype=tl.float32)
    for d0 in range(0, D, BD):
        o = d0 + tl.arange(0, BD)
        m = o < D
        g = tl.load(dy + (a // K) * s_dy + o, mask=m, other=0.0).to(tl.float32)
        y = tl.load(ys + i * s_ys + o, mask=m, other=0.0).to(tl.float32)
        tl.store(dys + i * s_dys + o, (w * g).to(dys.dtype.element_ty), mask=m)
        acc += g * y
    tl.store(dw + a, tl.sum(acc, axis=0).to(dw.dtype.element_ty))


def _inverse(order: Tensor) -> Tensor:
    row = torch.empty_like(order)
    row[order] = torch.arange(order.numel(), device=order.device)
    return row


def _gather(src: Tensor, order: Tensor, k: int) -> Tensor:
    d = src.shape[1]
    dst = _empty(order.numel(), d, like=src)
    if order.numel():
        _gather_kernel[(order.numel(),)](
            src, dst, order, d, k, src.stride(0), dst.stride(0), BD=_block(d), num_warps=NUM_WARPS
        )
    return dst


def _combine(src: Tensor, row: Tensor, n: int, k: int, weight: Tensor | None, dtype: torch.dtype) -> Tensor:
    d = src.shape[1]
    dst = _empty(n, d, like=src, dtype=dtype)
    if n:
        _combine_kernel[(n,)](
            src, dst, row, weight if weight is not None else src, d, k, src.stride(0), dst.stride(0),
            HAS_WEIGHT=weight is not None, BD=_block(d), num_warps=NUM_WARPS,
        )
    return dst


def _rows(t: Tensor) -> Tensor:
    """``t`` plain, with unit column stride (any row stride, which the kernels take)."""
    t = plain(t)
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, k: int) -> Tensor:
        x = _rows(x)
        ctx.save_for_backward(order)
        ctx.k, ctx.n, ctx.dtype = k, x.shape[0], x.dtype
        return _gather(x, order, k)

    @staticmethod
    def backward(ctx, dxs: Tensor):
        (order,) = ctx.saved_tensors
        return _combine(_rows(dxs), _inverse(order), ctx.n, ctx.k, None, ctx.dtype), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ys: Tensor, order: Tensor, weight: Tensor, out_dtype: torch.dtype) -> Tensor:
        ys, weight = _rows(ys), weight.contiguous()
        n, k = weight.shape
        ctx.save_for_backward(ys, order, weight)
        return _combine(ys, _inverse(order), n, k, weight, out_dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        ys, order, weight = ctx.saved_tensors
        dy = _rows(dy)
        n, k = weight.shape
        dys = _empty(*ys.shape, like=ys)
        dw = _empty(n, k, like=weight, dtype=torch.float32)
        if order.numel():
            d = ys.shape[1]
            _unpermute_bwd_kernel[(order.numel(),)](
                dy, ys, weight, order, dys, dw, d, k, dy.stride(0), ys.stride(0), dys.stride(0),
                BD=_block(d), num_warps=NUM_WARPS,
            )
        return dys, None, dw.to(weight.dtype), None


def permute_triton(x: Tensor, order: Tensor, k: int) -> Tensor:
    """``xs [N*k, D]``: ``xs[i] = x[order[i] // k]``; differentiable in ``x``."""
    return _Permute.apply(x, order, k)


def unpermute_triton(ys: Tensor, order: Tensor, weight: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``y [N, D]`` in ``out_dtype``: ``y[n] = sum_j weight[n, j] ys[i]`` over ``order[i] = n k + j``;
    differentiable in ``ys`` and ``weight``."""
    return _Unpermute.apply(ys, order, weight, out_dtype)
