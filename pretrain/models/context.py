"""What every block of one forward pass shares: positions, masks, RoPE tables and the cache.

:func:`build_context` computes all of it once per forward (never per layer). Mixers read it;
only the cache's per-block states are written (in place, by the block that owns them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from pretrain.models.layers.rope import rope_tables
from pretrain.models.sequence_split import SequenceSplit


@dataclass
class Cache:
    """Decoding state: one entry per block name (each mixer's own state object, or None) and
    the number of tokens already consumed, which is where RoPE positions continue."""

    states: dict[str, Any]
    offset: int = 0


@dataclass
class ForwardContext:
    positions: Tensor
    """[B, T] int64: position inside the document when doc masking is on, else the absolute
    index offset + t. Drives RoPE, document resets and Mamba's conv mask."""
    offset: int = 0
    """Tokens already in the cache (0 without one)."""
    reset: Tensor | None = None
    """[B, T] bool, True at document starts (doc masking only): recurrent mixers drop their state."""
    cache: Cache | None = None
    rope: tuple[Tensor, Tensor] | None = None
    """cos, sin [B, T, head_dim // 2] shared by all rotary attention layers."""
    masks: dict[int | None, Tensor | BandedMask | SegmentMasks | RingMasks] = field(default_factory=dict)
    """Attention window (None: full) -> bool mask [B, 1, T, S], True where a query may attend.
    Keys are the cached keys this window keeps followed by the T new ones. A window over more
    than 2 x window new tokens and no cached ones gets a :class:`BandedMask` instead. Under
    context parallelism (:attr:`cp`) the keys are those the layer exchanged: full attention
    gets :class:`SegmentMasks` over the gathered sequence (:class:`RingMasks` under ring
    attention), a window the mask of its ``window - 1`` halo keys followed by the row's own
    (:func:`halo_mask`, or a :class:`BandedMask` with ``halo``)."""
    all_visible: bool = False
    """One new token per row whose query sees every key its layer keeps (decoding without
    document masks): attention then needs no mask, and a window layer may read its ring of
    keys in slot order. The masks are still built on demand for layers that ask."""
    continuing: bool = False
    """Every row continues the one document of its cache: positions are ``offset + t`` with
    ``offset > 0`` (no position ids given), so there is no document start among the new tokens
    even where :attr:`reset` is set. A recurrent mixer's decoding step then needs neither resets
    nor position masks."""
    cu_seqlens: Tensor | None = None
    """[n_docs + 1] int32 document boundaries of the flattened batch, set only for flash-attn."""
    max_seqlen: int = 0
    cp: SequenceSplit | None = None
    """Context parallelism (training only, never with a cache): the rows are segments of longer
    sequences (:mod:`pretrain.models.sequence_split`), ``positions`` are global, and the mixers
    exchange halos, keys/values or states through it. ``masks`` then hold per-segment masks
    (see :attr:`masks`), built here once for every layer."""


@dataclass(frozen=True)
class BandedMask:
    """The mask of a sliding-window layer over a long sequence with no cached keys, kept per query
    block: attention (:func:`~pretrain.models.layers.attention.banded_sdpa`) then works on
    query blocks of ``window`` tokens against their ``2 window - 1`` keys, so time and memory
    grow as T * window instead of T^2 (a dense ``[B, 1, T, T]`` mask at T = 16K is 256 MB)."""

    window: int
    blocks: Tensor
    """Bool ``[B, n_blocks, window, 2 window - 1]`` (:func:`band_blocks`), built once per forward
    and shared by every layer of this window."""
    halo: bool = False
    """The keys start ``window - 1`` tokens before the queries (a context-parallel halo,
    :meth:`~pretrain.models.sequence_split.SequenceSplit.tails`) instead of with them."""


@dataclass(frozen=True)
class SegmentMasks:
    """Full causal attention of context-parallel rows (:attr:`ForwardContext.cp`) over the
    gathered sequence: the queries of local slot j (global segment g, first token ``s_j = g *
    seg_len``) attend only the first ``s_j + seg_len`` keys, so a segment late in the sequence
    costs more and the head-tail split evens it out. One SDPA call per slot."""

    masks: tuple[Tensor, ...]
    """Slot j's bool ``[B, 1, seg_len, s_j + seg_len]`` (:func:`attention_mask` with offset
    ``s_j``), shared by every full-attention layer of the forward."""


@dataclass(frozen=True)
class RingMasks:
    """Full causal attention of context-parallel rows under ring attention (``split.ring``):
    the keys/values stay with their segments and the masks are built per (query segment,
    key segment) block inside :meth:`~pretrain.models.sequence_split.SequenceSplit.ring_attention`
    from the global token indices and ``doc_start``, so no ``s x T`` mask is kept."""

    split: SequenceSplit
    doc_start: Tensor | None
    """``[B * slots, seg_len]`` int64 global index of each query's document start (None
    without document masking: one causal stream per row)."""


def band_blocks(positions: Tensor, w: int, doc_masking: bool, halo: bool = False) -> Tensor:
    """Bool ``[B, n_blocks, w, 2 w - 1]`` for ``positions [B, T]``: query j of block i (token
    i w + j) may see key slot l (token i w + l - (w - 1)): causal, inside the window, not before
    the sequence and (doc masking) not before its document. Queries past T (padding) see
    themselves.

    ``halo``: the row is a context-parallel segment whose ``w - 1`` earlier tokens are keys too
    (:attr:`BandedMask.halo`) and ``positions`` are global (in-document, or the global token
    index without doc masking), so the document check alone keeps keys inside the sequence."""
    b, t = positions.shape
    nb = -(-t // w)
    dev = positions.device
    j = torch.arange(w, device=dev)[:, None]  # [w, 1] query in block
    l = torch.arange(2 * w - 1, device=dev)[None, :]  # [1, L] key slot
    ki = torch.arange(nb, device=dev)[:, None, None] * w + l - (w - 1)  # [nb, 1, L] key index in the row
    allowed = (l >= j) & (l <= j + w - 1)  # [w, L]
    if not halo:
        allowed = allowed & (ki >= 0)  # [nb, w, L]
    if doc_masking or halo:
        pos = torch.nn.functional.pad(positions, (0, nb * w - t))  # padding: its own document
        start = (torch.arange(nb * w, device=dev) - pos).view(b, nb, w, 1)  # each query's document start
        return allowed & (ki >= start)  # [B, nb, w, L]
    return allowed.expand(b, nb, w, 2 * w - 1)


def cached_keys(offset: int, window: int | None) -> int:
    """How many past keys an attention layer keeps in its cache after ``offset`` tokens."""
    return offset if window is None else min(offset, window - 1)


def attention_mask(positions: Tensor, offset: int, window: int | None, doc_masking: bool) -> Tensor:
    """Bool ``[B, 1, T, S]``: causal, within ``window`` and (with doc masking) same document.

    Query t has absolute index i = offset + t; its document started at i - positions[t], so a
    key j is in the same document iff j >= that start (a key is never after its query).
    """
    t = positions.shape[1]
    q = offset + torch.arange(t, device=positions.device)  # [T]
    k = torch.arange(offset - cached_keys(offset, window), offset + t, device=positions.device)  # [S]
    dist = q[:, None] - k[None, :]  # [T, S]
    allowed = dist >= 0
    if window is not None:
        allowed = allowed & (dist < window)
    allowed = allowed.unsqueeze(0)  # [1, T, S]
    if doc_masking:
        doc_start = q - positions  # [B, T]
        allowed = allowed & (k[None, None, :] >= doc_start.unsqueeze(-1))  # [B, T, S]
    return allowed.expand(positions.shape[0], t, k.numel()).unsqueeze(1)


def halo_mask(positions: Tensor, window: int) -> Tensor:
    """Bool ``[B, 1, T, window - 1 + T]`` of a sliding window over context-parallel rows: the
    keys are the ``window - 1`` tokens before each row (its halo) followed by its ``T`` own.
    ``positions [B, T]`` are global (in-document with doc masking, else the global token
    index), so one check, key not before the query's document start, also drops halo keys that
    would precede the sequence (zeros in the halo). Equals :func:`attention_mask` with the
    row's global offset, left-padded with False where fewer than ``window - 1`` tokens precede."""
    b, t = positions.shape
    n = window - 1
    dev = positions.device
    q = n + torch.arange(t, device=dev)  # [T] query index among the keys
    k = torch.arange(n + t, device=dev)  # [S]
    dist = q[:, None] - k[None, :]  # [T, S]
    doc_start = q - positions  # [B, T] in key coordinates
    allowed = (dist >= 0) & (dist < window) & (k[None, None, :] >= doc_start.unsqueeze(-1))  # [B, T, S]
    return allowed.unsqueeze(1)


def segment_masks(
    positions: Tensor, split: SequenceSplit, window: int | None, doc_masking: bool, seg_len: int
) -> Tensor | BandedMask | SegmentMasks | RingMasks:
    """The mask of ``window`` (None: full) for context-parallel rows ``positions [B * slots,
    seg_len]`` (global): :class:`SegmentMasks` for full attention (:class:`RingMasks` when
    ``split.ring``); for a window, :func:`halo_mask`, or block-banded over segments longer
    than ``2 window`` (:class:`BandedMask` with ``halo``)."""
    if window is None and split.ring:
        index = split.positions(positions.shape[0], seg_len, positions.device)  # global token indices
        return RingMasks(split, index - positions if doc_masking else None)
    if window is None:
        starts = split.starts(seg_len).tolist()
        return SegmentMasks(tuple(
            attention_mask(split.slot(positions, j), s, None, doc_masking) for j, s in enumerate(starts)
        ))
    if banded(window, seg_len, 0):
        return BandedMask(window, band_blocks(positions, window, True, halo=True), halo=True)
    return halo_mask(positions, window)


def doc_boundaries(positions: Tensor) -> tuple[Tensor, int]:
    """cu_seqlens (int32) and the longest document of the flattened ``[B*T]`` batch, for varlen
    kernels. Every row also starts a segment."""
    starts = positions == 0
    starts[:, 0] = True
    idx = torch.nonzero(starts.flatten()).flatten()
    cu = torch.cat([idx, idx.new_tensor([positions.numel()])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


def build_context(
    batch: int,
    seq: int,
    device: torch.device,
    position_ids: Tensor | None,
    cache: Cache | None,
    doc_masking: bool,
    mask_windows: set[int | None],
    rope: tuple[int, float] | None,
    flash: bool,
    cp: SequenceSplit | None = None,
) -> ForwardContext:
    """Everything the blocks of one forward need.

    ``mask_windows``: attention windows whose masks are needed; ``rope``: (head_dim, theta) or
    None; ``flash``: the attention layers will call flash-attn (varlen) instead of SDPA.
    Without doc masking, ``position_ids`` are ignored: the sample is one causal stream.
    ``cp``: the rows are the segments ``cp`` says (``seq`` tokens each; no cache, no flash).
    """
    offset = cache.offset if cache is not None else 0
    if cp is not None and (cache is not None or flash):
        raise ValueError("context parallelism is for training: no cache and no flash-attn path")
    if position_ids is not None and position_ids.shape != (batch, seq):
        raise ValueError(f"position_ids {tuple(position_ids.shape)} must be {(batch, seq)}")
    if doc_masking and position_ids is not None:
        positions = position_ids.to(device=device, dtype=torch.long)
    elif cp is not None:
        positions = cp.positions(batch, seq, device)
    else:
        positions = (offset + torch.arange(seq, device=device)).expand(batch, seq)
    ctx = ForwardContext(positions=positions, offset=offset, cache=cache, cp=cp)
    ctx.continuing = cache is not None and offset > 0 and not (doc_masking and position_ids is not None)
    if doc_masking:
        ctx.reset = positions == 0
    if rope is not None:
        ctx.rope = rope_tables(positions, *rope)
    if cp is not None:
        cp.start_forward()
        ctx.masks = {w: segment_masks(positions, cp, w, doc_masking, seq) for w in mask_windows}
        return ctx
    if flash:
        ctx.cu_seqlens, ctx.max_seqlen = doc_boundaries(positions)  # no cache here: offset is 0
    elif seq == 1 and not (doc_masking and position_ids is not None):
        ctx.all_visible = True
        ctx.masks = _MasksOnDemand(positions, offset, doc_masking)
    else:
        ctx.masks = {
            w: BandedMask(w, band_blocks(positions, w, doc_masking)) if banded(w, seq, offset) else
            attention_mask(positions, offset, w, doc_masking)
            for w in mask_windows
        }
    return ctx


def banded(window: int | None, seq: int, offset: int) -> bool:
    """Whether a window layer attends block by block (:class:`BandedMask`): a long sequence and
    no cached keys (training, a first prefill)."""
    return window is not None and offset == 0 and seq > 2 * window


class _MasksOnDemand(dict):
    """``ctx.masks`` of a decoding step: a window's mask is built when a layer first asks."""

    def __init__(self, positions: Tensor, offset: int, doc_masking: bool) -> None:
        super().__init__()
        self._args = positions, offset, doc_masking

    def __missing__(self, window: int | None) -> Tensor:
        positions, offset, doc_masking = self._args
        self[window] = mask = attention_mask(positions, offset, window, doc_masking)
        return mask
