"""Causal softmax attention: full ('attn') and sliding-window ('swa'), GQA, RoPE or NoPE.

Backends: flash-attn's varlen kernel (documents as separate sequences via cu_seqlens, the
window via window_size) on CUDA when installed; otherwise SDPA with the explicit boolean mask
that :func:`pretrain.models.context.build_context` computed once for the whole forward.

Context parallelism (``ctx.cp``, rows are segments of longer sequences; SDPA only, never
flash-attn): a full-attention layer all-gathers its keys/values once (``[B, T, H_kv, 2 D]``
per layer, :meth:`~pretrain.models.sequence_split.SequenceSplit.gather`) and the queries of
each local segment attend the keys up to their segment's end (:class:`SegmentMasks`), so the
head-tail split gives every rank the same work; a window layer exchanges only a halo of
``window - 1`` keys/values per segment (:meth:`~pretrain.models.sequence_split.SequenceSplit.tails`),
put before the segment's own (:func:`~pretrain.models.context.halo_mask`, or
:func:`banded_sdpa` over long segments). With parallel.cp_attention = 'ring' full attention
keeps only its rows' keys/values and calls the split's ring attention instead
(:class:`~pretrain.models.context.RingMasks`): memory O(T / cp) per layer, every other rank's
keys/values received once in the forward and once in the backward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models.layers.decode_weights import decode_linear, decoding
from pretrain.models.layers.rope import apply_rope
from pretrain.models.registry import register_mixer

from pretrain.models.context import BandedMask, RingMasks, SegmentMasks

if TYPE_CHECKING:
    from pretrain.config import ModelConfig
    from pretrain.models.context import ForwardContext
    from pretrain.models.sequence_split import SequenceSplit


@functools.cache
def flash_available() -> bool:
    """flash-attn importable and a CUDA device present (checked once)."""
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def mean_visible_keys(seq_len: int, window: int | None) -> float:
    """Keys a causal query sees on average over a sequence: query i sees min(i + 1, window)."""
    w = seq_len if window is None else min(window, seq_len)
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def banded_sdpa(q: Tensor, k: Tensor, v: Tensor, band: BandedMask) -> Tensor:
    """Sliding-window attention of ``q [B, T, H, D]`` over ``k [B, S, H_kv, D]``, ``v [B, S, H_kv,
    Dv]`` -> ``[B, T, H, Dv]``, block by block: the queries in blocks of ``window``, each against
    the ``2 window - 1`` keys that can reach it (overlapping views, copied once), one batched
    SDPA call with the blocks' masks (:attr:`BandedMask.blocks`). The keys are the same T tokens
    (S = T, no cache), or with :attr:`BandedMask.halo` the ``window - 1`` tokens before them
    first (S = window - 1 + T, a context-parallel halo, standing in for the zero padding of the
    first block). O(T * window) time and memory; the same result as the dense masked SDPA.
    Raises ValueError when S does not fit the mask."""
    b, t, h, d = q.shape
    w = band.window
    nb = -(-t // w)
    pad = nb * w - t
    span = 2 * w - 1
    before = 0 if band.halo else w - 1  # zero keys put before the first block
    if k.shape[1] != t + w - 1 - before:
        raise ValueError(f"banded_sdpa: {k.shape[1]} keys for {t} queries (window {w}, halo {band.halo})")

    def windows(x: Tensor) -> Tensor:  # [B, S, H_kv, E] -> [B * nb, H_kv, span, E]
        x = F.pad(x, (0, 0, 0, 0, before, pad))  # [B, w - 1 + nb * w, H_kv, E]
        x = x.unfold(1, span, w)  # [B, nb, H_kv, E, span]
        return x.permute(0, 1, 2, 4, 3).reshape(b * nb, x.shape[2], span, x.shape[3])

    qb = F.pad(q, (0, 0, 0, 0, 0, pad)).reshape(b * nb, w, h, d).transpose(1, 2)  # [B * nb, H, w, D]
    o = F.scaled_dot_product_attention(
        qb, windows(k), windows(v),
        attn_mask=band.blocks.reshape(b * nb, 1, w, span),
        enable_gqa=h != k.shape[2],
    )  # [B * nb, H, w, Dv]
    return o.transpose(1, 2).reshape(b, nb * w, h, -1)[:, :t]


def segment_sdpa(q: Tensor, k: Tensor, v: Tensor, segments: SegmentMasks) -> Tensor:
    """Full causal attention of context-parallel rows: ``q [B * slots, s, H, D]`` (row ``b *
    slots + j``: slot j of sample b) over the gathered ``k [B, T, H_kv, D]``, ``v [B, T, H_kv,
    Dv]`` -> ``[B * slots, s, H, Dv]``. Slot j's queries read only the keys before its
    segment's end (``segments.masks[j]``'s width), one SDPA call per slot."""
    slots = len(segments.masks)
    qs = q.unflatten(0, (-1, slots))  # [B, slots, s, H, D]
    out = []
    for j, mask in enumerate(segments.masks):
        n = mask.shape[-1]
        o = F.scaled_dot_product_attention(
            qs[:, j].transpose(1, 2),  # [B, H, s, D]
            k[:, :n].transpose(1, 2),  # [B, H_kv, n, D]
            v[:, :n].transpose(1, 2),
            attn_mask=mask,
            enable_gqa=q.shape[2] != k.shape[2],
        )
        out.append(o.transpose(1, 2))  # [B, s, H, Dv]
    return torch.stack(out, dim=1).flatten(0, 1)


def exchange_kv(k: Tensor, v: Tensor, split: SequenceSplit, window: int | None) -> tuple[Tensor, Tensor]:
    """The keys/values a context-parallel layer attends to, from its rows' ``k [B * slots, s,
    H_kv, D]``, ``v [B * slots, s, H_kv, Dv]`` (after RoPE): full attention (``window`` None)
    all-gathers them, ``[B, T, H_kv, D]`` (every segment's, one exchange of both); a window
    puts the ``window - 1`` tokens before each row first, ``[B * slots, window - 1 + s, H_kv,
    D]`` (a halo: only the last ``min(window - 1, s)`` tokens of each segment are exchanged,
    zeros before the sequence). Under ring attention (``split.ring``) full attention exchanges
    nothing here: the rows' own ``k, v`` are returned and travel inside
    :meth:`~pretrain.models.sequence_split.SequenceSplit.ring_attention`. Differentiable."""
    if window is None and split.ring:
        return k, v
    d = k.shape[-1]
    kv = torch.cat([k, v], dim=-1)  # one exchange for both
    if window is None:
        kv = split.gather(kv)
    elif window > 1:
        kv = torch.cat([split.tails(kv, window - 1), kv], dim=1)
    return kv[..., :d], kv[..., d:]


DECODE_BLOCK = 1024
"""Keys per block of :func:`decode_attention`."""
DECODE_MIN_KEYS = 2048
"""From this many keys on, one query per head attends through :func:`decode_attention` (below
it SDPA's single call costs less than the extra operators)."""


def decode_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention of one query per head over every key: ``q [B, 1, H, D]``, ``k [B, S,
    H_kv, D]``, ``v [B, S, H_kv, Dv]`` (any row strides, e.g. views of a KV cache) -> ``[B, 1,
    H, Dv]``, scale ``D ** -0.5``; query head i reads KV head ``i // (H / H_kv)`` (GQA). The same
    result as SDPA up to the summation order.

    Why: with one query, SDPA on the CPU runs one thread per (row, KV head) over all S keys, at
    about a quarter of the read bandwidth. Here the scores ``K q^T`` are one GEMM over the keys
    (``[S, g]`` for the g query heads of a KV head), then the keys go in blocks of
    :data:`DECODE_BLOCK` (flash-decoding's split of the keys, Dao et al. 2023): each block's
    scores are turned to ``[g, block]`` (a small transpose per block, several times cheaper
    than one of the whole ``[S, g]``), exponentiated against the block's own maximum and
    multiplied by the block's values in one batched product; the blocks' partial outputs are
    then rescaled to the global maximum and summed (the log-sum-exp merge), so every thread
    streams K and V near the bandwidth (about 2.5x faster than SDPA at 16K-32K keys). Loops
    over the B x H_kv (row, KV head) pairs: meant for few of them (batch-1 decoding)."""
    b, _, h, d = q.shape
    s, h_kv, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = h // h_kv
    qs = (q * d**-0.5).view(b, h_kv, g, d)
    n = s // DECODE_BLOCK
    main = n * DECODE_BLOCK
    out = []
    for i in range(b):
        for j in range(h_kv):
            kj, vj = k[i, :, j], v[i, :, j]  # [S, D], [S, Dv]: rows H_kv * D apart, no copy
            scores = torch.mm(kj, qs[i, j].t())  # [S, g]
            if n == 0:
                out.append(torch.mm(torch.softmax(scores.t(), dim=-1), vj))  # [g, Dv]
                continue
            blocks = scores[:main].view(n, DECODE_BLOCK, g).transpose(1, 2).contiguous()  # [n, g, block]
            m = blocks.amax(-1, keepdim=True)  # [n, g, 1]: each block's maximum
            p = blocks.sub_(m).exp_()
            norm = p.sum(-1, keepdim=True)  # [n, g, 1]
            o = torch.bmm(p, vj[:main].view(n, DECODE_BLOCK, dv))  # [n, g, Dv]
            if main < s:  # the last, partial block
                rest = scores[main:].t()  # [g, r]
                m_r = rest.amax(-1, keepdim=True)
                p_r = (rest - m_r).exp_()
                m = torch.cat([m, m_r[None]])
                norm = torch.cat([norm, p_r.sum(-1, keepdim=True)[None]])
                o = torch.cat([o, torch.mm(p_r, vj[main:])[None]])
            scale = (m - m.amax(0)).exp_()  # [n, g, 1]: each block's weight at the global maximum
            out.append((o * scale).sum(0) / (norm * scale).sum(0))
    return (out[0] if len(out) == 1 else torch.stack(out)).view(b, 1, h, dv)


def use_decode_attention(batch: int, kv_heads: int, keys: int) -> bool:
    """Whether one query per head over ``keys`` keys goes through :func:`decode_attention`: a
    long cache and fewer (row, KV head) pairs than threads (SDPA's parallel axis; with more
    pairs it keeps every thread busy itself)."""
    return keys >= DECODE_MIN_KEYS and batch * kv_heads < max(2, torch.get_num_threads())


def _cpu_decode_attention(q: Tensor, k: Tensor) -> bool:
    return q.device.type == "cpu" and use_decode_attention(q.shape[0], k.shape[2], k.shape[1])


_rope_step_memo: list = [None]  # (cos, sin, full cos, signed sin) of the last decoding step


def _rope_step_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """``cat(cos, cos)`` and ``cat(-sin, sin)`` ``[B, 1, 1, head_dim]`` for tables ``[B, 1,
    head_dim // 2]``, built once per forward (kept for the last tables seen; holding them also
    keeps their identity from being reused)."""
    memo = _rope_step_memo[0]
    if memo is None or memo[0] is not cos or memo[1] is not sin:
        c, s = cos.unsqueeze(2), sin.unsqueeze(2)
        memo = _rope_step_memo[0] = (cos, sin, torch.cat([c, c], dim=-1), torch.cat([-s, s], dim=-1))
    return memo[2], memo[3]


def rope_step(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """:func:`~pretrain.models.layers.rope.apply_rope` of one token ``x [B, 1, H, head_dim]`` (fp32)
    in three operators: ``x * [c, c] + roll(x) * [-s, s]`` with ``roll(x) = [x2, x1]`` is the
    half-split rotation ``[x1 c - x2 s, x2 c + x1 s]``."""
    c, s = _rope_step_tables(cos, sin)
    return torch.addcmul(x * c, x.roll(x.shape[-1] // 2, dims=-1), s)


@dataclass
class KVState:
    """Cached keys/values after RoPE, written in place into preallocated buffers.

    The buffers ``k, v [B, H_kv, capacity, head_dim]`` are heads-major (SDPA's, vLLM's and
    Hugging Face's layout): one KV head's keys are one contiguous ``[capacity, head_dim]``
    matrix, which a decoding step streams (:func:`decode_attention`) at twice the speed of keys
    interleaved across heads. A full-attention layer appends (the capacity doubles when a step
    would overflow it, so a token costs O(1) amortised copies and :meth:`reserve` makes it
    static). A sliding-window layer keeps a ring of ``window`` slots: token i lives in slot
    ``i % window``, so a one-token step overwrites the one key that just left the window and
    its query reads the whole ring in place. ``length`` counts every token written (the next
    token's index). :meth:`update` takes and returns the model's ``[B, T, H_kv, D]`` order (the
    returned keys are views of the buffers where it can).
    """

    k: Tensor
    v: Tensor
    length: int = 0

    @classmethod
    def empty(cls, weight: Tensor, batch_size: int, head_dim: int) -> "KVState":
        """No tokens yet, for the key projection ``weight [H_kv * head_dim, d]``."""
        empty = weight.new_zeros(batch_size, weight.shape[0] // head_dim, 0, head_dim)  # [B, H_kv, 0, D]
        return cls(empty, empty.clone())

    @property
    def capacity(self) -> int:
        """Tokens the buffers hold (a window layer: its ring's slots)."""
        return self.k.shape[2]

    def reserve(self, tokens: int, window: int | None = None) -> None:
        """Allocate room for ``tokens`` tokens in total (a window layer: its ring), so that no
        later step reallocates."""
        size = tokens if window is None else window
        if size > self.capacity:
            self._resize(size)

    def _resize(self, size: int) -> None:
        b, h, n, d = self.k.shape
        k, v = self.k.new_zeros(b, h, size, d), self.v.new_zeros(b, h, size, d)
        k[:, :, :n], v[:, :, :n] = self.k, self.v
        self.k, self.v = k, v

    def update(self, k: Tensor, v: Tensor, window: int | None, ordered: bool = True) -> tuple[Tensor, Tensor]:
        """Store the new ``k, v [B, T, H_kv, D]``; return the keys/values ``[B, S, H_kv, D]``
        the new queries attend to: the cached ones the window keeps (``cached_keys``), then the
        T new ones. A full layer returns views of its buffers (no copy). A window layer's
        one-token step with ``ordered=False`` returns its ring in slot order (fine for a query
        that sees every key: softmax attention does not depend on the keys' order); otherwise
        the keys come in token order (a copy of at most window - 1 + T keys)."""
        t = k.shape[1]
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)  # the cache's dtype (bf16 keys under autocast)
        k_in, v_in = k.transpose(1, 2), v.transpose(1, 2)  # [B, H_kv, T, D]
        if window is None:
            need = self.length + t
            if need > self.capacity:
                self._resize(max(need, 2 * self.capacity))
            self.k[:, :, self.length : need], self.v[:, :, self.length : need] = k_in, v_in
            self.length = need
            return self.k[:, :, :need].transpose(1, 2), self.v[:, :, :need].transpose(1, 2)
        if self.capacity < window:
            self._resize(window)
        start = self.length
        if t == 1 and not ordered:
            slot = start % window
            self.k[:, :, slot : slot + 1], self.v[:, :, slot : slot + 1] = k_in, v_in
            self.length += 1
            n = min(self.length, window)
            return self.k[:, :, :n].transpose(1, 2), self.v[:, :, :n].transpose(1, 2)
        past = min(start, window - 1)
        slots = torch.arange(start - past, start, device=k.device) % window
        k_all = torch.cat([self.k.index_select(2, slots).transpose(1, 2), k], dim=1)
        v_all = torch.cat([self.v.index_select(2, slots).transpose(1, 2), v], dim=1)
        keep = min(t, window)  # the new tokens still inside the ring after this step
        slots = torch.arange(start + t - keep, start + t, device=k.device) % window
        self.k.index_copy_(2, slots, k_in[:, :, t - keep :])
        self.v.index_copy_(2, slots, v_in[:, :, t - keep :])
        self.length = start + t
        return k_all, v_all


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None) -> None:
        super().__init__()
        a = cfg.attention
        self.window = window
        self.head_dim = a.head_dim or cfg.d_model // a.n_heads
        self.use_rope = a.pos_encoding == "rope"
        self.backend = a.backend
        n_kv = a.n_kv_heads or a.n_heads
        self.wq = nn.Linear(cfg.d_model, a.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, n_kv * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, n_kv * self.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * self.head_dim, cfg.d_model, bias=False)

    def forward(self, x: Tensor, ctx: ForwardContext, state: KVState | None = None) -> Tensor:
        return self._mix(*self._project(x, ctx, state), ctx)

    # The steps below are separate so that variants (differential attention, SambaY's K/V
    # exporting and cross-attention layers) override one step instead of copying forward.
    def _query(self, x: Tensor, ctx: ForwardContext) -> Tensor:
        """Queries ``[B, T, H, D]`` (after RoPE)."""
        b, t, _ = x.shape
        # head counts come from the shapes so that tensor parallelism can shard the heads
        q = decode_linear(x, self, "wq", self.wq) if decoding(x) else self.wq(x)
        q = q.view(b, t, -1, self.head_dim)  # [B, T, H, D]
        if self.use_rope:
            if ctx.rope is None:
                raise RuntimeError("Attention: the forward context has no RoPE tables")
            q = apply_rope(q, *ctx.rope)
        return q

    def _project(self, x: Tensor, ctx: ForwardContext, state: KVState | None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries ``[B, T, H, D]`` and the keys/values ``[B, S, H_kv, D]`` they attend to (after
        RoPE; with a cache, its past keys first and the cache updated)."""
        b, t, _ = x.shape
        if state is not None and decoding(x) and x.dtype == torch.float32:
            return self._project_step(x, ctx, state)
        q = self._query(x, ctx)
        k = self.wk(x).view(b, t, -1, self.head_dim)  # [B, T, H_kv, D]
        v = self.wv(x).view(b, t, -1, self.head_dim)  # [B, T, H_kv, D]
        if self.use_rope:
            k = apply_rope(k, *ctx.rope)
        if ctx.cp is not None:  # [B, T, H_kv, D] gathered (ring: the rows' own), or with a halo
            # [B * slots, window - 1 + s, H_kv, D]
            return (q, *exchange_kv(k, v, ctx.cp, self.window))
        if state is not None:  # [B, S, H_kv, D]; a ring in slot order when every key is visible
            k, v = state.update(k, v, self.window, ordered=not ctx.all_visible)
        return q, k, v

    def _project_step(self, x: Tensor, ctx: ForwardContext, state: KVState) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_project` of one decoded token (fp32, no autograd) with fewer operators: q, k
        and v from one product (:func:`decode_linear`), RoPE on q and k together."""
        b = x.shape[0]
        nq, nk = self.wq.weight.shape[0], self.wk.weight.shape[0]
        qkv = decode_linear(x, self, "qkv", self.wq, self.wk, self.wv)  # [B, 1, nq + nk + nv]
        qk = qkv[..., : nq + nk].view(b, 1, -1, self.head_dim)  # [B, 1, H + H_kv, D]
        if self.use_rope:
            if ctx.rope is None:
                raise RuntimeError("Attention: the forward context has no RoPE tables")
            qk = rope_step(qk, *ctx.rope)
        q, k = qk.split([nq // self.head_dim, nk // self.head_dim], dim=2)
        v = qkv[..., nq + nk :].view(b, 1, -1, self.head_dim)
        return q, *state.update(k, v, self.window, ordered=not ctx.all_visible)

    def _mix(self, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext) -> Tensor:
        """Output projection of the attention of ``q`` over ``k, v`` -> ``[B, T, d_model]``."""
        b, t = q.shape[:2]
        o = self._attend(q, k, v, ctx).reshape(b, t, -1)  # [B, T, H * D]
        return decode_linear(o, self, "wo", self.wo) if decoding(o) else self.wo(o)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext) -> Tensor:
        """Per-head attention outputs ``[B, T, H, D]``."""
        if ctx.cu_seqlens is not None:  # set only without a cache
            return self._flash(q, k, v, ctx)
        return self._sdpa(q, k, v, None if ctx.all_visible else ctx.masks[self.window])

    def _sdpa(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | BandedMask | SegmentMasks | RingMasks | None
    ) -> Tensor:
        """SDPA over ``k, v``; ``mask`` None: every key is visible (one decoded token)."""
        b, t, h, d = q.shape
        h_kv = k.shape[2]
        if mask is None and t == 1 and _cpu_decode_attention(q, k):  # (a GPU: SDPA's flash-decoding)
            return decode_attention(q, k, v)
        if mask is None and t == 1 and h != h_kv and (q.is_cuda or b * h_kv >= torch.get_num_threads()):
            # one query per head: fold the query heads of each KV head into its query axis,
            # [B, H_kv, H / H_kv, D], so SDPA reads each K/V head once (enable_gqa's path is
            # about 3x slower at 16K keys on the CPU). With fewer (row, KV head) pairs than CPU
            # threads the fold would leave threads idle (SDPA splits over them): a short cache
            # (long ones take decode_attention) goes through enable_gqa's H items instead,
            # about 2x faster at 1K keys with one KV head on 2 threads
            o = F.scaled_dot_product_attention(
                q.view(b, h_kv, h // h_kv, d), k.transpose(1, 2), v.transpose(1, 2)
            )  # [B, H_kv, H / H_kv, Dv]
            return o.reshape(b, 1, h, -1)
        if isinstance(mask, BandedMask):
            return banded_sdpa(q, k, v, mask)
        if isinstance(mask, SegmentMasks):
            return segment_sdpa(q, k, v, mask)
        if isinstance(mask, RingMasks):
            return mask.split.ring_attention(q, k, v, mask.doc_start)
        if mask is not None and mask.shape[-1] != k.shape[1]:
            raise RuntimeError(f"Attention: mask covers {mask.shape[-1]} keys, the layer has {k.shape[1]}")
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),  # [B, H, T, D]
            k.transpose(1, 2),  # [B, H_kv, S, D]
            v.transpose(1, 2),
            attn_mask=mask,
            enable_gqa=q.shape[2] != k.shape[2],
        )
        return o.transpose(1, 2)  # [B, T, H, D]

    def _flash(self, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext) -> Tensor:
        from flash_attn import flash_attn_varlen_func

        b, t, h, d = q.shape
        o = flash_attn_varlen_func(
            q.reshape(b * t, h, d),  # [B*T, H, D]: documents are the varlen sequences
            k.reshape(b * t, -1, d),
            v.reshape(b * t, -1, d),
            cu_seqlens_q=ctx.cu_seqlens,
            cu_seqlens_k=ctx.cu_seqlens,
            max_seqlen_q=ctx.max_seqlen,
            max_seqlen_k=ctx.max_seqlen,
            causal=True,
            window_size=(-1, -1) if self.window is None else (self.window - 1, 0),
        )
        return o.view(b, t, h, d)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token beyond 6 x the projection weights: QK^T and AV (2 * 2 * H * D
        per visible key, x3 for forward + backward), averaged over the sequence's queries."""
        return 12.0 * self.wq.weight.shape[0] * mean_visible_keys(seq_len, self.window)

    def activation_elements(self) -> int:
        """Rough elements per token kept for backward (flash/fused attention: no T x S scores)."""
        d_in, q, kv = self.wq.weight.shape[1], self.wq.weight.shape[0], self.wk.weight.shape[0]
        return d_in + 3 * q + 4 * kv  # input, q & k before/after RoPE, v, attention output

    def new_state(self, batch_size: int) -> KVState:
        return KVState.empty(self.wk.weight, batch_size, self.head_dim)

    def init_weights(self, init_std: float, out_std: float) -> None:
        for lin in (self.wq, self.wk, self.wv):
            nn.init.normal_(lin.weight, std=init_std)
        nn.init.normal_(self.wo.weight, std=out_std)


@register_mixer("attn")
def _full(cfg: ModelConfig, layer_idx: int) -> Attention:
    return Attention(cfg, window=None)


@register_mixer("swa")
def _sliding(cfg: ModelConfig, layer_idx: int) -> Attention:
    return Attention(cfg, window=cfg.attention.window)
