"""The short causal depthwise convolution of Mamba, Mamba-2 and Titans, with document masking.

A plain function (no layer registered here) so the recurrent mixers share one definition.
"""

from __future__ import annotations

from torch import Tensor


def masked_causal_conv(xp: Tensor, weight: Tensor, bias: Tensor, positions: Tensor) -> Tensor:
    """Causal depthwise conv of ``xp [B, K-1+T, C]`` (the K-1 past inputs first) with ``weight
    [C, K]`` (tap K-1 multiplies the current token) that never reads across a document start:
    the input s steps back counts only where ``positions >= s``. Returns ``[B, T, C]``."""
    k = weight.shape[1]
    t = xp.shape[1] - (k - 1)
    out = xp[:, k - 1 :] * weight[:, k - 1] + bias
    for s in range(1, k):
        keep = (positions >= s).unsqueeze(-1).to(xp.dtype)  # [B, T, 1]
        out = out + xp[:, k - 1 - s : k - 1 - s + t] * (weight[:, k - 1 - s] * keep)
    return out
