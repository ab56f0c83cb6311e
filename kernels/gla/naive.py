"""Gated Linear Attention, the executable specification: the recurrence of Yang et al. 2023
("Gated Linear Attention Transformers with Hardware-Efficient Training", eq. for S_t) one token
at a time, in fp32 (fp64 for fp64 inputs). Slow; for tests and for reading against the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dispatch import at_least_fp32


def naive_recurrent_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per head, ``S_t = Diag(exp(g_t)) S_{t-1} + k_t^T v_t`` (``S_{t-1} := 0`` where
    ``reset_t``), ``o_t = (scale * q_t) S_t``.

    q, k, g ``[B, T, H, K]``, v ``[B, T, H, V]``, initial_state ``[B, H, K, V]`` or None,
    reset ``[B, T]`` bool or None. Returns ``o [B, T, H, V]`` in v's dtype and the final state
    ``[B, H, K, V]`` in fp32 (fp64 for fp64 inputs).
    """
    b, t, h, dk = q.shape
    scale = dk**-0.5 if scale is None else scale
    out_dtype = v.dtype
    q, k, v, g = (at_least_fp32(z) for z in (q, k, v, g))
    s = q.new_zeros(b, h, dk, v.shape[-1]) if initial_state is None else at_least_fp32(initial_state)
    outs = []
    for i in range(t):
        alpha = g[:, i].exp()  # [B, H, K]
        if reset is not None:
            alpha = alpha * (~reset[:, i]).to(alpha.dtype)[:, None, None]
        s = alpha.unsqueeze(-1) * s + k[:, i].unsqueeze(-1) * v[:, i].unsqueeze(-2)  # [B, H, K, V]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, i] * scale, s))
    return torch.stack(outs, dim=1).to(out_dtype), s
