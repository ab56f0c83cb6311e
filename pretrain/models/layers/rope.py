"""Rotary position embeddings with explicit position ids (positions restart in every packed
document). Half-split ("rotate_half") layout, as Hugging Face Llama, so attention-only
checkpoints export without permuting q/k weights."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from pretrain.models.layers.norm import at_least_fp32


@functools.lru_cache(maxsize=16)
def _inverse_frequencies(half: int, theta: float, device: torch.device) -> Tensor:
    """``theta ** (-i / half)`` for i < half, fp64 (built once per shape: a decoding step
    would otherwise spend three operators of its ~40 us context on it)."""
    return theta ** (-torch.arange(half, device=device, dtype=torch.float64) / half)


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin ``[B, T, head_dim // 2]`` in fp32 for integer ``positions [B, T]``."""
    inv_freq = _inverse_frequencies(head_dim // 2, float(theta), positions.device)
    angles = positions.double().unsqueeze(-1) * inv_freq  # [B, T, half]; fp64 keeps large positions exact
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, T, H, head_dim]`` by the tables of :func:`rope_tables`; keeps x's dtype."""
    x1, x2 = at_least_fp32(x).chunk(2, dim=-1)  # [B, T, H, half] each
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, T, 1, half]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)
