"""The short causal depthwise convolution of Mamba, Mamba-2 and Titans, with document masking.

A plain function (no layer registered here) so the recurrent mixers share one definition.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


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


def cached_causal_conv(x: Tensor, state, weight: Tensor, bias: Tensor, positions: Tensor) -> Tensor:
    """:func:`masked_causal_conv` of new inputs ``x [B, T, C]`` continuing a decoding ``state``
    whose ``conv [B, C, K-1]`` holds the last inputs (oldest first; updated in place), or from
    zeros when ``state`` is None."""
    k = weight.shape[1]
    b, t, c = x.shape
    tail = x.new_zeros(b, k - 1, c) if state is None else state.conv.transpose(1, 2)
    xp = torch.cat([tail, x], dim=1)  # [B, K-1+T, C]
    if state is not None:
        state.conv = xp[:, t:].transpose(1, 2)
    return masked_causal_conv(xp, weight, bias, positions)


@torch.no_grad()
def init_short_conv_(conv: nn.Conv1d) -> None:
    """nn.Conv1d's default uniform init (fan_in = kernel width for a depthwise conv), as mamba_ssm."""
    bound = 1 / math.sqrt(conv.kernel_size[0])
    nn.init.uniform_(conv.weight, -bound, bound)
    nn.init.uniform_(conv.bias, -bound, bound)
