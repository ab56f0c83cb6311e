"""Gated Linear Attention mixer ('gla'), Yang et al. 2023 ("Gated Linear Attention Transformers
with Hardware-Efficient Training").

x -> q, k (expand_k * d), v (expand_v * d); a per-key-channel forget gate from a low-rank
projection, ``g = logsigmoid(W2 W1 x + b) / gate_normalizer`` (log alpha); the gated linear
recurrence of :mod:`kernels.gla` per head; a per-head RMSNorm of the output,
a swish output gate ``silu(W_g x)`` and the output projection. Parameter names follow fla's
``GatedLinearAttention`` (q_proj, k_proj, v_proj, g_proj, gk_proj.0/1, g_norm, o_proj).

Under context parallelism (``ctx.cp``) each row is a segment of a longer sequence: the chunked
kernel runs it from a zero state, ``ctx.cp.pass_states`` turns the segments' final states and
decays into each one's incoming state, and its part of the output is added in closed form
(:func:`kernels.gla.gla_initial_state_output`), not by a second pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.gla import chunk_gla, fused_recurrent_gla, gla_initial_state_output, gla_total_decay
from kernels.gla.chunk_torch import SUB_CHUNK
from pretrain.models.layers.norm import RMSNorm, at_least_fp32
from pretrain.models.registry import register_mixer

if TYPE_CHECKING:
    from pretrain.config import ModelConfig
    from pretrain.models.context import ForwardContext


@dataclass
class GLAState:
    h: Tensor
    """[B, H, head_k_dim, head_v_dim] fp32 recurrent state."""


class GatedLinearAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        g = cfg.gla
        d = cfg.d_model
        self.key_dim, self.value_dim = int(g.expand_k * d), int(g.expand_v * d)
        self.head_k_dim, self.head_v_dim = self.key_dim // g.n_heads, self.value_dim // g.n_heads
        self.gate_normalizer = g.gate_normalizer
        self.chunk_size = g.chunk_size
        self.kernels = cfg.kernels
        self.q_proj = nn.Linear(d, self.key_dim, bias=False)
        self.k_proj = nn.Linear(d, self.key_dim, bias=False)
        self.v_proj = nn.Linear(d, self.value_dim, bias=False)
        self.g_proj = nn.Linear(d, self.value_dim, bias=False)  # swish output gate
        self.gk_proj = nn.Sequential(  # low-rank forget gate
            nn.Linear(d, g.gate_low_rank, bias=False), nn.Linear(g.gate_low_rank, self.key_dim, bias=True)
        )
        self.g_norm = RMSNorm(self.head_v_dim, cfg.norm_eps, cfg.kernels)  # shared by the heads, as in fla
        self.o_proj = nn.Linear(self.value_dim, d, bias=False)

    def forward(self, x: Tensor, ctx: ForwardContext, state: GLAState | None = None) -> Tensor:
        o = self.recurrence(x, ctx, state)  # [B, T, H, V]
        o = self.g_norm(o).flatten(2) * F.silu(self.g_proj(x))  # [B, T, value_dim]
        return self.o_proj(o)

    def recurrence(self, x: Tensor, ctx: ForwardContext, state: GLAState | None = None) -> Tensor:
        """The raw gated-linear-attention output ``[B, T, H, head_v_dim]`` before the norm and
        the output gate (what a SambaY-GLA layer keeps as its memory); updates ``state``."""
        b, t, _ = x.shape
        # head counts come from the shapes so that tensor parallelism can shard the heads
        q = self.q_proj(x).view(b, t, -1, self.head_k_dim)  # [B, T, H, K]
        k = self.k_proj(x).view(b, t, -1, self.head_k_dim)  # [B, T, H, K]
        v = self.v_proj(x).view(b, t, -1, self.head_v_dim)  # [B, T, H, V]
        g_log = F.logsigmoid(at_least_fp32(self.gk_proj(x))) / self.gate_normalizer
        g_log = g_log.view(b, t, -1, self.head_k_dim)  # [B, T, H, K], log alpha <= 0
        h0 = None if state is None else state.h
        if state is not None and t == 1:
            o, h = fused_recurrent_gla(q, k, v, g_log, None, h0, True, reset=ctx.reset, backend=self.kernels)
        else:
            o, h = chunk_gla(
                q, k, v, g_log, None, h0, state is not None or ctx.cp is not None,
                reset=ctx.reset, chunk_size=self.chunk_size, backend=self.kernels,
            )
        if state is not None:
            state.h = h
        if ctx.cp is not None:
            # each segment ran from a zero state: pass the final states [B * slots, H, K, V] with
            # the segments' decays (one exchange) and add the incoming state's part in closed form
            s_in = ctx.cp.pass_states(gla_total_decay(g_log, ctx.reset)[..., None], h)
            o = (at_least_fp32(o) + gla_initial_state_output(q, g_log, s_in, None, ctx.reset)).to(o.dtype)
        return o

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token beyond 6 x the weights: per head, the intra-chunk scores and
        their product with the values (about chunk/2 keys each, plus the pairwise decays of a
        sub-chunk) and the state read and update (2 K x V), x2 per multiply-add, x3 fwd + bwd."""
        n_heads = self.key_dim // self.head_k_dim
        keys = min(self.chunk_size, seq_len) / 2
        per_head = keys * (self.head_k_dim + self.head_v_dim) + SUB_CHUNK * self.head_k_dim
        per_head += 2 * self.head_k_dim * self.head_v_dim
        return 6.0 * n_heads * per_head

    def activation_elements(self) -> int:
        """Rough elements per token kept for backward: projections, gates, the decayed q/k copies,
        scores of a chunk row, and one state per chunk (the pairwise decays of a sub-chunk are
        recomputed in the backward, not kept)."""
        d_model = self.q_proj.weight.shape[1]
        n_heads = self.key_dim // self.head_k_dim
        return (
            d_model
            + 6 * self.key_dim
            + 5 * self.value_dim
            + self.gk_proj[0].weight.shape[0]
            + n_heads * self.chunk_size
            + self.key_dim * self.head_v_dim // self.chunk_size
        )

    def new_state(self, batch_size: int) -> GLAState:
        w = self.q_proj.weight
        n_heads = w.shape[0] // self.head_k_dim  # local heads under tensor parallelism
        return GLAState(w.new_zeros(batch_size, n_heads, self.head_k_dim, self.head_v_dim, dtype=torch.float32))

    def init_weights(self, init_std: float, out_std: float) -> None:
        with torch.no_grad():
            for lin in (self.q_proj, self.k_proj, self.v_proj, self.g_proj, self.gk_proj[0], self.gk_proj[1]):
                nn.init.normal_(lin.weight, std=init_std)
            nn.init.zeros_(self.gk_proj[1].bias)  # alpha starts near sigmoid(0) ** (1 / normalizer)
            self.g_norm.init_weights()
            nn.init.normal_(self.o_proj.weight, std=out_std)


@register_mixer("gla")
def _gla(cfg: ModelConfig, layer_idx: int) -> GatedLinearAttention:
    return GatedLinearAttention(cfg)
