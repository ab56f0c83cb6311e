"""Mamba-2 mixer ('mamba2', Dao & Gu 2024): input projections to z, x, B, C, dt, a short causal
depthwise conv over [x, B, C], SSD with a scalar decay per head, gated RMSNorm, out_proj.

Parameter names follow mamba_ssm's ``Mamba2`` (dt_bias, A_log, D, norm, out_proj) except that
its fused ``in_proj`` (rows z, x, B, C, dt) is five projections ``in_proj_{z,x,B,C,dt}`` and its
conv over [x, B, C] three, ``conv1d_{x,B,C}``: under tensor parallelism (parallel/tensor/
plans_ssm.py) z, x and dt split by heads while B and C split by groups, or stay whole when there
are fewer groups than ranks, which no single row split of a fused weight gives (Megatron-LM
#1989). A mamba_ssm checkpoint maps over by cutting those two weights by rows in that order. The
forward infers heads and groups from the weights' shapes, so it runs unchanged on a rank's shards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.rmsnorm import gated_rms_norm
from kernels.short_conv import causal_conv1d, causal_conv1d_update, final_conv_state
from kernels.ssd import ssd_chunked, ssd_initial_state_output, ssd_step, ssd_total_decay
from pretrain.models.layers.mamba import (
    conv_halo, no_reduction, normal_segments_, sample_dt_bias, short_conv_segments_,
)
from pretrain.models.layers.norm import at_least_fp32
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
    mean of squares taken over groups of ``group_size`` channels (one per B/C group), in fp32 or
    wider.

    The input may hold only part of one group (a tensor-parallel rank's channels when there are
    fewer groups than ranks): its sum of squares then goes through :attr:`reduce_partial`, which
    the parallel code sets to a sum over the ranks sharing the group."""

    reduce_partial: Callable[[Tensor], Tensor] = staticmethod(no_reduction)
    """Sum of squares ``[..., 1]`` of this input's part of its group -> that of the whole group
    (called only when the input is narrower than a group; protocol: parallel/tensor/plan.py)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5, kernels: str = "torch") -> None:
        super().__init__()
        self.group_size = group_size
        self.eps = eps
        self.kernels = kernels  # model.kernels, for kernels.rmsnorm.gated_rms_norm
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        if x.shape[-1] >= self.group_size:  # whole groups
            return gated_rms_norm(x, z, self.weight, self.eps, group_size=self.group_size, backend=self.kernels)
        # a piece of one group: the mean of squares needs the other pieces' sums
        y = at_least_fp32(x) * F.silu(at_least_fp32(z))
        sum_sq = self.reduce_partial(y.square().sum(-1, keepdim=True))
        y = y * torch.rsqrt(sum_sq / self.group_size + self.eps)
        return (y * at_least_fp32(self.weight)).to(x.dtype)

    def init_weights(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)


class Mamba2(nn.Module):
    """Mamba-2 mixer; heads ``d_inner / head_dim`` in ``n_groups`` groups sharing B and C."""

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
        self.kernels = cfg.kernels
        self.conv_dim = self.d_inner + 2 * m.n_groups * m.d_state
        gn = m.n_groups * m.d_state
        self.in_proj_z = nn.Linear(cfg.d_model, self.d_inner, bias=False)
        self.in_proj_x = nn.Linear(cfg.d_model, self.d_inner, bias=False)
        self.in_proj_B = nn.Linear(cfg.d_model, gn, bias=False)
        self.in_proj_C = nn.Linear(cfg.d_model, gn, bias=False)
        self.in_proj_dt = nn.Linear(cfg.d_model, self.n_heads, bias=False)
        # depthwise; only their parameters are used: forward applies the taps of all three at once
        self.conv1d_x = nn.Conv1d(self.d_inner, self.d_inner, m.d_conv, groups=self.d_inner, bias=True)
        self.conv1d_B = nn.Conv1d(gn, gn, m.d_conv, groups=gn, bias=True)
        self.conv1d_C = nn.Conv1d(gn, gn, m.d_conv, groups=gn, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = RMSNormGated(self.d_inner, self.d_inner // m.n_groups, cfg.norm_eps, cfg.kernels)
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=False)

    def forward(self, x: Tensor, ctx: ForwardContext, state: Mamba2State | None = None) -> Tensor:
        y, z = self.mix(x, ctx, state)
        return self.out_proj(self.norm(y, z))

    def mix(self, x: Tensor, ctx: ForwardContext, state: Mamba2State | None = None) -> tuple[Tensor, Tensor]:
        """Everything before the gated norm: the SSD output with the D skip and the gate ``z``,
        both ``[B, T, d_inner]`` (a SambaY memory layer keeps the first). Updates ``state``."""
        if state is not None and x.shape[1] == 1:
            return self._step(x, ctx, state)
        z, xbc, dt = self.in_proj_z(x), self._in_xbc(x), self.in_proj_dt(x)
        weight, bias = self._conv()
        conv0 = None if state is None else state.conv
        if state is not None:
            state.conv = final_conv_state(xbc, conv0, self.d_conv)
        if ctx.cp is not None:
            conv0 = conv_halo(xbc, ctx.cp, self.d_conv)
        xbc = causal_conv1d(
            xbc, weight, bias, positions=ctx.positions, initial_state=conv0, activation="silu", backend=self.kernels
        )
        xs, B, C = xbc.split(self._xbc_widths(), dim=-1)
        dt, A, C = self._dt(dt), self._A(), C.unflatten(-1, (-1, self.d_state))  # C [B, T, G, N]
        y, h = ssd_chunked(
            xs.unflatten(-1, (-1, self.head_dim)),  # [B, T, H, P]
            dt,
            A,
            B.unflatten(-1, (-1, self.d_state)),  # [B, T, G, N]
            C,
            self.D,
            None if state is None else state.ssm,
            reset=ctx.reset,
            chunk_size=self.chunk_size,
            backend=self.kernels,
        )
        if state is not None:
            state.ssm = h
        if ctx.cp is not None:
            # each segment ran from a zero state: pass the final states [B * slots, H, P, N] with
            # the segments' decays (one exchange) and add the incoming state's part in closed form
            h_in = ctx.cp.pass_states(ssd_total_decay(dt, A, ctx.reset)[..., None, None], h)
            y = (at_least_fp32(y) + ssd_initial_state_output(dt, A, C, h_in, ctx.reset)).to(y.dtype)
        return y.flatten(-2), z

    def _step(self, x: Tensor, ctx: ForwardContext, state: Mamba2State) -> tuple[Tensor, Tensor]:
        """O(1) decoding of one token ``x [B, 1, d_model]`` (:meth:`mix` of a single token)."""
        b, x1 = x.shape[0], x[:, 0]
        z, xbc, dt = self.in_proj_z(x1), self._in_xbc(x1), self.in_proj_dt(x1)
        weight, bias = self._conv()
        xbc, state.conv = causal_conv1d_update(
            xbc, state.conv, weight, bias, positions=ctx.positions[:, 0], activation="silu", backend=self.kernels
        )
        xs, B, C = xbc.split(self._xbc_widths(), dim=-1)
        y, state.ssm = ssd_step(
            state.ssm,
            xs.view(b, -1, self.head_dim),
            self._dt(dt),
            self._A(),
            B.view(b, -1, self.d_state),
            C.view(b, -1, self.d_state),
            self.D,
            reset=None if ctx.reset is None else ctx.reset[:, 0],
            backend=self.kernels,
        )
        return y.flatten(-2).unsqueeze(1), z.unsqueeze(1)  # [B, 1, d_inner] each

    def _in_xbc(self, x: Tensor) -> Tensor:
        """The conv's input ``[..., x | B | C]``: one tensor, so one conv pass covers all three."""
        return torch.cat([self.in_proj_x(x), self.in_proj_B(x), self.in_proj_C(x)], dim=-1)

    def _xbc_widths(self) -> list[int]:
        """Widths of x, B and C (this rank's, under tensor parallelism)."""
        return [self.in_proj_x.weight.shape[0], self.in_proj_B.weight.shape[0], self.in_proj_C.weight.shape[0]]

    def _conv(self) -> tuple[Tensor, Tensor]:
        """The depthwise taps ``[conv_dim, d_conv]`` and bias ``[conv_dim]`` over [x, B, C]."""
        convs = (self.conv1d_x, self.conv1d_B, self.conv1d_C)
        return torch.cat([c.weight[:, 0, :] for c in convs]), torch.cat([c.bias for c in convs])

    def _dt(self, dt: Tensor) -> Tensor:
        return F.softplus(at_least_fp32(dt) + at_least_fp32(self.dt_bias))  # bias inside softplus, as mamba_ssm

    def _A(self) -> Tensor:
        return -torch.exp(at_least_fp32(self.A_log))  # [H], strictly negative: a stable decay

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
        d_model = self.in_proj_z.weight.shape[1]
        proj = self.d_inner + self.conv_dim + self.n_heads  # z, x, B, C, dt
        per_chunk_state = self.n_heads * self.head_dim * self.d_state // self.chunk_size
        decay_and_scores = 2 * self.n_heads * self.chunk_size
        return d_model + proj + 2 * self.conv_dim + decay_and_scores + 4 * self.d_inner + per_chunk_state

    def new_state(self, batch_size: int) -> Mamba2State:
        w = self.in_proj_z.weight
        conv = w.new_zeros(batch_size, sum(self._xbc_widths()), self.d_conv - 1)
        heads = self.in_proj_dt.weight.shape[0]  # this rank's, under tensor parallelism
        ssm = w.new_zeros(batch_size, heads, self.head_dim, self.d_state, dtype=torch.float32)
        return Mamba2State(conv, ssm)

    def init_weights(self, init_std: float, out_std: float) -> None:
        with torch.no_grad():
            normal_segments_(init_std, self.in_proj_z, self.in_proj_x, self.in_proj_B, self.in_proj_C, self.in_proj_dt)
            short_conv_segments_((self.conv1d_x, self.conv1d_B, self.conv1d_C))
            self.dt_bias.copy_(sample_dt_bias(self.n_heads, self.dt_bias.device))
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(*A_INIT_RANGE).log())
            self.D.fill_(1.0)
            self.norm.init_weights()
            nn.init.normal_(self.out_proj.weight, std=out_std)


@register_mixer("mamba2")
def _mamba2(cfg: ModelConfig, layer_idx: int) -> Mamba2:
    return Mamba2(cfg)
