"""The short causal depthwise convolution in PyTorch: W shifted multiply-adds over the whole
sequence (autograd does the backward). The CPU path; moved from the models' former
``layers/conv.py``. Semantics: :mod:`kernels.short_conv.naive`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _act(u: Tensor, activation: str | None) -> Tensor:
    return F.silu(u) if activation == "silu" else u


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    positions: Tensor | None,
    initial_state: Tensor | None,
    activation: str | None,
) -> Tensor:
    """``x [B, T, C]`` -> ``y [B, T, C]`` in x's dtype (see :func:`kernels.short_conv.causal_conv1d`)."""
    b, t, c = x.shape
    k = weight.shape[1]
    tail = x.new_zeros(b, k - 1, c) if initial_state is None else initial_state.transpose(1, 2).to(x.dtype)
    xp = torch.cat([tail, x], dim=1)  # [B, K-1+T, C]: the K-1 past inputs first
    out = xp[:, k - 1 :] * weight[:, k - 1]
    if bias is not None:
        out = out + bias
    for s in range(1, k):
        w_s = weight[:, k - 1 - s]
        if positions is not None:  # the input s steps back counts only inside the token's document
            w_s = w_s * (positions >= s).unsqueeze(-1).to(w_s.dtype)  # [B, T, C]
        out = out + xp[:, k - 1 - s : k - 1 - s + t] * w_s
    return _act(out, activation).to(x.dtype)


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    positions: Tensor | None,
    activation: str | None,
) -> tuple[Tensor, Tensor]:
    """One token ``x [B, C]`` after ``conv_state [B, C, W-1]`` -> ``(y [B, C], new state)``."""
    k = weight.shape[1]
    window = torch.cat([conv_state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # [B, C, W]
    w = weight.expand(x.shape[0], -1, -1)
    if positions is not None:
        shift = torch.arange(k - 1, -1, -1, device=x.device)  # tap j reads s = W-1-j back
        w = w * (positions[:, None] >= shift).to(weight.dtype).unsqueeze(1)  # [B, C, W]
    u = (window * w).sum(-1)
    if bias is not None:
        u = u + bias
    return _act(u, activation).to(x.dtype), window[:, :, 1:].to(conv_state.dtype)
