"""Mamba-2's SSD, the executable specification: the selective SSM with a scalar decay per head
(Dao & Gu 2024, "Transformers are SSMs", section 7 / eq. of the SSD layer) one token at a time,
in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dispatch import at_least_fp32


def naive_ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per head h: ``H_t = exp(dt_t A_h) H_{t-1} + dt_t x_t (x) B_t`` (``H_{t-1} := 0`` where
    ``reset_t``), ``y_t = H_t C_t + D_h x_t``; head h reads group ``h // (H / G)`` of B and C.

    x ``[B, T, H, P]``; dt ``[B, T, H]``; A, D ``[H]``; B, C ``[B, T, G, N]``; initial_state
    ``[B, H, P, N]`` or None; reset ``[B, T]`` bool or None. Returns ``y [B, T, H, P]`` in x's
    dtype and the final state ``[B, H, P, N]`` in fp32 (fp64 for fp64 inputs).
    """
    out_dtype = x.dtype
    x, dt, A, B, C = (at_least_fp32(z) for z in (x, dt, A, B, C))
    b, t, h, p = x.shape
    heads_per_group = h // B.shape[2]
    state = x.new_zeros(b, h, p, B.shape[-1]) if initial_state is None else at_least_fp32(initial_state)
    ys = []
    for i in range(t):
        decay = torch.exp(dt[:, i] * A)  # [B, H]
        if reset is not None:
            decay = decay * (~reset[:, i]).to(decay.dtype)[:, None]
        Bi = B[:, i].repeat_interleave(heads_per_group, dim=1)  # [B, H, N]
        Ci = C[:, i].repeat_interleave(heads_per_group, dim=1)
        state = decay[..., None, None] * state + (dt[:, i, :, None] * x[:, i])[..., None] * Bi[:, :, None, :]
        y = (state * Ci[:, :, None, :]).sum(-1)  # [B, H, P]
        ys.append(y if D is None else y + at_least_fp32(D)[:, None] * x[:, i])
    return torch.stack(ys, dim=1).to(out_dtype), state
