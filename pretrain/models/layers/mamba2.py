"""Mamba-2 mixer ('mamba2', Dao & Gu 2024): one fused in_proj -> [z, x, B, C, dt], a short causal
depthwise conv over [x, B, C], SSD with a scalar decay per head, gated RMSNorm, out_proj.

Parameter names and layout follow mamba_ssm's ``Mamba2`` (in_proj, conv1d, dt_bias, A_log, D,
norm, out_proj; in_proj's output ordered z, x, B, C, dt) so checkpoints map one to one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models.layers.conv import cached_causal_conv, init_short_conv_
from pretrain.models.layers.norm import at_least_fp32
from pretrain.models.layers.ssd_ops import ssd_chunked, ssd_step
from pretrain.models.layers.ssm_ops import sample_dt_bias
from pretrain.models.registry import register_mixer

if TYPE_CHECKING:
    from pretrain.config import ModelConfig
    from pretrain.models.context import ForwardContext

A_INIT_RANGE = (1.0, 16.0)  # mamba_ssm: A = -uniform(1, 16) per head


@dataclass
class Mamba2State:
    conv: Tensor
    """[B, conv_dim, d_conv - 1]: the last inputs of the conv over [x, B, C] (oldest first)."""
    ssm: Tensor
    """[B, H, P, N] fp32."""


class RMSNormGated(nn.Module):
    """mamba_ssm's RMSNormGated with norm_before_gate=False: rmsnorm(x * silu(z)) * weight, the
    mean of squares taken over groups of ``group_size`` channels (one per B/C group), in fp32."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        y = at_least_fp32(x) * F.silu(at_least_fp32(z))
        y = y.unflatten(-1, (-1, self.group_size))  # [..., groups, group_size]
        y = F.rms_norm(y, (self.group_size,), eps=self.eps).flatten(-2)
        return (y * at_least_fp32(self.weight)).to(x.dtype)

    def init_weights(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)


class Mamba2(nn.Module):
    no_weight_decay = ("A_log", "dt_bias", "D")  # as in mamba_ssm

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        m = cfg.mamba2
        self.d_inner = m.expand * cfg.d_model
        self.head_dim = m.head_dim
        self.n_heads = self.d_inner // m.head_dim
        self.n_groups = m.n_groups
        self.d_state = m.d_state
        self.d_conv = m.d_conv
        self.chunk_size = m.chunk_size
        self.conv_dim = self.d_inner + 2 * m.n_groups * m.d_state
        self.in_proj = nn.Linear(cfg.d_model, self.d_inner + self.conv_dim + self.n_heads, bias=False)
        # depthwise; only its parameters are used: forward applies the taps itself (masked_causal_conv)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, m.d_conv, groups=self.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = RMSNormGated(self.d_inner, self.d_inner // m.n_groups, cfg.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=False)

    def forward(self, x: Tensor, ctx: ForwardContext, state: Mamba2State | None = None) -> Tensor:
        y, z = self.mix(x, ctx, state)
        return self.out_proj(self.norm(y, z))

    def mix(self, x: Tensor, ctx: ForwardContext, state: Mamba2State | None = None) -> tuple[Tensor, Tensor]:
        """Everything before the gated norm: the SSD output with the D skip and the gate ``z``,
        both ``[B, T, d_inner]`` (a SambaY memory layer keeps the first). Updates ``state``."""
        if state is not None and x.shape[1] == 1:
            return self._step(x, ctx, state)
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xbc = F.silu(cached_causal_conv(xbc, state, self.conv1d.weight[:, 0, :], self.conv1d.bias, ctx.positions))
        xs, B, C = xbc.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        y, h = ssd_chunked(
            xs.unflatten(-1, (self.n_heads, self.head_dim)),  # [B, T, H, P]
            self._dt(dt),
            self._A(),
            B.unflatten(-1, (self.n_groups, self.d_state)),  # [B, T, G, N]
            C.unflatten(-1, (self.n_groups, self.d_state)),
            self.D,
            h0=None if state is None else state.ssm,
            reset=ctx.reset,
            chunk_size=self.chunk_size,
        )
        if state is not None:
            state.ssm = h
        return y.flatten(-2), z

    def _step(self, x: Tensor, ctx: ForwardContext, state: Mamba2State) -> tuple[Tensor, Tensor]:
        """O(1) decoding of one token ``x [B, 1, d_model]`` (:meth:`mix` of a single token)."""
        b = x.shape[0]
        z, xbc, dt = self.in_proj(x[:, 0]).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        window = torch.cat([state.conv, xbc.unsqueeze(-1)], dim=-1)  # [B, conv_dim, d_conv]
        state.conv = window[:, :, 1:]
        shift = torch.arange(self.d_conv - 1, -1, -1, device=x.device)  # tap j reads s = d_conv-1-j back
        keep = (ctx.positions[:, :1] >= shift).to(window.dtype).unsqueeze(1)  # [B, 1, d_conv]
        xbc = F.silu((window * keep * self.conv1d.weight[:, 0, :]).sum(-1) + self.conv1d.bias)
        xs, B, C = xbc.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        y, state.ssm = ssd_step(
            state.ssm,
            xs.view(b, self.n_heads, self.head_dim),
            self._dt(dt),
            self._A(),
            B.view(b, self.n_groups, self.d_state),
            C.view(b, self.n_groups, self.d_state),
            self.D,
            reset=None if ctx.reset is None else ctx.reset[:, 0],
        )
        return y.flatten(-2).unsqueeze(1), z.unsqueeze(1)  # [B, 1, d_inner] each

    def _dt(self, dt: Tensor) -> Tensor:
        return F.softplus(dt.float() + self.dt_bias.float())  # bias inside softplus, as mamba_ssm

    def _A(self) -> Tensor:
        return -torch.exp(self.A_log.float())  # [H], strictly negative: a stable decay

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token beyond 6 x the weights, counted per head as the chunked
        kernels do (chunk length Q): C.B scores and scores @ x (2Q(N+P)), the chunk state and
        its readout (4PN); x3 for forward + backward."""
        q = min(self.chunk_size, seq_len)
        p, n = self.head_dim, self.d_state
        return 3.0 * self.n_heads * (2 * q * (n + p) + 4 * p * n)

    def activation_elements(self) -> int:
        """Rough elements per token kept for backward: the projections, conv in/out, the chunk's
        decay and score rows per head, the gated norm, and one state per chunk."""
        d_model = self.in_proj.weight.shape[1]
        proj = self.in_proj.weight.shape[0]
        per_chunk_state = self.n_heads * self.head_dim * self.d_state // self.chunk_size
        decay_and_scores = 2 * self.n_heads * self.chunk_size
        return d_model + proj + 2 * self.conv_dim + decay_and_scores + 4 * self.d_inner + per_chunk_state

    def new_state(self, batch_size: int) -> Mamba2State:
        w = self.in_proj.weight
        conv = w.new_zeros(batch_size, self.conv_dim, self.d_conv - 1)
        ssm = w.new_zeros(batch_size, self.n_heads, self.head_dim, self.d_state, dtype=torch.float32)
        return Mamba2State(conv, ssm)

    def init_weights(self, init_std: float, out_std: float) -> None:
        with torch.no_grad():
            nn.init.normal_(self.in_proj.weight, std=init_std)
            init_short_conv_(self.conv1d)
            self.dt_bias.copy_(sample_dt_bias(self.n_heads, self.dt_bias.device))
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(*A_INIT_RANGE).log())
            self.D.fill_(1.0)
            self.norm.init_weights()
            nn.init.normal_(self.out_proj.weight, std=out_std)


@register_mixer("mamba2")
def _mamba2(cfg: ModelConfig, layer_idx: int) -> Mamba2:
    return Mamba2(cfg)
