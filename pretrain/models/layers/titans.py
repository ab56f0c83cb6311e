"""Titans (Behrouz et al. 2024): attention with a neural long-term memory, three ways.

* 'mac' (memory as context): per segment of ``segment_size`` tokens, in order: each token reads
  the memory as it was at the segment start (``h = M*(q)``, q from x), causal attention inside the
  segment runs over ``[persistent || memory reads || segment tokens]`` giving y, then the memory
  is trained on y (keys, values and, with ``mac_output='per_token'``, the write gates from the
  attention output, as the paper's ``M_t = M_{t-1}(y_t)``) with one mini-batch step per segment
  (the memory's chunk is the segment). Output (``titans.mac_output``): 'per_token' is the
  paper's ``o_t = y_t (x) M*_t(y_t)``: the same retrieval M* (W_Q, its conv taps with a tail of
  its own, the output projection) applied to y reads token t's own weights, after t's write
  (:func:`kernels.titans.memory_scan` with ``read='per_token'``; M_t depends on tokens <= t only, so
  this is causal); 'none' returns y ungated, with the write gates from x (the layer as it was
  before the option).
* 'mag' (memory as gate): sliding-window attention over ``[persistent || x]`` gated by the memory
  branch; the memory trains in ``chunk_size`` steps.
* 'mal' (memory as layer): the memory branch, then sliding-window attention over
  ``[persistent || memory(x)]``.

The gate (x) is the paper's "normalisation with learnable weights, then a non-linearity":
``sigmoid(RMSNorm(memory))`` multiplies the attention output. MAG takes it in the attention's
head space before W_o, ``W_o(RMSNorm(attn) * sigmoid(RMSNorm(memory)))``; MAC after W_o,
``y * sigmoid(RMSNorm(M*_t(y)))``, because y must exist, projected, before the write that the
gating read depends on, and W_o already sets y's scale (a second projection would add d_model^2
weights per layer).

The memory branch: q, k, v projections -> short causal depthwise conv -> SiLU, q and k
L2-normalised; per token and head the learning rate theta (sigmoid scaled to ``max_lr``), momentum
eta and forgetting alpha (sigmoids of linear projections of the branch input); the scan is
:func:`kernels.titans.memory_scan`; the reads go through a per-head RMSNorm and an output projection.

Context parallelism (``ctx.cp``): the memory state is relayed segment to segment, so the memory
scan (MAC: the whole layer) gets no parallel speed-up; :mod:`pretrain.models.layers.titans_cp`
says how and what it costs.

Departures from the paper, and why:

* Persistent tokens only enter attention (as keys and values every query sees); in MAG and MAL
  the paper also runs the memory over them, ``M([p || x])``. After a document start (where the
  memory restarts) they are the same tokens every time, so the memory state they would leave is a
  learned constant that the learned initial weights ``init`` already parametrise (up to a
  non-zero start momentum and conv history); feeding them would cost ``n_persistent`` memory
  tokens per document and shift every chunk boundary by ``n_persistent``.
* The memory branch has no extra linear output gate (the paper's "gating with a linear layer
  before the final output projection", after Mehta et al. 2023): where its result meets the
  layer output (MAG, MAC 'per_token') it already is the sigmoid gate above, and elsewhere (MAL,
  MAC's context reads) attention's own projections consume it; a second gate on the same path
  would add d_model x H*D weights per layer for a variant the paper does not ablate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.short_conv import causal_conv1d, final_conv_state
from kernels.titans import MemoryState, memory_read, memory_scan
from pretrain.models.context import attention_mask
from pretrain.models.layers.attention import KVState, mean_visible_keys
from pretrain.models.layers.mamba import no_reduction
from pretrain.models.layers.norm import RMSNorm, at_least_fp32
from pretrain.models.layers.rope import apply_rope, rope_tables
from pretrain.models.layers.titans_cp import cp_window_kv, relay_mac, relay_memory_scan
from pretrain.models.registry import register_mixer

if TYPE_CHECKING:
    from pretrain.config import ModelConfig
    from pretrain.models.context import ForwardContext


@dataclass
class TitansState:
    conv: Tensor
    """[B, conv_size - 1, 3 * H * D]: the last inputs of the memory's q/k/v conv (oldest first;
    the H * D channels of q, then of k, then of v)."""
    memory: MemoryState
    kv: KVState
    """Attention keys/values of the last window-1 (MAC: segment-1) tokens."""
    mem_kv: KVState | None = None
    """MAC: keys/values of the memory reads of the current segment."""
    read_conv: Tensor | None = None
    """MAC 'per_token': [B, conv_size - 1, H * D], the last inputs of the output read's query conv."""


class WidthRMSNorm(RMSNorm):
    """RMSNorm over a whole width ``dim`` whose input may be one tensor-parallel rank's
    contiguous part of it (with the matching part of ``weight``): the part's sum of squares then
    goes through :attr:`reduce_partial`, which the parallel code sets to a sum over the ranks
    (protocol: parallel/tensor/plan.py). The whole width is normalised as :class:`RMSNorm` does."""

    reduce_partial = staticmethod(no_reduction)
    """Sum of squares ``[..., 1]`` of this rank's channels -> that of all ``dim`` channels."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__(dim, eps)
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] == self.dim:
            return super().forward(x)
        xf = at_least_fp32(x)
        sum_sq = self.reduce_partial(xf.square().sum(-1, keepdim=True))
        return (xf * torch.rsqrt(sum_sq / self.dim + self.eps) * self.weight.to(xf.dtype)).to(x.dtype)


def _normal_as_one_(weights: list[Tensor], std: float) -> None:
    """Fill ``weights`` (same trailing shape) from one normal draw of their concatenation: the
    random numbers of the fused projection they replace, so a seed still gives the same model."""
    for w, x in zip(weights, torch.cat(weights).normal_(std=std).split([w.shape[0] for w in weights])):
        w.copy_(x)


class NeuralMemory(nn.Module):
    """The long-term memory branch: ``x [B, T, d_model] -> [B, T, d_out]`` (reads), trained on x.

    Everything up to the output projection is per memory head, and the head count is read from
    the weights' shapes, so a tensor-parallel rank runs the branch on a contiguous chunk of the
    heads (its rows of q/k/v_proj, theta/eta/alpha_proj, conv_weight/conv_bias along dim 1 and
    ``init``) with ``out`` row-parallel: the q, k, v projections and the three gates are separate
    weights, not one fused projection whose shards would mix segments. The projected reads
    pass through :attr:`reduce_partial` (identity here; a sum over the ranks when ``out`` is
    row-parallel, protocol in parallel/tensor/plan.py), so every caller gets the whole sum; MAG,
    which needs only its ranks' columns, leaves it the identity and reduce-scatters the partial.
    """

    reduce_partial = staticmethod(no_reduction)
    """Partial projected reads ``[B, T, d_out]`` (this rank's heads) -> their sum over ranks."""

    def __init__(self, cfg: ModelConfig, chunk_size: int, d_out: int) -> None:
        super().__init__()
        c = cfg.titans
        self.n_heads, self.head_dim = c.n_heads, cfg.d_model // c.n_heads
        self.chunk_size, self.max_lr = chunk_size, c.max_lr
        inner = self.n_heads * self.head_dim
        self.kernels = cfg.kernels
        self.q_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, inner, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(3, inner, c.conv_size))  # depthwise taps of q, k, v
        self.conv_bias = nn.Parameter(torch.empty(3, inner))
        # per-head logits of the learning rate theta, momentum eta and forgetting alpha
        self.theta_proj = nn.Linear(cfg.d_model, self.n_heads, bias=True)
        self.eta_proj = nn.Linear(cfg.d_model, self.n_heads, bias=True)
        self.alpha_proj = nn.Linear(cfg.d_model, self.n_heads, bias=True)
        dims = [self.head_dim] + [c.memory_expand * self.head_dim] * (c.memory_depth - 1) + [self.head_dim]
        self.init = nn.ParameterList(nn.Parameter(torch.empty(self.n_heads, i, o)) for i, o in zip(dims, dims[1:]))
        self.norm = RMSNorm(self.head_dim, cfg.norm_eps, cfg.kernels)
        self.out = nn.Linear(inner, d_out, bias=False)

    def forward(self, x: Tensor, ctx: ForwardContext, state: TitansState | None) -> Tensor:
        """Read (at chunk starts) and train the memory on x; returns the projected reads."""
        b, t, _ = x.shape
        qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)  # [B, T, 3 * H * D]
        if ctx.cp is not None:  # the conv's history is the previous segment's last inputs (a halo)
            tail = ctx.cp.tails(qkv, self.conv_weight.shape[-1] - 1)
        else:
            tail = None if state is None else state.conv
        zc, tail = self.conv(qkv, slice(None), tail, ctx.positions)
        if state is not None:
            state.conv = tail
        q, k, v = zc.view(b, t, 3, -1, self.head_dim).unbind(2)  # [B, T, H, D] each
        if ctx.cp is not None:
            return self.project_out(relay_memory_scan(self, x, q, k, v, ctx), x.dtype)
        mem = MemoryState.fresh(list(self.init), b) if state is None else state.memory
        y, mem = self.scan(x, q, k, v, mem, ctx.positions, ctx.reset)
        if state is not None:
            state.memory = mem
        return self.project_out(y, x.dtype)

    def conv(self, z: Tensor, part: slice, tail: Tensor | None, positions: Tensor) -> tuple[Tensor, Tensor]:
        """SiLU(short conv) of the channels ``part`` of the q/k/v projections ``z [B, T, C]``
        (channels: q, then k, then v, H * D each); ``tail``: the previous inputs of all 3HD
        channels (None: zeros) -> (output, new tail)."""
        w, bias = self.conv_weight.flatten(0, 1), self.conv_bias.flatten()  # [3HD, K], [3HD]
        conv0 = None if tail is None else tail[..., part].transpose(1, 2)  # [B, C, K-1]
        new_tail = z.new_zeros(z.shape[0], w.shape[1] - 1, w.shape[0]) if tail is None else tail.clone()
        new_tail[..., part] = final_conv_state(z, conv0, w.shape[1]).transpose(1, 2)
        y = causal_conv1d(
            z, w[part], bias[part], positions=positions, initial_state=conv0, activation="silu", backend=self.kernels
        )
        return y, new_tail

    def scan(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mem: MemoryState, positions: Tensor,
             reset: Tensor | None, read: str = "chunk_start") -> tuple[Tensor, MemoryState]:
        """:func:`memory_scan` with L2-normalised q, k and the write gates of ``x [B, T, d_model]``."""
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        gates = (self.theta_proj, self.eta_proj, self.alpha_proj)
        theta, eta, alpha = (torch.sigmoid(at_least_fp32(p(x))) for p in gates)  # [B, T, H] each
        return memory_scan(
            q, k, v, self.max_lr * theta, eta, alpha, mem, list(self.init), positions, self.chunk_size, reset, read,
            backend=self.kernels,
        )

    def project_out(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """``y [B, T, H, D]`` memory reads -> per-head RMSNorm -> output projection (summed over
        the heads of every rank by :attr:`reduce_partial`)."""
        return self.reduce_partial(self.out(self.norm(y.to(dtype)).flatten(2)))

    def new_state(self, batch_size: int) -> tuple[Tensor, MemoryState]:
        w = self.conv_weight  # [3, H * D, K]: local heads under tensor parallelism
        conv = w.new_zeros(batch_size, w.shape[2] - 1, w.shape[0] * w.shape[1])
        return conv, MemoryState.fresh(list(self.init), batch_size)

    def flops_per_token(self) -> float:
        """Read + gradient (forward and backward through the MLP) + update: ~4 passes over the
        memory weights at 2 FLOPs per weight, x3 for the outer forward + backward."""
        return 24.0 * sum(p.numel() for p in self.init)

    def init_weights(self, init_std: float, out_std: float) -> None:
        with torch.no_grad():
            _normal_as_one_([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight], init_std)
            bound = 1 / math.sqrt(self.conv_weight.shape[-1])
            nn.init.uniform_(self.conv_weight, -bound, bound)
            nn.init.uniform_(self.conv_bias, -bound, bound)
            _normal_as_one_([self.theta_proj.weight, self.eta_proj.weight, self.alpha_proj.weight], init_std)
            # A chunk applies all its tokens' gradients (taken at the chunk-start weights) and
            # momentum multiplies them by ~1/(1 - eta): the effective step per chunk is about
            # theta * chunk * 2 / (1 - eta) for unit keys. Start well below 1 so the inner
            # descent converges instead of blowing the memory up (theta = max_lr/2 with eta 0.88
            # diverged to 1e38 within one 256-token sequence).
            self.theta_proj.bias.fill_(-4.0)  # theta ~ 0.018 * max_lr
            self.eta_proj.bias.fill_(0.0)  # eta = 0.5
            self.alpha_proj.bias.fill_(-4.0)  # alpha ~ 0.018: forget slowly
            for p in self.init:
                nn.init.normal_(p, std=p.shape[1] ** -0.5)
            self.norm.init_weights()
            nn.init.normal_(self.out.weight, std=out_std)


class PersistentAttention(nn.Module):
    """Softmax attention whose keys start with ``n_persistent`` learned tokens every query sees."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        a = cfg.attention
        self.head_dim = a.head_dim or cfg.d_model // a.n_heads
        self.rope_theta = a.rope_theta if a.pos_encoding == "rope" else None
        inner = a.n_heads * self.head_dim
        self.wq = nn.Linear(cfg.d_model, inner, bias=False)
        self.wk = nn.Linear(cfg.d_model, inner, bias=False)
        self.wv = nn.Linear(cfg.d_model, inner, bias=False)
        self.wo = nn.Linear(inner, cfg.d_model, bias=False)
        self.persistent = nn.Parameter(torch.empty(cfg.titans.n_persistent, cfg.d_model))

    def project(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, which: str = "qkv") -> list[Tensor]:
        """The projections named in ``which`` of ``x [B, T, d]``, ``[B, T, H, D]``, q and k rotated."""
        b, t, _ = x.shape
        out = []
        for name in which:
            y = getattr(self, f"w{name}")(x).view(b, t, -1, self.head_dim)
            out.append(apply_rope(y, *rope) if rope is not None and name != "v" else y)
        return out

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor] | None:
        return None if self.rope_theta is None else rope_tables(positions, self.head_dim, self.rope_theta)

    def attend(self, q: Tensor, kvs: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
        """``q [B, T, H, D]`` over the persistent tokens and each (k, v ``[B, S, H, D]``, mask
        ``[B, 1, T, S]``) -> ``[B, T, H * D]`` (before ``wo``)."""
        b, t = q.shape[:2]
        n_p = self.persistent.shape[0]
        if n_p:
            pk, pv = self.project(self.persistent.unsqueeze(0), None, "kv")  # [1, P, H, D]
            pmask = torch.ones(b, 1, t, n_p, dtype=torch.bool, device=q.device)
            kvs = [(pk.expand(b, -1, -1, -1), pv.expand(b, -1, -1, -1), pmask)] + kvs
        k = torch.cat([kv[0] for kv in kvs], dim=1)
        v = torch.cat([kv[1] for kv in kvs], dim=1)
        mask = torch.cat([kv[2] for kv in kvs], dim=-1)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return o.transpose(1, 2).reshape(b, t, -1)

    def flops_per_token(self, mean_keys: float) -> float:
        return 12.0 * self.wq.weight.shape[0] * (mean_keys + self.persistent.shape[0])

    def new_kv(self, batch_size: int) -> KVState:
        return KVState.empty(self.wk.weight, batch_size, self.head_dim)

    def init_weights(self, init_std: float, out_std: float) -> None:
        for p in (self.wq.weight, self.wk.weight, self.wv.weight, self.persistent):
            nn.init.normal_(p, std=init_std)
        nn.init.normal_(self.wo.weight, std=out_std)


class _Titans(nn.Module):
    """Shared plumbing: a memory branch, a persistent-token attention and the decoding state."""

    window: int

    def __init__(self, cfg: ModelConfig, chunk_size: int, mem_out: int) -> None:
        super().__init__()
        self.memory = NeuralMemory(cfg, chunk_size, mem_out)
        self.attn = PersistentAttention(cfg)

    def _window_kv(
        self, k: Tensor, v: Tensor, ctx: ForwardContext, state: TitansState | None
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """MAG/MAL: the keys, values and mask ``q`` attends over (besides the persistent tokens):
        the cache's and the new ones, or under context parallelism the segment's with a halo."""
        if ctx.cp is not None:
            return [cp_window_kv(k, v, ctx.cp, ctx.positions, self.window)]
        if state is not None:
            k, v = state.kv.update(k, v, self.window)
        return [(k, v, attention_mask(ctx.positions, ctx.offset, self.window, ctx.reset is not None))]

    def new_state(self, batch_size: int) -> TitansState:
        conv, mem = self.memory.new_state(batch_size)
        return TitansState(conv, mem, self.attn.new_kv(batch_size))

    def flops_per_token(self, seq_len: int) -> float:
        return self.memory.flops_per_token() + self.attn.flops_per_token(mean_visible_keys(seq_len, self.window))

    def activation_elements(self) -> int:
        """Rough elements per token kept for backward: projections, conv, memory reads and
        gradients, attention; plus three memory states ([w0, m, s]) per chunk."""
        d, inner = self.attn.wq.weight.shape[1], self.attn.wq.weight.shape[0]
        mem = self.memory
        state = sum(p.numel() for p in mem.init)
        return 2 * d + 12 * mem.n_heads * mem.head_dim + 6 * inner + 3 * state // mem.chunk_size

    def init_weights(self, init_std: float, out_std: float) -> None:
        self.memory.init_weights(init_std, out_std)
        self.attn.init_weights(init_std, out_std)


class TitansMAC(_Titans):
    """Segments are processed in order (a forward over several segments loops over them, each
    row's segment starts at ``position % segment_size == 0``): read, attend, then write the
    attention output into the memory (and, 'per_token', gate the output by a read after each
    token's write); the decoding cache holds the current segment's keys.

    The attention output ``W_o(o)`` passes through :attr:`reduce_partial` before the memory
    reads it (identity here; under tensor parallelism ``W_o`` is row-parallel and the hook sums
    its partials over the ranks); the layer's output is ``W_o(o)`` as computed, times the
    gate, which is the same on every rank, so it stays a partial sum over the ranks."""

    reduce_partial = staticmethod(no_reduction)
    """Partial attention output ``[B, L, d_model]`` -> its sum over ranks."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, cfg.titans.segment_size, cfg.d_model)
        self.window = cfg.titans.segment_size
        self.per_token = cfg.titans.mac_output == "per_token"
        if self.per_token:
            self.gate_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.kernels)

    def forward(self, x: Tensor, ctx: ForwardContext, state: TitansState | None = None) -> Tensor:
        if ctx.cp is not None:
            return relay_mac(self, x, ctx)
        st = self.new_state(x.shape[0]) if state is None else state
        cut = (ctx.positions % self.window == 0).any(0)  # where any row starts a segment
        cut[0] = True
        bounds = torch.nonzero(cut).flatten().tolist() + [x.shape[1]]
        return torch.cat([self._piece(x, ctx, a, b, st) for a, b in zip(bounds[:-1], bounds[1:])], dim=1)

    def _piece(self, x: Tensor, ctx: ForwardContext, a: int, b: int, st: TitansState) -> Tensor:
        """Tokens [a, b) of x, inside one segment of every row; updates ``st``."""
        x, pos = x[:, a:b], ctx.positions[:, a:b]
        reset = None if ctx.reset is None else ctx.reset[:, a:b]
        mem, n = self.memory, x.shape[0]
        inner = mem.conv_weight.shape[1]  # H * D of the heads this module holds (a shard under tensor parallelism)
        shape = (n, b - a, -1, mem.head_dim)
        # 1. read the memory as it was at the segment start (the initial one after a reset)
        q_mem, tail = mem.conv(mem.q_proj(x), slice(0, inner), st.conv, pos)
        q_mem = q_mem.view(shape)
        w0 = st.memory.w0
        if reset is not None:
            w0 = [torch.where(reset[:, 0].view(-1, 1, 1, 1), at_least_fp32(p), w) for p, w in zip(mem.init, w0)]
        read = memory_read(w0, at_least_fp32(F.normalize(q_mem, dim=-1)).transpose(1, 2))  # [B, H, L, D]
        h = mem.project_out(read.transpose(1, 2), x.dtype)  # [B, L, d]
        # 2. attend over [persistent || memory reads || tokens] of the segment so far
        rope = self.attn.rope(pos)
        q, k, v = self.attn.project(x, rope)
        hk, hv = self.attn.project(h, rope, "kv")
        k, v = st.kv.update(k, v, self.window)
        hk, hv = st.mem_kv.update(hk, hv, self.window)
        # a segment behaves like a document: its start is i - position % segment_size
        mask = attention_mask(pos % self.window, ctx.offset + a, self.window, True)
        o = self.attn.attend(q, [(hk, hv, mask), (k, v, mask)])
        y_out = self.attn.wo(o)  # the layer's output before the gate (a partial sum under tensor parallelism)
        y = self.reduce_partial(y_out)
        # 3. write: keys and values from the attention output
        kv, st.conv = mem.conv(torch.cat([mem.k_proj(y), mem.v_proj(y)], dim=-1), slice(inner, None), tail, pos)
        k_mem, v_mem = kv.view(n, b - a, 2, -1, mem.head_dim).unbind(2)
        if not self.per_token:  # the scan's read (segment-start weights) is step 1's again
            _, st.memory = mem.scan(x, q_mem, k_mem, v_mem, st.memory, pos, reset)
            return y_out
        # 4. o_t = y_t (x) M*_t(y_t): write gates and the read's query from y, and the read with
        # each token's own weights; M* is step 1's retrieval (its W_Q, conv taps and W_out)
        zq, conv0 = mem.q_proj(y), st.read_conv.transpose(1, 2)  # [B, L, HD], [B, HD, K-1]
        st.read_conv = final_conv_state(zq, conv0, mem.conv_weight.shape[-1]).transpose(1, 2)
        q_read = causal_conv1d(
            zq, mem.conv_weight[0], mem.conv_bias[0], positions=pos, initial_state=conv0, activation="silu",
            backend=mem.kernels,
        )
        read, st.memory = mem.scan(y, q_read.view(shape), k_mem, v_mem, st.memory, pos, reset, "per_token")
        return y_out * torch.sigmoid(self.gate_norm(mem.project_out(read, x.dtype)))

    def new_state(self, batch_size: int) -> TitansState:
        s = super().new_state(batch_size)
        s.mem_kv = self.attn.new_kv(batch_size)
        if self.per_token:
            s.read_conv = s.conv[..., : self.memory.conv_weight.shape[1]].clone()
        return s

    def flops_per_token(self, seq_len: int) -> float:
        """Plus, 'per_token', the dual-form read (:func:`kernels.titans.memory_scan`): per head the
        [L, L] decay product and per memory layer two [L, L]-by-width products and two reads of
        the piece-start weights and momentum, x3 for forward + backward; and W_Q and W_out used a
        second time (on y) beside their count as Linear weights."""
        flops = super().flops_per_token(seq_len)
        if self.per_token:
            n = min(self.window, seq_len)
            shapes = [p.shape[1:] for p in self.memory.init]
            dual = 2 * n * n + sum(2 * n * (i + o) + 4 * i * o for i, o in shapes)
            flops += 3.0 * self.memory.n_heads * dual + 12.0 * self.memory.out.weight.numel()
        return flops

    def activation_elements(self) -> int:
        """Plus, 'per_token', the dual form's [L, L] matrices per head: two decays, their product
        and two per memory layer."""
        extra = 0
        if self.per_token:
            extra = self.memory.n_heads * self.window * (3 + 2 * len(self.memory.init))
        return super().activation_elements() + extra

    def init_weights(self, init_std: float, out_std: float) -> None:
        super().init_weights(init_std, out_std)
        if self.per_token:
            self.gate_norm.init_weights()


class TitansMAG(_Titans):
    """``W_o(RMSNorm(o) * sigmoid(RMSNorm(m)))``: o the attention heads' outputs, m the memory's
    projected reads, both ``[B, T, H_attn * D]``, the norms over that whole width.

    The memory's reads pass through :attr:`scatter_partial` (identity here): under tensor
    parallelism ``memory.out`` is row-parallel over the memory heads, so m is a partial sum, and
    the hook returns the rank's columns of the sum (those of its attention heads); the two norms
    then sum their sums of squares over the ranks (:class:`WidthRMSNorm`)."""

    scatter_partial = staticmethod(no_reduction)
    """Partial memory reads ``[B, T, W]`` -> this rank's contiguous ``[B, T, W / tp]`` columns of
    their sum over ranks (protocol: parallel/tensor/plan.py, ``RegionPlan.scatter_partials``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        a = cfg.attention
        super().__init__(cfg, cfg.titans.chunk_size, a.n_heads * (a.head_dim or cfg.d_model // a.n_heads))
        self.window = a.window
        inner = self.attn.wo.weight.shape[1]
        # over the whole attention width: under tensor parallelism each rank holds a part
        self.attn_norm = WidthRMSNorm(inner, cfg.norm_eps)
        self.gate_norm = WidthRMSNorm(inner, cfg.norm_eps)

    def forward(self, x: Tensor, ctx: ForwardContext, state: TitansState | None = None) -> Tensor:
        m = self.scatter_partial(self.memory(x, ctx, state))  # [B, T, H_attn * D] (the rank's heads')
        q, k, v = self.attn.project(x, self.attn.rope(ctx.positions))
        o = self.attn.attend(q, self._window_kv(k, v, ctx, state))
        return self.attn.wo(self.attn_norm(o) * torch.sigmoid(self.gate_norm(m)))

    def init_weights(self, init_std: float, out_std: float) -> None:
        super().init_weights(init_std, out_std)
        self.attn_norm.init_weights()
        self.gate_norm.init_weights()


class TitansMAL(_Titans):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, cfg.titans.chunk_size, cfg.d_model)
        self.window = cfg.attention.window

    def forward(self, x: Tensor, ctx: ForwardContext, state: TitansState | None = None) -> Tensor:
        m = self.memory(x, ctx, state)  # [B, T, d]
        q, k, v = self.attn.project(m, self.attn.rope(ctx.positions))
        return self.attn.wo(self.attn.attend(q, self._window_kv(k, v, ctx, state)))


@register_mixer("mac")
def _mac(cfg: ModelConfig, layer_idx: int) -> TitansMAC:
    return TitansMAC(cfg)


@register_mixer("mag")
def _mag(cfg: ModelConfig, layer_idx: int) -> TitansMAG:
    return TitansMAG(cfg)


@register_mixer("mal")
def _mal(cfg: ModelConfig, layer_idx: int) -> TitansMAL:
    return TitansMAL(cfg)
