"""The head projection and the language-model loss in one op, without materialising the
``[tokens, vocab]`` logits: ``chunk_torch.py`` computes them a block of tokens at a time (two
matmuls per block, on cuBLAS on a GPU, and the block's softmax, loss and in-place gradient in
PyTorch: the CPU path); ``chunk.py`` does that element-wise part of each block in one Triton
kernel (Liger-Kernel's scheme); ``naive.py`` is the unfused specification.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dispatch import check_inputs, select
from kernels.linear_cross_entropy.chunk_torch import AllReduce, ChunkedLinearCrossEntropy, auto_chunk_size

__all__ = ["AllReduce", "linear_cross_entropy"]


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    z_loss_coef: float = 0.0,
    chunk_size: int | None = None,
    vocab_start: int = 0,
    all_reduce: AllReduce | None = None,
    return_z_loss: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Mean next-token cross-entropy of the logits ``hidden @ weight.T``, plus the z-loss
    ``z_loss_coef * mean(logsumexp(logits)^2)`` (PaLM), computed ``chunk_size`` tokens at a time:
    peak memory holds one ``[chunk_size, V]`` block of fp32 logits instead of ``[N, V]``.

    Args:
        hidden: ``[N, D]`` (or ``[B, T, D]``) final hidden states, after the final norm.
        weight: ``[V, D]`` head weight (the tied embedding's, or this rank's vocabulary rows).
        labels: ``[N]`` (or ``[B, T]``) int64 target ids in the full vocabulary;
            ``ignore_index`` ones count neither in the loss nor in the mean.
        z_loss_coef: weight of the z-loss (0 disables it).
        chunk_size: tokens per block; None picks one (:func:`chunk_torch.auto_chunk_size`).
        vocab_start, all_reduce: for a vocabulary-parallel head: the first vocabulary id of this
            rank's ``weight`` rows, and the reduction over the ranks that share the vocabulary
            (:data:`chunk_torch.AllReduce`). The gradient of ``hidden`` is then this rank's
            partial sum.
        return_z_loss: also return the z-loss term alone (detached), for logs.
        backend: ``model.kernels`` ('auto' | 'triton' | 'torch', see :func:`kernels.dispatch.select`):
            the block's element-wise part in Triton (:mod:`.chunk`) or PyTorch; fp64 inputs (the
            checks) always take PyTorch.

    Returns:
        The fp32 scalar loss, z-loss term included (fp64 for fp64 inputs; NaN when every label
        is ignored), with gradients for ``hidden`` and ``weight`` (computed in the forward:
        the backward only scales them); with ``return_z_loss``, ``(loss, z-loss term)``.

    Raises:
        ValueError: mismatched shapes, non-float inputs, integer labels missing, several
            devices, a chunk_size <= 0, or a backend that cannot run (:func:`kernels.dispatch.select`).
    """
    check_inputs("linear_cross_entropy", {"hidden": hidden, "weight": weight})
    hidden = hidden.reshape(-1, hidden.shape[-1])
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"linear_cross_entropy: weight {tuple(weight.shape)} must be [V, {hidden.shape[1]}]")
    if labels.dtype.is_floating_point or labels.numel() != hidden.shape[0]:
        raise ValueError(
            f"linear_cross_entropy: labels {tuple(labels.shape)} {labels.dtype} must be integer ids, one per token "
            f"of hidden ({hidden.shape[0]})"
        )
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"linear_cross_entropy: chunk_size {chunk_size} must be > 0")
    chunk = chunk_size or auto_chunk_size(*hidden.shape, weight.shape[0])
    loss_block = None
    if select("linear_cross_entropy", backend, hidden.device, "kernels.linear_cross_entropy.chunk") == "triton":
        if torch.promote_types(hidden.dtype, weight.dtype) != torch.float64:
            from kernels.linear_cross_entropy.chunk import loss_block_triton as loss_block
    loss, z_loss = ChunkedLinearCrossEntropy.apply(
        hidden, weight, labels.reshape(-1).long(), ignore_index, float(z_loss_coef), chunk, vocab_start, all_reduce,
        loss_block,
    )
    return (loss, z_loss) if return_z_loss else loss
