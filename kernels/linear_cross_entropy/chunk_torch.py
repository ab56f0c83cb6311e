"""Linear + cross-entropy in chunks of tokens, in PyTorch: the head projection, the log-sum-exp,
the loss and its gradients are computed ``chunk_size`` tokens at a time, so the ``[N, V]``
logits never exist (only a ``[chunk_size, V]`` block does). The gradients of the hidden states and
of the weight are computed in the forward, while each block of logits is at hand, and scaled by
the incoming gradient in the backward (the scheme of Liger-Kernel's fused linear cross-entropy,
Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for LLM Training"; the loss is the one of
:mod:`kernels.linear_cross_entropy.naive`).

Vocabulary-parallel heads (Megatron's vocab-parallel cross-entropy): each rank holds rows
``[vocab_start, vocab_start + V_local)`` of the weight; the per-token max, sum of exponentials and
target logit are combined across ranks by the ``all_reduce`` callback, and the gradient of the
hidden states returned is this rank's partial sum (the tensor-parallel region around the head
reduces it). Model code stays free of torch.distributed: the callback comes from
:mod:`parallel.tensor`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kernels.dispatch import at_least_fp32

AllReduce = Callable[[Tensor, str], Tensor]
"""``all_reduce(x, op)`` with op 'max' or 'sum': the elementwise reduction of ``x`` over the
ranks that share the vocabulary (identity on one rank)."""

TARGET_LOGITS_PER_CHUNK = 1 << 22
"""Automatic chunk: about this many logits (16 MiB in fp32) per block, and never more tokens than
make the block as large as the hidden states themselves."""


def auto_chunk_size(n_tokens: int, d_model: int, vocab: int) -> int:
    """Tokens per block: the block of logits ``[chunk, vocab]`` stays about the size of the
    hidden states ``[n_tokens, d_model]`` or ``TARGET_LOGITS_PER_CHUNK``, whichever is larger."""
    budget = max(n_tokens * d_model, TARGET_LOGITS_PER_CHUNK)
    return max(1, min(n_tokens, budget // max(vocab, 1)))


def _no_reduce(x: Tensor, op: str) -> Tensor:
    return x


def loss_block_torch(
    z: Tensor, labels: Tensor, vocab_start: int, w: Tensor, z_loss_coef: float, all_reduce: AllReduce | None,
    grad_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Per-row loss terms of a block of logits ``z [c, V_local]`` (fp32, or fp64; overwritten)
    and, unless ``grad_dtype`` is None, ``d (sum_i w_i (nll_i + z_loss_coef lse_i^2)) / dz`` in
    ``grad_dtype``. Returns ``(nll, lse, dz)`` with ``nll = lse - z_label`` per row. Arguments
    and results as :func:`kernels.linear_cross_entropy.chunk.loss_block_triton`."""
    reduce = all_reduce or _no_reduce
    local = labels - vocab_start
    mine = (local >= 0) & (local < z.shape[1])
    rows = torch.arange(z.shape[0], device=z.device)[mine]
    cols = local[mine]
    m = reduce(z.max(dim=1).values, "max")
    target = torch.zeros_like(m)
    target[rows] = z[rows, cols] - m[rows]  # the label's logit, on the rank that owns it
    z.sub_(m.unsqueeze(1)).exp_()  # z := exp(logits - m), in place
    sum_exp, target = reduce(torch.stack([z.sum(dim=1), target]), "sum").unbind(0)
    lse = m + sum_exp.log()
    nll = lse - m - target
    if grad_dtype is None:
        return nll, lse, None
    # d loss / d logits = w * (softmax * (1 + 2 z_coef lse) - onehot(label)), in place in z
    z.mul_((w * (1 + 2 * z_loss_coef * lse) / sum_exp).unsqueeze(1))
    z[rows, cols] -= w[rows]
    return nll, lse, z.to(grad_dtype)


LossBlock = Callable[..., tuple[Tensor, Tensor, "Tensor | None"]]
"""The signature of :func:`loss_block_torch` (and of its Triton twin)."""


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward: the loss (fp32 scalar, z-loss term included) and the z-loss term alone (not
    differentiable, for logs); the gradients of ``hidden`` and ``weight`` are kept for the
    backward. Arguments as :func:`kernels.linear_cross_entropy.linear_cross_entropy`;
    ``loss_block`` does a block's element-wise part (:func:`loss_block_torch` when None)."""

    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        ignore_index: int,
        z_loss_coef: float,
        chunk_size: int,
        vocab_start: int,
        all_reduce: AllReduce | None,
        loss_block: LossBlock = None,
    ) -> Tensor:
        n = hidden.shape[0]
        loss_block = loss_block or loss_block_torch
        acc = torch.promote_types(hidden.dtype, torch.float32)
        keep = labels != ignore_index
        scale = 1.0 / keep.sum().to(acc)  # inf when every label is ignored: a NaN loss, as F.cross_entropy
        want_dh, want_dw = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(hidden) if want_dh else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_dw else None
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        z_loss = torch.zeros_like(loss)
        for s in range(0, n, chunk_size):
            h = hidden[s : s + chunk_size]
            z = at_least_fp32(h @ weight.T)  # [c, V_local]: the only block of logits alive
            w = keep[s : s + chunk_size].to(acc) * scale
            # the gradient in the precision autograd's linear would use
            grad_dtype = weight.dtype if (want_dh or want_dw) else None
            y = labels[s : s + chunk_size]
            nll, lse, dz = loss_block(z, y, vocab_start, w, z_loss_coef, all_reduce, grad_dtype)
            loss += (w * nll).sum()
            if z_loss_coef:
                z_loss += z_loss_coef * (w * lse.square()).sum()
            if dz is None:
                continue
            if want_dh:
                grad_h[s : s + chunk_size] = dz @ weight
            if want_dw and dz.dtype == acc:
                grad_w.addmm_(dz.T, h)  # no [V, D] temporary
            elif want_dw:
                grad_w += (dz.T @ h).to(acc)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(z_loss)
        return loss + z_loss, z_loss

    @staticmethod
    def backward(ctx, grad_out: Tensor, _grad_z_loss: Tensor | None):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_out.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None
