"""SambaY's decoder-hybrid-decoder layers (Ren et al. 2025) and the YOCO cross-decoder.

The layers pass what they share through the block-to-block ``carry`` (never module attributes):

- 'mamba_mem': Mamba whose scan output y (with the D skip, before the SiLU(z) gate) is the
  memory m, ``carry["gmu_memory"] [B, T, d_inner]``; 'mamba2_mem' / 'gla_mem': Mamba-2 / GLA
  whose output before their gated RMSNorm is the memory (the GMU then normalises as they do);
- 'attn_kv' / 'diff_attn_kv': the one full-attention layer; its keys/values, including every
  cached past one, become ``carry["shared_k"], carry["shared_v"] [B, S, H_kv, D]``;
- 'gmu': the Gated Memory Unit y = W2(m ⊙ SiLU(W1 x));
- 'xattn' / 'diff_xattn': cross-attention that computes only queries and attends to the shared
  keys/values (full causal mask). Neither these nor 'gmu' keep a decoding cache: only the
  full-attention layer and the self-decoder's windows and scans do.

Under context parallelism (``ctx.cp``: the rows ``[B * slots, s]`` are segments) the
'attn_kv' layer all-gathers its keys/values once, and ``carry["shared_k"], carry["shared_v"]``
hold the whole sequences ``[B, T, H_kv, D]`` (token order, after RoPE; gradients flow back
through the gather), so no cross layer exchanges anything: each attends with its local
queries under the same per-segment causal masks (:class:`~pretrain.models.context.SegmentMasks`).
Under ring attention (parallel.cp_attention = 'ring') the carry holds only the rows' own
keys/values ``[B * slots, s, H_kv, D]`` and every cross layer rings them itself: each keeps
O(T / cp) instead of the gathered T, at the price of its own cp - 1 hops forward and backward
per layer (the all-gather exchanges once for all of them).
The memory and the GMU are token-local (``[B * slots, s, d_mem]``, as the rows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor, nn

from kernels.dispatch import cpu_torch_path
from kernels.gmu import gated_memory
from pretrain.models.layers.attention import Attention, KVState
from pretrain.models.layers.decode_weights import decode_linear, decoding
from pretrain.models.layers.diff_attention import DiffAttention
from pretrain.models.layers.gla import GatedLinearAttention
from pretrain.models.layers.mamba import Mamba, MambaState
from pretrain.models.layers.mamba2 import Mamba2, RMSNormGated
from pretrain.models.registry import register_mixer

if TYPE_CHECKING:
    from pretrain.config import ModelConfig
    from pretrain.models.context import ForwardContext

MEMORY, SHARED_K, SHARED_V = "gmu_memory", "shared_k", "shared_v"
Carry = dict[str, Tensor]


def _need(carry: Carry, key: str, layer: str, producer: str) -> Tensor:
    if key not in carry:
        raise RuntimeError(f"{layer}: no {key!r} in the carry; a {producer} block must come earlier in the pattern")
    return carry[key]


class MambaMemory(Mamba):
    """Mamba that also exports its pre-gate scan output as the GMU memory."""

    uses_carry = True

    def forward(self, x: Tensor, ctx: ForwardContext, state: MambaState | None, carry: Carry) -> tuple[Tensor, Carry]:
        y, z = self.scan(x, ctx, state)  # [B, T, d_inner] each
        g = y * F.silu(z)
        out = decode_linear(g, self, "out_proj", self.out_proj) if decoding(g) else self.out_proj(g)
        return out, {**carry, MEMORY: y}


class _NormInputMemory:
    """Mixin for a mixer whose output goes through one norm (``memory_norm``, a submodule name)
    that takes the raw recurrent output first: runs the mixer's own forward and exports that
    input as the memory. The hook lives only for the call, so no state stays in the module.
    (A ``scan()`` split of those mixers, as Mamba has, would make the hook unnecessary.)"""

    uses_carry = True
    memory_norm: str

    def forward(self, x: Tensor, ctx: ForwardContext, state: object, carry: Carry) -> tuple[Tensor, Carry]:
        seen: list[Tensor] = []
        handle = getattr(self, self.memory_norm).register_forward_hook(lambda _m, args, _o: seen.append(args[0]))
        try:
            y = super().forward(x, ctx, state)
        finally:
            handle.remove()
        return y, {**carry, MEMORY: seen[-1].reshape(x.shape[0], x.shape[1], -1)}  # [B, T, d_mem]


class Mamba2Memory(_NormInputMemory, Mamba2):
    """Mamba-2 exporting its scan output (with the D skip) before the gated RMSNorm."""

    memory_norm = "norm"


class GLAMemory(_NormInputMemory, GatedLinearAttention):
    """GLA exporting o = q S (all heads) before its RMSNorm and swish gate."""

    memory_norm = "g_norm"


class AttentionKV(Attention):
    """Full causal attention whose keys/values (after RoPE, past ones included; under context
    parallelism the gathered sequences, or the rows' own under ring attention) are shared."""

    uses_carry = True

    def forward(self, x: Tensor, ctx: ForwardContext, state: KVState | None, carry: Carry) -> tuple[Tensor, Carry]:
        q, k, v = self._project(x, ctx, state)
        return self._mix(q, k, v, ctx), {**carry, SHARED_K: k, SHARED_V: v}


class DiffAttentionKV(AttentionKV, DiffAttention):
    """Differential full attention that shares its keys/values (SambaY-DA)."""


class CrossAttention(Attention):
    """Queries only: attends to the keys/values of the shared full-attention layer."""

    uses_carry = True

    def __init__(self, cfg: ModelConfig, *args: int) -> None:
        super().__init__(cfg, None, *args)
        del self.wk, self.wv  # keys/values come from the carry

    def forward(self, x: Tensor, ctx: ForwardContext, state: None, carry: Carry) -> tuple[Tensor, Carry]:
        k = _need(carry, SHARED_K, "xattn", "'attn_kv'")
        v = _need(carry, SHARED_V, "xattn", "'attn_kv'")
        return self._mix(self._query(x, ctx), k, v, ctx), carry

    def new_state(self, batch_size: int) -> None:
        return None

    def activation_elements(self) -> int:
        d_in, q = self.wq.weight.shape[1], self.wq.weight.shape[0]
        return d_in + 3 * q  # input, q before/after RoPE, attention output

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.wq.weight, std=init_std)
        nn.init.normal_(self.wo.weight, std=out_std)


class DiffCrossAttention(CrossAttention, DiffAttention):
    """Differential cross-attention (SambaY-DA)."""

    def init_weights(self, init_std: float, out_std: float) -> None:
        super().init_weights(init_std, out_std)
        self.init_lambdas()


class GatedMemoryUnit(nn.Module):
    """y = out_proj(m ⊙ SiLU(in_proj(x))) with the memory m of the carry; with ``norm_group``
    (Mamba-2 / GLA memories) the product goes through an RMSNorm over groups of that many
    channels first (ArchScale's GMU with use_norm: RMSNormGated, gate before the norm). The
    element-wise part runs :mod:`kernels.gmu` (or the gated RMSNorm of :mod:`kernels.rmsnorm`)
    as ``kernels`` (``model.kernels``) says."""

    uses_carry = True

    def __init__(
        self, d_model: int, d_mem: int, norm_group: int | None = None, eps: float = 1e-5, kernels: str = "torch"
    ) -> None:
        super().__init__()
        self.kernels = kernels
        self.in_proj = nn.Linear(d_model, d_mem, bias=False)
        self.norm = None if norm_group is None else RMSNormGated(d_mem, norm_group, eps, kernels)
        self.out_proj = nn.Linear(d_mem, d_model, bias=False)

    def forward(self, x: Tensor, ctx: ForwardContext, state: None, carry: Carry) -> tuple[Tensor, Carry]:
        m = _need(carry, MEMORY, "gmu", "memory ('mamba_mem', 'mamba2_mem', 'gla_mem')").to(x.dtype)
        step = decoding(x)  # pretrain.models.layers.decode_weights
        z = decode_linear(x, self, "in_proj", self.in_proj) if step else self.in_proj(x)
        if self.norm is not None:
            y = self.norm(m, z)
        elif step and cpu_torch_path(self.kernels, x):
            y = m * F.silu(z)  # kernels.gmu's PyTorch path without the dispatch checks (one token)
        else:
            y = gated_memory(m, z, backend=self.kernels)
        return decode_linear(y, self, "out_proj", self.out_proj) if step else self.out_proj(y), carry

    def activation_elements(self) -> int:
        d_model, d_mem = self.in_proj.weight.shape[1], self.in_proj.weight.shape[0]
        return d_model + 3 * d_mem  # input, gate, memory, gated product

    def new_state(self, batch_size: int) -> None:
        return None

    def init_weights(self, init_std: float, out_std: float) -> None:
        nn.init.normal_(self.in_proj.weight, std=init_std)
        nn.init.normal_(self.out_proj.weight, std=out_std)
        if self.norm is not None:
            self.norm.init_weights()


def _gla_width(cfg: ModelConfig) -> int:
    return int(cfg.gla.expand_v * cfg.d_model)


# memory-producing mixer -> (memory width, the GMU's norm group size or None)
MEMORY_LAYOUT = {
    "mamba_mem": lambda cfg: (cfg.mamba.expand * cfg.d_model, None),
    "mamba2_mem": lambda cfg: (cfg.mamba2.expand * cfg.d_model, cfg.mamba2.expand * cfg.d_model // cfg.mamba2.n_groups),
    "gla_mem": lambda cfg: (_gla_width(cfg), _gla_width(cfg) // cfg.gla.n_heads),
}


def memory_layout(cfg: ModelConfig, layer_idx: int) -> tuple[int, int | None]:
    """Width and norm group of the memory the 'gmu' block ``layer_idx`` reads: those of the
    closest memory layer before it in the pattern."""
    earlier = [m for m, _ in cfg.pattern()[:layer_idx] if m in MEMORY_LAYOUT]
    if not earlier:
        raise ValueError(f"block {layer_idx} ('gmu') has no memory layer ({sorted(MEMORY_LAYOUT)}) before it")
    return MEMORY_LAYOUT[earlier[-1]](cfg)


@register_mixer("mamba_mem")
def _mamba_mem(cfg: ModelConfig, layer_idx: int) -> MambaMemory:
    return MambaMemory(cfg)


@register_mixer("mamba2_mem")
def _mamba2_mem(cfg: ModelConfig, layer_idx: int) -> Mamba2Memory:
    return Mamba2Memory(cfg)


@register_mixer("gla_mem")
def _gla_mem(cfg: ModelConfig, layer_idx: int) -> GLAMemory:
    return GLAMemory(cfg)


@register_mixer("attn_kv")
def _attn_kv(cfg: ModelConfig, layer_idx: int) -> AttentionKV:
    return AttentionKV(cfg, None)


@register_mixer("diff_attn_kv")
def _diff_attn_kv(cfg: ModelConfig, layer_idx: int) -> DiffAttentionKV:
    return DiffAttentionKV(cfg, None, layer_idx)


@register_mixer("xattn")
def _xattn(cfg: ModelConfig, layer_idx: int) -> CrossAttention:
    return CrossAttention(cfg)


@register_mixer("diff_xattn")
def _diff_xattn(cfg: ModelConfig, layer_idx: int) -> DiffCrossAttention:
    return DiffCrossAttention(cfg, layer_idx)


@register_mixer("gmu")
def _gmu(cfg: ModelConfig, layer_idx: int) -> GatedMemoryUnit:
    return GatedMemoryUnit(cfg.d_model, *memory_layout(cfg, layer_idx), eps=cfg.norm_eps, kernels=cfg.kernels)
