"""Differential attention's core (Ye et al. 2024): two softmax maps per head pair, subtracted.

One function, :func:`diff_attention`, that a fused kernel can replace; the layer
(:mod:`pretrain.models.layers.diff_attention`) adds the projections, lambda and the norm.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(q [B, T, h, D], k [B, S, h_kv, D], v [B, S, h_kv, Dv]) -> [B, T, h, Dv]``: softmax
attention (scale 1/sqrt(D)) with GQA (query head i reads KV head i // (h / h_kv)) and a mask."""


def diff_attention(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, attend: Attend) -> Tensor:
    """Differential attention of ``q [B, T, H, D]`` over ``k, v [B, S, H_kv, D]`` -> ``[B, T, H/2, 2D]``.

    Heads come in pairs (2i, 2i+1), and so do KV heads: pair i (of H/2) attends with its two
    query heads to the two key heads of KV pair j = i // (H / H_kv), and both maps read the
    value V_j = [v_2j, v_2j+1] of width 2D:
        o_i = softmax(q_2i k_2j^T / sqrt(D)) V_j - lam * softmax(q_2i+1 k_2j+1^T / sqrt(D)) V_j.
    ``lam``: a scalar tensor; ``attend``: the softmax attention (mask, window, documents).
    """
    h, d = q.shape[2:]
    if h % 2 or k.shape[2] % 2:
        raise ValueError(f"diff_attention: heads ({h}) and KV heads ({k.shape[2]}) must be even")
    if k.shape != v.shape or k.shape[-1] != d:
        raise ValueError(f"diff_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must be [B, S, H_kv, {d}]")
    # v's own batch: under context parallelism the keys are gathered sequences, not q's rows
    v2 = v.reshape(v.shape[0], v.shape[1], -1, 2 * d)  # [B, S, H_kv/2, 2D]: the pair's two value heads side by side
    o1 = attend(q[:, :, 0::2], k[:, :, 0::2], v2)  # [B, T, H/2, 2D]
    o2 = attend(q[:, :, 1::2], k[:, :, 1::2], v2)
    return o1 - lam * o2
