"""Titans (:mod:`pretrain.models.layers.titans`) under context parallelism: the rows are segments
of longer sequences (:mod:`pretrain.models.sequence_split`, ``ctx.cp``).

The memory update is nonlinear across chunks (each chunk's gradients are taken at the weights
the previous chunks left), so no prefix combination of per-segment summaries exists as for a
linear recurrence: the memory state (w0, m and s of every memory layer) is RELAYED segment to
segment in sequence order (:meth:`~pretrain.models.sequence_split.SequenceSplit.relay`). That is
exact, chunks that straddle segments included, since a scan continues from any prefix's state.

* MAG, MAL (:func:`relay_memory_scan`): only the scan is relayed. The projections, the short
  conv (a ``conv_size - 1`` halo of its inputs), the gates and the sliding-window attention (a
  ``window - 1`` halo of keys/values, :func:`cp_window_kv`) run on every segment at once.
* MAC (:func:`relay_mac`): its attention reads the memory and the memory learns from the
  attention's output, so the whole layer runs in the relay, each segment continuing the
  previous one's decoding state as a cache would (memory, conv histories and the keys/values of
  the unfinished MAC segment). MAC segments and memory chunks may straddle the split's segments
  (with packed documents they start at document positions, so no divisibility could prevent it),
  and nothing needs to divide ``seq_len / n_segments``.

What limits Titans under CP: each segment waits for the previous one's final memory, so the
memory scan (MAC: the whole layer) gets no parallel speed-up: its time is that of the whole
sequence, and a rank idles while the others run their segments. With load balancing the relay
visits the 2 cp segments in order: 2 cp - 1 hand-offs, of which 2 cp - 2 cross ranks (cp - 1
without load balancing). A hand-off is ``3 sum(H d_in d_out)`` fp32 per sample (MAG/MAL; MAC
adds its conv histories and two rings of ``segment_size`` keys/values). What CP still buys for
these layers is memory: each rank keeps only its own segments' activations.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from kernels.titans import MemoryState
from pretrain.models.context import ForwardContext, halo_mask
from pretrain.models.layers.attention import exchange_kv
from pretrain.models.sequence_split import SequenceSplit

if TYPE_CHECKING:
    from pretrain.models.layers.titans import NeuralMemory, TitansMAC, TitansState


def cp_window_kv(
    k: Tensor, v: Tensor, cp: SequenceSplit, positions: Tensor, window: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Sliding-window keys of the local rows of a split: ``k, v [B * slots, s, H, D]`` (RoPE
    applied) -> the ``window - 1`` keys/values before each segment (a halo,
    :meth:`~pretrain.models.sequence_split.SequenceSplit.tails`: ``2 (window - 1) H D`` values
    per row exchanged) followed by the segment's, ``[B * slots, window - 1 + s, H, D]``, and the
    bool mask ``[B * slots, 1, s, window - 1 + s]``: causal, inside the window, not before the
    query's document (``positions`` as ``ctx.positions`` under CP: in the document, or the
    global index without doc masking), hence never before the sequence (where the halo is zeros):
    the attention layers' :func:`~pretrain.models.layers.attention.exchange_kv` and
    :func:`~pretrain.models.context.halo_mask`."""
    k, v = exchange_kv(k, v, cp, window)
    return k, v, halo_mask(positions, window)


def relay_memory_scan(memory: NeuralMemory, x: Tensor, q: Tensor, k: Tensor, v: Tensor, ctx: ForwardContext) -> Tensor:
    """``memory.scan`` of the local rows of a split (``x [B * slots, s, d_model]``, q, k, v
    ``[B * slots, s, H, D]``), the memory relayed segment by segment in sequence order: each
    segment starts from the previous one's final :class:`MemoryState`, the first from
    ``memory.init``; a document starting inside a segment resets it as in one process. Returns
    the reads ``[B * slots, s, H, D]`` (at least fp32)."""
    cp, depth = ctx.cp, len(memory.init)
    n = x.shape[0] // cp.slots
    fresh = MemoryState.fresh(list(memory.init), n)
    like = tuple(w.new_zeros(w.shape) for w in (*fresh.w0, *fresh.m, *fresh.s))

    def step(j: int, flat: tuple[Tensor, ...] | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        flat = _touching(flat, memory.init)
        mem = fresh if flat is None else MemoryState(*(list(flat[i * depth : (i + 1) * depth]) for i in range(3)))
        reset = None if ctx.reset is None else cp.slot(ctx.reset, j)
        xs, qs, ks, vs, pos = (cp.slot(z, j) for z in (x, q, k, v, ctx.positions))
        y, mem = memory.scan(xs, qs, ks, vs, mem, pos, reset)
        return y, (*mem.w0, *mem.m, *mem.s)

    return cp.relay(step, like)


def relay_mac(mac: TitansMAC, x: Tensor, ctx: ForwardContext) -> Tensor:
    """MAC on the local rows ``[B * slots, s, d]`` of a split: the layer's own forward (with a
    cache, no split) on one segment after another in sequence order, each continuing the
    previous one's :class:`TitansState` (see the module docstring). Returns ``[B * slots, s, d]``."""
    cp = ctx.cp
    n, s = x.shape[0] // cp.slots, x.shape[1]
    like = _flat_state(mac, _relay_state(mac, n, None, 0), None)
    starts = cp.starts(s).tolist()

    def step(j: int, flat: tuple[Tensor, ...] | None) -> tuple[Tensor, tuple[Tensor, ...]]:
        st = _relay_state(mac, n, _touching(flat, mac.memory.init), starts[j])
        reset = None if ctx.reset is None else cp.slot(ctx.reset, j)
        sub = ForwardContext(positions=cp.slot(ctx.positions, j), offset=starts[j], reset=reset)
        y = mac.forward(cp.slot(x, j), sub, st)  # not __call__: the module's hooks ran once already
        return y, _flat_state(mac, st, like)

    return cp.relay(step, like)


def _touching(flat: tuple[Tensor, ...] | None, init) -> tuple[Tensor, ...] | None:
    """A received state joined to the initial memory ``init`` with weight zero: a rank whose
    segments all continue a received memory then still gives ``init`` a (zero) gradient, so
    every rank reduces the same parameters' gradients (FSDP2 reduces those that have one)."""
    if flat is None:
        return None
    anchor = sum(p.sum() for p in init) * 0
    return (flat[0] + anchor.to(flat[0].dtype), *flat[1:])


def _relay_state(mac: TitansMAC, n: int, flat: tuple[Tensor, ...] | None, start: int) -> TitansState:
    """MAC's decoding state of ``n`` rows ``start`` tokens into the sequence: fresh (rings
    allocated, so that every state has the same shapes) or rebuilt from :func:`_flat_state`'s
    tensors, copied because the rings are written in place."""
    st = mac.new_state(n)
    for kv in (st.kv, st.mem_kv):
        kv.reserve(mac.window, mac.window)
    if flat is None:
        return st
    it = iter(t.clone() for t in flat)
    st.conv = next(it)
    if mac.per_token:
        st.read_conv = next(it)
    for kv in (st.kv, st.mem_kv):
        kv.k, kv.v, kv.length = next(it), next(it), start
    depth = len(st.memory.w0)
    st.memory = MemoryState(*([next(it) for _ in range(depth)] for _ in range(3)))
    return st


def _flat_state(mac: TitansMAC, st: TitansState, like: tuple[Tensor, ...] | None) -> tuple[Tensor, ...]:
    """``st`` as the relay's tuple, cast to the dtypes of ``like`` (the receive buffers), or
    with ``like`` None zeros of its shapes (to make those buffers)."""
    ts = [st.conv] + ([st.read_conv] if mac.per_token else [])
    ts += [st.kv.k, st.kv.v, st.mem_kv.k, st.mem_kv.v, *st.memory.w0, *st.memory.m, *st.memory.s]
    if like is None:
        return tuple(t.new_zeros(t.shape) for t in ts)
    return tuple(t.to(b.dtype) for t, b in zip(ts, like))
