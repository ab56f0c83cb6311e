"""Mamba-1's selective scan, the executable specification: the discretised SSM of Gu & Dao 2023
("Mamba: Linear-Time Sequence Modeling with Selective State Spaces", Algorithm 2, zero-order
hold for A and the simplified Euler step for B) one token at a time, in fp32 (fp64 for fp64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dispatch import at_least_fp32


def naive_selective_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    initial_state: Tensor | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per channel d and state index n: ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t``
    (``h_{t-1} := 0`` where ``reset_t``), ``y_t = C_t . h_t + D x_t``.

    x, dt ``[B, T, D]``; A ``[D, N]``; B, C ``[B, T, N]``; D ``[D]``; initial_state ``[B, D, N]``
    or None; reset ``[B, T]`` bool or None. Returns ``y [B, T, D]`` in x's dtype and the final
    state ``[B, D, N]`` in fp32 (fp64 for fp64 inputs).
    """
    out_dtype = x.dtype
    x, dt, A, B, C, D = (at_least_fp32(z) for z in (x, dt, A, B, C, D))
    b, t, d = x.shape
    h = x.new_zeros(b, d, A.shape[1]) if initial_state is None else at_least_fp32(initial_state)
    ys = []
    for i in range(t):
        a = torch.exp(dt[:, i, :, None] * A)  # [B, D, N]
        if reset is not None:
            a = a * (~reset[:, i]).to(a.dtype)[:, None, None]
        h = a * h + (dt[:, i] * x[:, i])[:, :, None] * B[:, i, None, :]
        ys.append((h * C[:, i, None, :]).sum(-1) + D * x[:, i])
    return torch.stack(ys, dim=1).to(out_dtype), h
