"""Differential attention (Ye et al. 2024, "Differential Transformer"): 'diff_attn' (full) and
'diff_swa' (sliding window).

Same projections (and parameter count) as :class:`Attention` plus four lambda vectors and a
per-head RMSNorm: the H query heads form H/2 pairs whose two softmax maps are subtracted,
    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,
    lambda_init = 0.8 - 0.6 exp(-0.3 * layer_index),
and each pair's output [B, T, 2D] is RMS-normalised and scaled by (1 - lambda_init). RoPE,
GQA, document masking, the window, the KV cache, flash-attn and context parallelism (gathered
keys/values, a halo or ring attention, SDPA only) work as in :class:`Attention`: both maps of a
pair go through the same masked softmax attention (under ring attention: one ring each, whose
blocks carry the pair's keys and its 2D-wide values).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pretrain.models.layers.attention import Attention
from pretrain.models.layers.diff_ops import Attend, diff_attention
from pretrain.models.layers.norm import RMSNorm
from pretrain.models.registry import register_mixer

if TYPE_CHECKING:
    from pretrain.config import ModelConfig
    from pretrain.models.context import ForwardContext

LAMBDA_STD = 0.1  # the paper's initialisation of the lambda vectors


def lambda_init(layer_idx: int) -> float:
    """The paper's depth-dependent lambda_init (``layer_idx`` 0-based)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


class DiffAttention(Attention):
    def __init__(self, cfg: ModelConfig, window: int | None, layer_idx: int) -> None:
        super().__init__(cfg, window)
        a = cfg.attention
        if a.n_heads % 2 or (a.n_kv_heads or a.n_heads) % 2:
            raise ValueError(f"differential attention needs even head counts, got {a.n_heads} / {a.n_kv_heads}")
        self.lambda_init = lambda_init(layer_idx)
        d = self.head_dim
        self.lambda_q1 = nn.Parameter(torch.empty(d))
        self.lambda_k1 = nn.Parameter(torch.empty(d))
        self.lambda_q2 = nn.Parameter(torch.empty(d))
        self.lambda_k2 = nn.Parameter(torch.empty(d))
        self.subln = RMSNorm(2 * d, cfg.norm_eps, cfg.kernels)

    def lam(self) -> Tensor:
        """The scalar lambda (fp32)."""
        l1 = torch.exp((self.lambda_q1.float() * self.lambda_k1.float()).sum())
        l2 = torch.exp((self.lambda_q2.float() * self.lambda_k2.float()).sum())
        return l1 - l2 + self.lambda_init

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext) -> Tensor:
        """Per-pair outputs ``[B, T, H/2, 2D]`` (the caller flattens them like H heads of D)."""
        o = diff_attention(q, k, v, self.lam().to(q.dtype), self._softmax_attend(ctx))
        return self.subln(o) * (1.0 - self.lambda_init)

    def _softmax_attend(self, ctx: ForwardContext) -> Attend:
        if ctx.cu_seqlens is None:
            mask = None if ctx.all_visible else ctx.masks[self.window]
            return lambda q, k, v: self._sdpa(q, k, v, mask)

        def flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            # flash-attn wants equal head widths: the 2D-wide values in two halves
            va, vb = v.chunk(2, dim=-1)
            return torch.cat([self._flash(q, k, va, ctx), self._flash(q, k, vb, ctx)], dim=-1)

        return flash

    def flops_per_token(self, seq_len: int) -> float:
        """1.5 x standard attention: QK^T as usual, but both maps of a pair read 2D-wide values."""
        return 1.5 * super().flops_per_token(seq_len)

    def init_weights(self, init_std: float, out_std: float) -> None:
        super().init_weights(init_std, out_std)
        self.init_lambdas()

    def init_lambdas(self) -> None:
        """Lambda vectors ~ N(0, 0.1) (as the paper), the per-head norm's weight 1."""
        with torch.no_grad():
            for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
                nn.init.normal_(p, mean=0.0, std=LAMBDA_STD)
        self.subln.init_weights()


@register_mixer("diff_attn")
def _diff_full(cfg: ModelConfig, layer_idx: int) -> DiffAttention:
    return DiffAttention(cfg, None, layer_idx)


@register_mixer("diff_swa")
def _diff_sliding(cfg: ModelConfig, layer_idx: int) -> DiffAttention:
    return DiffAttention(cfg, cfg.attention.window, layer_idx)
