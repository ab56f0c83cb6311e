"""Mamba-1 mixer ('mamba'): in_proj -> causal depthwise conv -> selective scan -> gate -> out_proj.

Parameter names follow mamba_ssm (conv1d, x_proj, dt_proj, A_log, D, out_proj) except that its
fused ``in_proj`` (rows ordered x, z) is two projections, ``in_proj_x`` and ``in_proj_z``: a
tensor-parallel rank needs its chunk of each half, which no single row split of the fused
weight gives. A mamba_ssm / Hugging Face checkpoint maps over by splitting in_proj's rows in two.

Under tensor parallelism (parallel/tensor/plans_ssm.py) each rank holds a contiguous chunk of the
inner channels; ``x_proj`` then reads only that chunk, so its output (dt, B, C) is a partial sum
over the ranks, which the layer passes through :attr:`Mamba.reduce_partial` (the identity in one
process, a sum over the ranks when the parallel code sets it).

Under context parallelism (``ctx.cp``) each row is a segment of a longer sequence: the conv reads
the ``d_conv - 1`` inputs before its segment (:func:`conv_halo`), the scan runs from a zero state,
and the incoming state (from ``ctx.cp.pass_states``) is added to y in closed form
(:func:`kernels.selective_scan.selective_scan_initial_state_output`). Mamba-2 does the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.dispatch import cpu_torch_path
from kernels.selective_scan import (
    selective_scan, selective_scan_initial_state_output, selective_scan_total_decay, selective_state_update,
)
from kernels.selective_scan.chunk_torch import SCAN_CHUNK
from kernels.short_conv import causal_conv1d, causal_conv1d_update, final_conv_state
from pretrain.models.layers.decode_weights import decode_constant, decode_linear, decoding
from pretrain.models.layers.norm import at_least_fp32
from pretrain.models.registry import register_mixer

if TYPE_CHECKING:
    from pretrain.config import ModelConfig
    from pretrain.models.context import ForwardContext
    from pretrain.models.sequence_split import SequenceSplit


def no_reduction(t: Tensor) -> Tensor:
    """The default ``reduce_partial`` of a layer: in one process a partial sum is the sum."""
    return t


@torch.no_grad()
def normal_segments_(std: float, *linears: nn.Linear) -> None:
    """N(0, std) weights drawn as ONE tensor and cut by rows into ``linears`` (in order), so a
    seeded init equals that of the fused projection they split (mamba_ssm's in_proj)."""
    w = [m.weight for m in linears]
    fused = torch.empty(sum(x.shape[0] for x in w), w[0].shape[1], dtype=w[0].dtype, device=w[0].device)
    fused.normal_(std=std)
    for x, part in zip(w, fused.split([x.shape[0] for x in w])):
        x.copy_(part)


@torch.no_grad()
def init_short_conv_(conv: nn.Conv1d) -> None:
    """nn.Conv1d's default uniform init (fan_in = kernel width for a depthwise conv), as mamba_ssm."""
    bound = 1 / math.sqrt(conv.kernel_size[0])
    nn.init.uniform_(conv.weight, -bound, bound)
    nn.init.uniform_(conv.bias, -bound, bound)


@torch.no_grad()
def short_conv_segments_(convs: Sequence[nn.Conv1d]) -> None:
    """mamba_ssm's init of one fused depthwise conv (nn.Conv1d's default: uniform with bound
    1/sqrt(kernel width), all weights then all biases) cut by channels into ``convs``."""
    bound = 1 / math.sqrt(convs[0].kernel_size[0])
    for name in ("weight", "bias"):
        parts = [getattr(c, name) for c in convs]
        fused = torch.cat([p.detach() for p in parts]).uniform_(-bound, bound)
        for p, part in zip(parts, fused.split([p.shape[0] for p in parts])):
            p.copy_(part)


def conv_halo(x: Tensor, cp: SequenceSplit, width: int) -> Tensor | None:
    """Context parallelism: the ``width - 1`` inputs of a causal conv before each local segment,
    as its ``initial_state [B * slots, C, width - 1]`` (zeros before the sequence), from
    ``x [B * slots, s, C]``; exchanges those last tokens of each segment, never the sequence.
    The conv's position mask keeps a document that starts inside the halo (or at the
    segment's first token) from reading it, exactly as it does inside a segment."""
    if width < 2:
        return None
    return cp.tails(x, width - 1).transpose(1, 2)


DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4  # mamba_ssm's initial step-size range


def sample_dt_bias(n: int, device: torch.device) -> Tensor:
    """Initial bias of the step size of n channels (Mamba) or heads (Mamba-2): dt is drawn
    log-uniform in [DT_MIN, DT_MAX] and the bias is its inverse softplus, so softplus(bias)
    starts at dt."""
    u = torch.rand(n, device=device)
    dt = torch.exp(u * (math.log(DT_MAX) - math.log(DT_MIN)) + math.log(DT_MIN)).clamp(min=DT_FLOOR)
    return dt + torch.log(-torch.expm1(-dt))


def _neg_exp(a_log: Tensor) -> Tensor:
    """``A = -exp(A_log)`` in at least fp32: strictly negative, a stable decay."""
    return -torch.exp(at_least_fp32(a_log))


@dataclass
class MambaState:
    conv: Tensor
    """[B, d_inner, d_conv - 1]: the last conv inputs (oldest first)."""
    ssm: Tensor
    """[B, d_inner, d_state] fp32."""


class Mamba(nn.Module):
    no_weight_decay = ("A_log",)  # as in mamba_ssm: decaying A_log would shorten every memory
    reduce_partial: Callable[[Tensor], Tensor] = staticmethod(no_reduction)
    """``x_proj``'s output ``[..., dt_rank + 2 d_state]`` -> its sum over the tensor-parallel
    ranks (each rank's product covers only its inner channels); the identity unless the
    parallel code sets it (the protocol: parallel/tensor/plan.py, ``RegionPlan.partial_sums``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        m = cfg.mamba
        self.d_inner = m.expand * cfg.d_model
        self.d_state = m.d_state
        self.d_conv = m.d_conv
        self.dt_rank = m.dt_rank or math.ceil(cfg.d_model / 16)
        self.kernels = cfg.kernels
        self.in_proj_x = nn.Linear(cfg.d_model, self.d_inner, bias=False)
        self.in_proj_z = nn.Linear(cfg.d_model, self.d_inner, bias=False)
        # depthwise; only its parameters are used: forward runs them through kernels.short_conv
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, m.d_conv, groups=self.d_inner, bias=True)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * m.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, m.d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, cfg.d_model, bias=False)

    def forward(self, x: Tensor, ctx: ForwardContext, state: MambaState | None = None) -> Tensor:
        y, _ = self.scan(x, ctx, state, gate=True)
        return decode_linear(y, self, "out_proj", self.out_proj) if decoding(y) else self.out_proj(y)

    def scan(
        self, x: Tensor, ctx: ForwardContext, state: MambaState | None = None, gate: bool = False
    ) -> tuple[Tensor, Tensor]:
        """The scan output y (with the D skip) and the output gate's input z, both
        ``[B, T, d_inner]``: the mixer's output is out_proj(y * silu(z)); SambaY's memory layer
        also exports y. With ``gate`` the returned y is already ``y * silu(z)``, fused into the
        scan kernel (no ungated y is written)."""
        if state is not None and x.shape[1] == 1:
            return self.step(x, ctx, state, gate)
        xi, z = self.in_proj_x(x), self.in_proj_z(x)  # [B, T, d_inner] each
        conv0 = None if state is None else state.conv
        if ctx.cp is not None:
            conv0 = conv_halo(xi, ctx.cp, self.d_conv)
        xc = causal_conv1d(
            xi, self.conv1d.weight[:, 0, :], self.conv1d.bias, positions=ctx.positions, initial_state=conv0,
            activation="silu", backend=self.kernels,
        )
        if state is not None:
            state.conv = final_conv_state(xi, conv0, self.d_conv)
        dt, B, C = self._ssm_params(xc)
        h0 = None if state is None else state.ssm
        A = self._A()
        y, h = selective_scan(
            xc, dt, A, B, C, self.D, h0, z=z if gate else None, reset=ctx.reset, backend=self.kernels
        )
        if state is not None:
            state.ssm = h
        if ctx.cp is not None:
            y = self._add_incoming_state(y, h, dt, A, C, z if gate else None, ctx)
        return y, z

    def _add_incoming_state(
        self, y: Tensor, h: Tensor, dt: Tensor, A: Tensor, C: Tensor, z: Tensor | None, ctx: ForwardContext
    ) -> Tensor:
        """Context parallelism: each segment was scanned from a zero state; pass the final states
        ``h [B * slots, d_inner, N]`` with the segments' decays along the sequence (one exchange
        of two such tensors) and add the incoming state's part of y in closed form, gated
        by silu(z) when ``z`` is given (the scan fused the gate)."""
        h_in = ctx.cp.pass_states(selective_scan_total_decay(dt, A, ctx.reset), h)
        extra = selective_scan_initial_state_output(dt, A, C, h_in, ctx.reset)  # [B, T, d_inner]
        if z is not None:
            extra = extra * F.silu(at_least_fp32(z))
        return (at_least_fp32(y) + extra).to(y.dtype)

    def _ssm_params(self, xc: Tensor, fast: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """dt, B, C of ``xc``; ``fast``: a decoding step's product (decode_linear)."""
        dbc = self.reduce_partial(decode_linear(xc, self, "x_proj", self.x_proj) if fast else self.x_proj(xc))
        dt, B, C = dbc.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.softplus(self.dt_proj(dt)), B, C  # dt bias inside softplus, as in Mamba

    def _A(self) -> Tensor:
        return _neg_exp(self.A_log)

    def step(self, x: Tensor, ctx: ForwardContext, state: MambaState, gate: bool = False) -> tuple[Tensor, Tensor]:
        """O(1) decoding of one token ``x [B, 1, d_model]`` -> y, z ``[B, 1, d_inner]`` as in
        :meth:`scan`; updates ``state`` in place."""
        fast = decoding(x)  # one product for x and z (pretrain.models.layers.decode_weights)
        if fast and ctx.continuing and ctx.offset >= self.d_conv - 1 and self._plain_cpu_step(x, state):
            return self._step_cpu(x, state, gate)
        if fast:
            xi, z = decode_linear(x[:, 0], self, "in_proj", self.in_proj_x, self.in_proj_z).chunk(2, dim=-1)
        else:
            xi, z = self.in_proj_x(x[:, 0]), self.in_proj_z(x[:, 0])  # [B, d_inner] each
        # without document starts every tap of a token past the first d_conv - 1 is inside its
        # sequence: no position mask to build (the host knows it from the offset)
        whole = ctx.reset is None and ctx.offset >= self.d_conv - 1
        positions = None if whole else ctx.positions[:, 0]
        xc, state.conv = causal_conv1d_update(
            xi, state.conv, self.conv1d.weight[:, 0, :], self.conv1d.bias, positions=positions,
            activation="silu", backend=self.kernels,
        )
        dt, B, C = self._ssm_params(xc, fast)
        reset = None if ctx.reset is None else ctx.reset[:, 0]
        y, state.ssm = selective_state_update(
            state.ssm, xc, dt, self._A(), B, C, self.D, z=z if gate else None, reset=reset, backend=self.kernels
        )
        return y.unsqueeze(1), z.unsqueeze(1)  # [B, 1, d_inner] each

    def _plain_cpu_step(self, x: Tensor, state: MambaState) -> bool:
        """A decoding step :meth:`_step_cpu` takes: fp32 on the CPU (the kernels' PyTorch path)."""
        return (
            x.dtype == state.conv.dtype == state.ssm.dtype == torch.float32 and cpu_torch_path(self.kernels, x)
        )

    def _step_cpu(self, x: Tensor, state: MambaState, gate: bool) -> tuple[Tensor, Tensor]:
        """:meth:`step` for one token ``x [B, 1, d_model]`` of a sequence past its first ``d_conv
        - 1`` tokens, fp32 on the CPU, in about twenty operators instead of a hundred (at one token
        the operators' fixed cost, not the bytes, is the time): the conv window as one product
        with the taps, the state update as one ``addcmul`` (h <- exp(dt A) h + dt x B^T), the
        readout as one batched product. The same arithmetic as
        :func:`kernels.short_conv.causal_conv1d_update` and
        :func:`kernels.selective_scan.selective_state_update` (which the general path calls, and
        tests compare with); the state tensors are replaced, not written in place."""
        xi, z = decode_linear(x[:, 0], self, "in_proj", self.in_proj_x, self.in_proj_z).chunk(2, dim=-1)  # [B, C]
        window = torch.cat([state.conv, xi.unsqueeze(-1)], dim=-1)  # [B, C, W], oldest tap first
        state.conv = window[..., 1:]
        xc = F.silu((window * self.conv1d.weight[:, 0]).sum(-1) + self.conv1d.bias)  # [B, C]
        dbc = self.reduce_partial(decode_linear(xc, self, "x_proj", self.x_proj))
        dt, B, C = dbc.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(F.linear(dt, self.dt_proj.weight, self.dt_proj.bias))  # [B, C]
        A = decode_constant(self, "A", _neg_exp, self.A_log)  # [C, N]
        h = torch.addcmul(state.ssm * torch.exp(dt.unsqueeze(-1) * A), (dt * xc).unsqueeze(-1), B.unsqueeze(1))
        state.ssm = h  # [B, C, N]
        y = torch.addcmul(torch.bmm(h, C.unsqueeze(-1)).squeeze(-1), self.D, xc)  # [B, C]
        if gate:
            y = y * F.silu(z)
        return y.unsqueeze(1), z.unsqueeze(1)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token beyond 6 x the weights: the scan's ~7 elementwise operations
        per state entry (decay, exp, input, update, readout), x3 for forward + backward."""
        return 21.0 * self.d_inner * self.d_state

    def activation_elements(self) -> int:
        """Rough elements per token kept for backward; the scan keeps one state per chunk."""
        d_model = self.in_proj_x.weight.shape[1]
        return d_model + 9 * self.d_inner + self.dt_rank + 2 * self.d_state + self.d_inner * self.d_state // SCAN_CHUNK

    def new_state(self, batch_size: int) -> MambaState:
        w = self.in_proj_x.weight  # its rows: the inner channels (this rank's, under tensor parallelism)
        conv = w.new_zeros(batch_size, w.shape[0], self.d_conv - 1)
        return MambaState(conv, w.new_zeros(batch_size, w.shape[0], self.d_state, dtype=torch.float32))

    def init_weights(self, init_std: float, out_std: float) -> None:
        with torch.no_grad():
            normal_segments_(init_std, self.in_proj_x, self.in_proj_z)
            init_short_conv_(self.conv1d)
            nn.init.normal_(self.x_proj.weight, std=init_std)
            r = self.dt_rank**-0.5  # mamba_ssm's dt_init="random", dt_scale=1
            nn.init.uniform_(self.dt_proj.weight, -r, r)
            self.dt_proj.bias.copy_(sample_dt_bias(self.d_inner, self.dt_proj.bias.device))
            # S4D-real: A = -(1..N) for every channel
            n = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
            self.A_log.copy_(torch.log(n).expand(self.d_inner, -1))
            self.D.fill_(1.0)
            nn.init.normal_(self.out_proj.weight, std=out_std)


@register_mixer("mamba")
def _mamba(cfg: ModelConfig, layer_idx: int) -> Mamba:
    return Mamba(cfg)
