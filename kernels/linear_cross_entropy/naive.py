"""Linear + cross-entropy, the executable specification: the head projection materialises the
full ``[N, V]`` logits, then the mean cross-entropy plus the optional z-loss (PaLM, Chowdhery et
al. 2022, section 5: ``z_loss_coef * log(Z)^2`` keeps the softmax normaliser near 1). What the
chunked paths must equal; also the unfused baseline of ``bench/linear_cross_entropy.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.dispatch import at_least_fp32


def naive_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, ignore_index: int = -100, z_loss_coef: float = 0.0
) -> Tensor:
    """``mean_i [lse_i - z_i[label_i] + z_loss_coef * lse_i^2]`` over the tokens whose label is not
    ``ignore_index``, with ``z = hidden @ weight.T`` in fp32 (fp64 for fp64 inputs).

    hidden ``[N, D]``, weight ``[V, D]``, labels ``[N]`` int64. Returns the fp32 scalar (NaN when
    every label is ignored, as ``F.cross_entropy``)."""
    logits = at_least_fp32(F.linear(hidden, weight))
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index)
    if z_loss_coef:
        keep = labels != ignore_index
        loss = loss + z_loss_coef * torch.logsumexp(logits[keep], dim=-1).square().mean()
    return loss
