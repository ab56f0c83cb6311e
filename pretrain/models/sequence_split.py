"""Context parallelism as the model sees it: each sample's sequence cut into equal segments,
some of them held by this process as rows of its batch.

A :class:`SequenceSplit` says which segments are local and moves the little that crosses
segments: the last tokens before a segment (halos, for convolutions and sliding windows), the
whole sequence (keys/values of full attention), the recurrent states at segment boundaries
(a prefix combination of ``(decay, state)`` pairs), a state relayed segment by segment (Titans'
nonlinear memory) and sums over the sequence (MoE statistics). The mixers call it through
``ctx.cp``; they never see a process group.

Layout. The sequence of T tokens is ``n_segments`` segments of ``seg_len`` tokens; a process
holds ``local`` (their global indices, in slot order) of every sample, as batch rows ``b *
len(local) + j`` (sample-major, slot-minor): a local batch is ``[B * len(local), seg_len]``.
With causal load balancing (the zig-zag / head-tail split of ring attention), ``cp`` ranks cut
the sequence into ``2 cp`` segments and rank r holds segments ``r`` and ``2 cp - 1 - r``, so
every rank attends over the same number of keys.

:class:`LocalSplit` holds every segment in one process (in any order): the executable spec of
the exchanges, and what the tests compare the distributed split (``parallel/context.py``,
which only replaces :meth:`SequenceSplit.gather_segments`, :meth:`SequenceSplit.relay`,
:meth:`SequenceSplit.all_sum` and :meth:`SequenceSplit.ring_attention`) against; its outputs
equal the unsplit model's. Ring attention (:meth:`SequenceSplit.ring_attention`, with
``ring`` set) is the same blockwise math in both: a loop over segments here, a ring of
point-to-point exchanges there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pretrain.models.ring_attention import block_forward, block_mask, merge, to_heads_last

State = tuple[Tensor, ...]


def load_balanced_segments(cp: int, rank: int, load_balance: bool) -> tuple[int, ...]:
    """The global segment indices rank ``rank`` of ``cp`` holds: ``(r,)`` of ``cp`` segments, or
    with ``load_balance`` ``(r, 2 cp - 1 - r)`` of ``2 cp`` (the head-tail split)."""
    if not 0 <= rank < cp:
        raise ValueError(f"context-parallel rank {rank} is not in [0, {cp})")
    return (rank, 2 * cp - 1 - rank) if load_balance else (rank,)


class SequenceSplit:
    """Segments ``local`` of ``n_segments`` held here (see the module docstring).

    Subclasses implement :meth:`gather_segments` (every segment's rows, in global order) and
    :meth:`relay`; everything else is built on them, identically for one process and many.
    """

    ring: bool = False
    """Full attention circulates the keys/values around the processes (:meth:`ring_attention`,
    parallel.cp_attention = 'ring') instead of gathering them; set by whoever builds the split."""

    def __init__(self, n_segments: int, local: Sequence[int]) -> None:
        if not local or len(set(local)) != len(local) or not all(0 <= g < n_segments for g in local):
            raise ValueError(f"local segments {tuple(local)} must be distinct indices in [0, {n_segments})")
        self.n_segments = n_segments
        self.local = tuple(local)

    # -- layout -------------------------------------------------------------------------
    @property
    def slots(self) -> int:
        """Segments per sample held here (rows per sample of the local batch)."""
        return len(self.local)

    def seg_len(self, seq_len: int) -> int:
        """Tokens per segment of a ``seq_len`` sequence; ValueError when it does not divide."""
        if seq_len % self.n_segments:
            raise ValueError(f"sequence length {seq_len} does not divide into {self.n_segments} segments")
        return seq_len // self.n_segments

    def shard(self, x: Tensor) -> Tensor:
        """``x [B, T, ...]`` (a whole batch: tokens, labels, position ids) -> this process's rows
        ``[B * slots, T / n_segments, ...]``."""
        b, t = x.shape[:2]
        s = self.seg_len(t)
        segs = x.reshape(b, self.n_segments, s, *x.shape[2:])[:, list(self.local)]
        return segs.reshape(b * self.slots, s, *x.shape[2:])

    def starts(self, seg_len: int, device: torch.device | None = None) -> Tensor:
        """int64 ``[slots]``: the global index of each local segment's first token."""
        return torch.tensor(self.local, device=device) * seg_len

    def positions(self, batch_rows: int, seg_len: int, device: torch.device) -> Tensor:
        """``[batch_rows, seg_len]`` int64 global token indices of the local rows (the positions
        of an undivided sequence without document masking)."""
        pos = self.starts(seg_len, device)[:, None] + torch.arange(seg_len, device=device)  # [slots, s]
        return pos.repeat(batch_rows // self.slots, 1)

    def slot(self, x: Tensor, j: int) -> Tensor:
        """Rows ``[B, ...]`` of local slot ``j`` from local rows ``[B * slots, ...]``."""
        return x.unflatten(0, (-1, self.slots))[:, j]

    def from_slots(self, parts: Sequence[Tensor]) -> Tensor:
        """The inverse of :meth:`slot`: per-slot ``[B, ...]`` tensors -> rows ``[B * slots, ...]``."""
        return torch.stack(list(parts), dim=1).flatten(0, 1)

    # -- exchanges ----------------------------------------------------------------------
    def start_forward(self) -> None:
        """Called once at the start of every forward (by ``build_context``): a split that
        orders its exchanges within one forward starts a new order here."""
    def gather_segments(self, x: Tensor) -> Tensor:
        """Local rows ``[B * slots, ...]`` -> every segment's ``[B, n_segments, ...]`` in global
        order, differentiable (gradients return to the process that holds each segment)."""
        raise NotImplementedError

    def relay(self, step: Callable[[int, State | None], tuple[Tensor, State]], like: State) -> Tensor:
        """Run ``step`` over the segments in global order, each given the state the previous
        segment's step returned (None for the first segment): ``step(j, state_in) -> (out_j,
        state_out)`` computes local slot ``j``. ``like``: tensors shaped as a state (for the
        receive buffers). Returns the outputs as rows ``[B * slots, ...]``. Differentiable
        through the states. Each segment waits for the previous one: no overlap across
        segments (Titans' memory update is nonlinear, so nothing cheaper is exact)."""
        raise NotImplementedError

    def ring_attention(self, q: Tensor, k: Tensor, v: Tensor, doc_start: Tensor | None) -> Tensor:
        """Causal full attention of the local rows without gathering the keys/values (ring
        attention, Liu et al. 2023): ``q [B * slots, s, H, D]``, ``k [B * slots, s, H_kv, D]``,
        ``v [B * slots, s, H_kv, Dv]`` (this process's segments, after RoPE), ``doc_start [B *
        slots, s]`` int64 global index of each query's document start (None without document
        masking) -> ``[B * slots, s, H, Dv]`` in q's dtype (scale 1/sqrt(D), GQA as SDPA's).
        Each local segment's queries attend every segment not after it, one block at a time
        (:mod:`pretrain.models.ring_attention`); the distributed split sends each process's
        blocks around the ring of processes (cp - 1 hops forward; backward again, with the
        keys'/values' gradients), never holding more than two visiting blocks. Differentiable."""
        raise NotImplementedError

    def attach(self, h: Tensor) -> Tensor:
        """``h`` joined to the exchanges of this forward (the model calls it on its output): a
        split that orders its exchanges' backward through the graph needs them to reach the
        loss. The identity here."""
        return h

    def all_sum(self, x: Tensor) -> Tensor:
        """The sum of ``x`` over the processes of the split (identity in one process): for
        statistics of the whole sequence such as MoE expert loads. Differentiable."""
        return x

    def gather(self, x: Tensor) -> Tensor:
        """Local rows ``[B * slots, s, ...]`` -> the whole sequences ``[B, n_segments * s, ...]``
        in token order (e.g. keys/values for full attention)."""
        g = self.gather_segments(x)  # [B, n, s, ...]
        return g.flatten(1, 2)

    def tails(self, x: Tensor, n: int) -> Tensor:
        """The ``n`` tokens before each local segment: ``x [B * slots, s, ...]`` -> ``[B * slots,
        n, ...]``, zeros where they would precede the sequence (a halo: ``d_conv - 1`` inputs of
        a causal convolution, ``window - 1`` keys of a sliding window). Only the last ``min(n,
        s)`` tokens of each segment are exchanged."""
        s = x.shape[1]
        m = min(n, s)
        g = self.gather_segments(x[:, s - m :])  # [B, n_seg, m, ...]
        b = g.shape[0]
        need = -(-n // m)  # previous segments that contribute
        pad = g.new_zeros(b, need, *g.shape[2:])
        seq = torch.cat([pad, g], dim=1)  # [B, need + n_seg, m, ...]
        out = [seq[:, self.local[j] : self.local[j] + need].flatten(1, 2)[:, need * m - n :] for j in range(self.slots)]
        return self.from_slots(out)

    def pass_states(self, decay: Tensor, state: Tensor) -> Tensor:
        """State passing for a linear recurrence ``S_t = a_t * S_{t-1} + u_t`` (``*``
        elementwise, broadcasting ``decay`` against ``state``): given each local segment's total
        decay (the product of its ``a_t``; zero when a document starts inside it) and its final
        state from a zero initial state, returns the state each local segment starts from,
        ``S_in[g] = decay[g - 1] * S_in[g - 1] + state[g - 1]``, ``S_in[0] = 0``. Shapes ``[B *
        slots, ...]``; one exchange of the pairs, never of the sequence (Yang et al.'s chunkwise
        form applied across devices, as in fla's and prime-rl's state-passing CP)."""
        rows = state.shape[0]
        pair = torch.cat([decay.reshape(rows, -1).to(state.dtype), state.reshape(rows, -1)], dim=1)
        pair = self.gather_segments(pair)  # [B, n_seg, |decay| + |state|]: one exchange for both
        a = pair[..., : decay[0].numel()].unflatten(-1, decay.shape[1:])  # [B, n_seg, ...]
        u = pair[..., decay[0].numel() :].unflatten(-1, state.shape[1:])
        s_in = [torch.zeros_like(u[:, 0])]
        for g in range(1, self.n_segments):
            s_in.append(a[:, g - 1] * s_in[-1] + u[:, g - 1])
        return self.from_slots([s_in[g] for g in self.local])


class LocalSplit(SequenceSplit):
    """Every segment in this one process, rows in the order ``local`` gives (a permutation of
    ``range(n_segments)``): the reference the distributed split is tested against."""

    def __init__(self, n_segments: int, order: Sequence[int] | None = None) -> None:
        order = tuple(range(n_segments)) if order is None else tuple(order)
        if sorted(order) != list(range(n_segments)):
            raise ValueError(f"LocalSplit: order {order} must be a permutation of range({n_segments})")
        super().__init__(n_segments, order)

    @classmethod
    def like(cls, cp: int, load_balance: bool) -> "LocalSplit":
        """All the segments of a ``cp``-rank split, in rank order (rank 0's slots, then rank
        1's, ...), so one process sees the distributed layout's row order."""
        order = [g for r in range(cp) for g in load_balanced_segments(cp, r, load_balance)]
        return cls(len(order), order)

    def gather_segments(self, x: Tensor) -> Tensor:
        rows = x.unflatten(0, (-1, self.slots))  # [B, slots, ...]
        inverse = [self.local.index(g) for g in range(self.n_segments)]
        return rows[:, inverse]

    def relay(self, step: Callable[[int, State | None], tuple[Tensor, State]], like: State) -> Tensor:
        outs: list[Tensor | None] = [None] * self.slots
        state = None
        for g in range(self.n_segments):
            j = self.local.index(g)
            outs[j], state = step(j, state)
        return self.from_slots(outs)

    def ring_attention(self, q: Tensor, k: Tensor, v: Tensor, doc_start: Tensor | None) -> Tensor:
        s = q.shape[1]
        outs = []
        for j, g in enumerate(self.local):
            d = None if doc_start is None else self.slot(doc_start, j)
            out = lse = None
            for prev in range(g + 1):  # the segments not after g: the ring's blocks, in one process
                i = self.local.index(prev)
                mask = block_mask(g * s, prev * s, s, d, q.device)
                o, l = block_forward(self.slot(q, j), self.slot(k, i), self.slot(v, i), mask)
                out, lse = (o, l) if out is None else merge(out, lse, o, l)
            outs.append(to_heads_last(out, q.dtype))
        return self.from_slots(outs)
