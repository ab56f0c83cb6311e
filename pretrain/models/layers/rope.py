"""Rotary position embeddings with explicit position ids (positions restart in every packed
document). Half-split ("rotate_half") layout, as Hugging Face Llama, so attention-only
checkpoints export without permuting q/k weights."""

from __future__ import annotations

import torch
from torch import Tensor

from pretrain.models.layers.norm import at_least_fp32


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin ``[B, T, head_dim // 2]`` in fp32 for integer ``positions [B, T]``."""
    half = head_dim // 2
    inv_freq = theta ** (-torch.arange(half, device=positions.device, dtype=torch.float64) / half)
    angles = positions.double().unsqueeze(-1) * inv_freq  # [B, T, half]; fp64 keeps large positions exact
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, T, H, head_dim]`` by the tables of :func:`rope_tables`; keeps x's dtype."""
    x1, x2 = at_least_fp32(x).chunk(2, dim=-1)  # [B, T, H, half] each
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, T, 1, half]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
