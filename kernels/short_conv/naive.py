"""The specification of the short causal depthwise convolution: a loop over tokens and taps.

Per batch row b, token t and channel c, with ``weight [C, W]`` (tap W-1 multiplies the current
token, tap W-1-s the input s steps back, as nn.Conv1d's taps after left padding by W-1):

    u[t, c] = bias[c] + sum_{s=0}^{W-1} keep(t, s) * weight[c, W-1-s] * x[t-s, c]
    y[t, c] = silu(u[t, c]) if activation == 'silu' else u[t, c]

where ``x[t-s]`` for ``t-s < 0`` is the initial state (``initial_state[b, c, W-1+t-s]``, zeros
without one) and ``keep(t, s) = positions[b, t] >= s`` (1 without positions): a tap never reads
before the token's document start. Slow and exact; the tests run it in fp64.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    positions: Tensor | None = None,
    initial_state: Tensor | None = None,
    activation: str | None = None,
) -> tuple[Tensor, Tensor]:
    """``x [B, T, C]``, ``weight [C, W]``, ``bias [C]``, ``positions [B, T]``, ``initial_state
    [B, C, W-1]`` (oldest first) -> ``(y [B, T, C], final state [B, C, W-1])``, in x's dtype."""
    b, t, c = x.shape
    w = weight.shape[1]
    past = [x.new_zeros(b, c) for _ in range(w - 1)] if initial_state is None else list(initial_state.unbind(-1))
    inputs = past + list(x.unbind(1))  # inputs[w - 1 + i] is token i
    ys = []
    for i in range(t):
        u = x.new_zeros(b, c) if bias is None else bias.to(x.dtype).expand(b, c).clone()
        for s in range(w):
            tap = weight[:, w - 1 - s].to(x.dtype) * inputs[w - 1 + i - s]
            if positions is not None:
                tap = tap * (positions[:, i] >= s).to(x.dtype)[:, None]
            u = u + tap
        ys.append(u * torch.sigmoid(u) if activation == "silu" else u)
    final = torch.stack(inputs[len(inputs) - (w - 1) :], dim=-1) if w > 1 else x.new_zeros(b, c, 0)
    return torch.stack(ys, dim=1), final
