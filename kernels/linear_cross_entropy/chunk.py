"""The element-wise part of a block of the chunked linear + cross-entropy, in Triton: one pass
over each row of the ``[c, V]`` block of logits keeps an online max and sum of exponentials over
tiles of the vocabulary (Milakov & Gimelshein 2018, "Online normalizer calculation for
softmax"), reads the label's logit, and then overwrites the row with ``d loss / d logits`` (the
scheme of Liger-Kernel's fused linear cross-entropy, Hsu et al. 2024). The two matmuls per block
(the logits, then ``dh`` and ``dW``) stay in torch (cuBLAS): see :mod:`.chunk_torch`, whose
:class:`ChunkedLinearCrossEntropy` calls :func:`loss_block_triton` in place of
:func:`.chunk_torch.loss_block_torch`.

One rank: one launch computes the row statistics and writes the gradient (the row is read twice,
written once: ``3 c V`` element accesses, the minimum for an in-place softmax gradient).
Vocabulary-parallel: a first launch returns each row's max, sum of exponentials (relative to that
max) and the label's logit (0 where this rank does not own the label); torch reduces them over the
ranks (``all_reduce``) into the log-sum-exp; a second launch writes the gradient.

Launch: one program per row (a row of 32k fp32 logits is 128 KiB: enough work for a program, and
the two passes over it hit L2), ``BLOCK_V`` = the vocabulary rounded up to a power of two, at
most 4096 (16 KiB of fp32 per tile in registers over 8 warps: 16 elements per thread), so the
tile loop runs ``ceil(V / 4096)`` times; odd V is masked. Row offsets are int64 (``c * V`` passes
2^31 at 16k tokens x 256k vocab); the block may be a view with any row stride (its last dimension
contiguous). No atomics: each row belongs to one program, so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.linear_cross_entropy.chunk_torch import AllReduce

POISON_OUTPUTS = False  # tests set True: fresh outputs start as NaN, so an unwritten element shows
MAX_BLOCK_V = 4096
NUM_WARPS = 8


@triton.jit
def _cross_entropy_block_kernel(z, s_z, g, s_g, labels, vocab_start, V, w, lse_in, z_loss_coef,
                                m_out, s_out, t_out, BLOCK_V: tl.constexpr, STATS: tl.constexpr,
                                GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z + row * s_z
    g_row = g + row * s_g
    local = tl.load(labels + row) - vocab_start  # int64; negative or >= V: another rank's (or ignored)
    owned = (local >= 0) & (local < V)
    cols = tl.arange(0, BLOCK_V)
    if STATS:
        m = float("-inf")
        s = 0.0
        for v0 in range(0, V, BLOCK_V):
            x = tl.load(z_row + v0 + cols, mask=v0 + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        target = tl.load(z_row + tl.where(owned, local, 0), mask=owned, other=0.0).to(tl.float32)
        tl.store(m_out + row, m)
        tl.store(s_out + row, s)
        tl.store(t_out + row, target)
        lse = m + tl.log(s)
    else:
        lse = tl.load(lse_in + row)
    if GRAD:
        # d/dz [w (lse - z_label) + w c lse^2] = w (1 + 2 c lse) softmax(z) - w onehot(label)
        w_row = tl.load(w + row)
        coef = w_row * (1.0 + 2.0 * z_loss_coef * lse)
        for v0 in range(0, V, BLOCK_V):
            o = v0 + cols
            x = tl.load(z_row + o, mask=o < V, other=0.0).to(tl.float32)
            d = coef * tl.exp(x - lse) - tl.where(o == local, w_row, 0.0)
            tl.store(g_row + o, d.to(g.dtype.element_ty), mask=o < V)


def _fresh(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(z, g, labels, vocab_start, w, lse, z_loss_coef, stats: bool, grad: bool):
    c, v = z.shape
    stat = [_fresh((c,), torch.float32, z.device) for _ in range(3)] if stats else [z] * 3  # unused pointers
    block = min(MAX_BLOCK_V, triton.next_power_of_2(v))
    _cross_entropy_block_kernel[(c,)](
        z, z.stride(0), g if g is not None else z, (g if g is not None else z).stride(0), labels, vocab_start, v,
        w if w is not None else z, lse if lse is not None else z, float(z_loss_coef), *stat,
        BLOCK_V=block, STATS=stats, GRAD=grad, num_warps=NUM_WARPS,
    )
    return stat if stats else None


def loss_block_triton(
    z: Tensor, labels: Tensor, vocab_start: int, w: Tensor, z_loss_coef: float, all_reduce: AllReduce | None,
    grad_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-row loss terms of a block of logits and, optionally, their gradient.

    Args:
        z: ``[c, V_local]`` fp32 logits (any row stride, last dimension contiguous); overwritten
            with the gradient when ``grad_dtype`` is fp32.
        labels: ``[c]`` int64 ids in the full vocabulary (``ignore_index`` ones have ``w = 0``).
        vocab_start: the first vocabulary id of ``z``'s columns.
        w: ``[c]`` fp32 per-row weight of the loss (1 / kept tokens, 0 on ignored ones).
        z_loss_coef: the PaLM z-loss weight.
        all_reduce: the reduction over the ranks sharing the vocabulary, or None on one rank.
        grad_dtype: the dtype of the gradient to return, or None for no gradient.

    Returns:
        ``(nll [c], lse [c], dz)``: fp32 ``lse - z_label`` (arbitrary on rows whose label no
        rank owns: ignored, weighted by 0) and log-sum-exp per row, and ``d
        (sum_i w_i (nll_i + z_loss_coef lse_i^2)) / dz`` ``[c, V_local]`` in ``grad_dtype`` (``z``
        itself for fp32), or None.

    Raises:
        ValueError: ``z`` not fp32 or its last dimension not contiguous.
    """
    if z.dtype != torch.float32 or z.dim() != 2 or z.stride(1) != 1:
        raise ValueError(f"loss_block_triton: z must be a [c, V] fp32 block with contiguous rows, got {z.dtype} "
                         f"{tuple(z.shape)} strides {z.stride()}")
    labels, w = labels.contiguous(), w.to(torch.float32).contiguous()
    want = grad_dtype is not None
    g = None if not want else z if grad_dtype == torch.float32 else _fresh(z.shape, grad_dtype, z.device)
    if all_reduce is None:  # the statistics are complete on this rank: one launch
        m, s, target = _launch(z, g, labels, vocab_start, w, None, z_loss_coef, True, want)
        lse = m + s.log()
        return lse - target, lse, g
    m, s, target = _launch(z, None, labels, vocab_start, None, None, z_loss_coef, True, False)
    m_all = all_reduce(m, "max")
    s, target = all_reduce(torch.stack([s * (m - m_all).exp(), target]), "sum").unbind(0)
    lse = m_all + s.log()
    if want:
        _launch(z, g, labels, vocab_start, w, lse.contiguous(), z_loss_coef, False, True)
    return lse - target, lse, g
