"""Context parallelism: every sample's sequence split over the 'cp' ranks of the mesh.

The model side is :mod:`pretrain.models.sequence_split`: a rank's rows are segments of the
sequences, and the mixers exchange only what crosses segment boundaries (halos, gathered
keys/values, recurrent states, Titans' relayed memory). :class:`DistributedSplit` implements the
exchanges with collectives over the cp process group:

- :meth:`~DistributedSplit.gather_segments`: one all-gather of the rows (its backward sums
  every rank's gradient of a segment on the rank that holds it);
- :meth:`~DistributedSplit.all_sum`: an all-reduce (its backward all-reduces the gradients);
- :meth:`~DistributedSplit.relay`: point-to-point sends of a state from the rank holding one
  segment to the rank holding the next. The sends and receives of one forward are chained
  through a scalar token so that the backward runs them in exactly the reverse order on every
  rank (see :class:`DistributedSplit`);
- :meth:`~DistributedSplit.ring_attention` (parallel.cp_attention = 'ring'): every rank's
  keys/values travel around the ring of cp ranks by non-blocking point-to-point exchanges
  (each rank sends to the next and receives from the previous at once), forward and backward
  (:class:`_RingAttention`).

Data: every cp rank of a data-parallel rank reads the same batch and keeps its segments
(:meth:`~pretrain.models.sequence_split.SequenceSplit.shard`); FSDP shards and averages the
gradients over dp_shard x cp (torchtitan's 'dp_shard_cp'), so each rank's mean loss over its
tokens averages to the mean over the whole sequences.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function

from pretrain.models.ring_attention import (
    accumulation_dtype, block_backward, block_forward, block_mask, merge, to_heads_last,
)
from pretrain.config.parallel import FULL_ATTENTION
from pretrain.models.sequence_split import SequenceSplit, State, load_balanced_segments


class DistributedSplit(SequenceSplit):
    """This rank's segments of a ``cp``-way split over ``group`` (ranks in group order hold
    :func:`~pretrain.models.sequence_split.load_balanced_segments` ``(cp, rank, load_balance)``).

    Every exchange of one forward takes and returns a scalar token (a chain through the autograd
    graph, attached to the output by :meth:`attach`), so the backward runs the exchanges in
    exactly the reverse order on every rank: ranks whose graphs differ (a relay's sender and
    receiver) would otherwise order independent branches differently and each wait on the
    other's collective."""

    def __init__(self, group: dist.ProcessGroup, load_balance: bool) -> None:
        self.group = group
        self.cp = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.owned = [load_balanced_segments(self.cp, r, load_balance) for r in range(self.cp)]
        super().__init__(self.cp * len(self.owned[0]), self.owned[self.rank])
        self.owner = {g: r for r, segs in enumerate(self.owned) for g in segs}
        self._token: Tensor | None = None

    def start_forward(self) -> None:
        self._token = None

    def attach(self, h: Tensor) -> Tensor:
        return h if self._token is None else h + self._token.to(h.dtype) * 0

    def _take_token(self, like: Tensor) -> Tensor:
        if self._token is None:
            self._token = torch.zeros((), device=like.device, requires_grad=True)
        return self._token

    def gather_segments(self, x: Tensor) -> Tensor:
        self._token, parts = _AllGather.apply(self._take_token(x), self.group, x)  # [cp, B * slots, ...]
        by_segment: list[Tensor | None] = [None] * self.n_segments
        for r in range(self.cp):
            rows = parts[r].unflatten(0, (-1, self.slots))  # [B, slots, ...]
            for j, g in enumerate(self.owned[r]):
                by_segment[g] = rows[:, j]
        return torch.stack(by_segment, dim=1)

    def all_sum(self, x: Tensor) -> Tensor:
        self._token, total = _AllReduce.apply(self._take_token(x), self.group, x)
        return total

    def relay(self, step: Callable[[int, State | None], tuple[Tensor, State]], like: State) -> Tensor:
        outs: list[Tensor | None] = [None] * self.slots
        state: State | None = None
        for j, g in sorted(enumerate(self.local), key=lambda jg: jg[1]):
            if g > 0 and self.owner[g - 1] != self.rank:
                src = dist.get_global_rank(self.group, self.owner[g - 1])
                self._token, *received = _Recv.apply(self._take_token(like[0]), src, self.group, *like)
                state = tuple(received)
            outs[j], state = step(j, state)
            if g + 1 < self.n_segments and self.owner[g + 1] != self.rank:
                dst = dist.get_global_rank(self.group, self.owner[g + 1])
                self._token = _Send.apply(self._take_token(state[0]), dst, self.group, *state)
        return self.from_slots(outs)

    def ring_attention(self, q: Tensor, k: Tensor, v: Tensor, doc_start: Tensor | None) -> Tensor:
        self._token, out = _RingAttention.apply(self._take_token(q), self, q, k, v, doc_start)
        return out

    def ring_exchange(self, send: Tensor) -> Callable[[], Tensor]:
        """Start one hop of the ring: ``send`` to the next rank of the group, a tensor like it
        from the previous one (non-blocking, both at once, so no rank waits on another's send).
        Returns a function that waits for both and returns the received tensor (and lets go of
        the requests, which would keep ``send`` alive)."""
        nxt = dist.get_global_rank(self.group, (self.rank + 1) % self.cp)
        prv = dist.get_global_rank(self.group, (self.rank - 1) % self.cp)
        recv = torch.empty_like(send)
        works = dist.batch_isend_irecv(
            [dist.P2POp(dist.isend, send, nxt, self.group), dist.P2POp(dist.irecv, recv, prv, self.group)]
        )

        def arrived() -> Tensor:
            while works:
                works.pop().wait()
            return recv

        return arrived

    def ring_pairs(self, owner: int, s: int, doc_start: Tensor | None, device: torch.device):
        """The (local slot j, slot i of rank ``owner``'s block, mask) pairs of one ring step:
        every local segment against every segment of the visiting block not after it (a block
        wholly in the query's future is skipped)."""
        for j, g in enumerate(self.local):
            d = None if doc_start is None else self.slot(doc_start, j)
            for i, h in enumerate(self.owned[owner]):
                if h <= g:
                    yield j, i, block_mask(g * s, h * s, s, d, device)


class _RingAttention(Function):
    """Ring attention (Liu et al. 2023) over the cp ranks of a :class:`DistributedSplit`.

    Forward: cp steps; at step t a rank holds the keys/values (one tensor ``[B * slots, s,
    H_kv, D + Dv]``) of rank ``rank - t``, attends its queries to them (:func:`block_forward`,
    merged by log-sum-exp) while the next block is already on its way: cp - 1 hops. Saves only
    the local q, k, v, the output and the log-sum-exp. Backward: the keys/values go around
    again together with float32 (float64 for float64) accumulators of their gradients, each
    rank adding its queries' share (:func:`block_backward`, recomputed from the saved
    log-sum-exp); after the last step one more hop returns every block's accumulated gradient
    to its owner (so the accumulators make cp hops, the keys/values cp - 1). A rank
    holds at most two visiting blocks (the one it works on and the one arriving), and their
    gradient accumulators in the backward."""

    @staticmethod
    def forward(ctx, token: Tensor, split: DistributedSplit, q: Tensor, k: Tensor, v: Tensor, doc_start: Tensor | None):
        kv = torch.cat([k, v], dim=-1).contiguous()  # one message per hop
        acc: list[tuple[Tensor, Tensor] | None] = [None] * split.slots
        for t in range(split.cp):
            if t + 1 < split.cp:
                arrived = split.ring_exchange(kv)  # the next block travels while this one is used
            _attend_block(split, (split.rank - t) % split.cp, q, kv, k.shape[-1], doc_start, acc)
            if t + 1 < split.cp:
                kv = arrived()
        out = split.from_slots([to_heads_last(o, q.dtype) for o, _ in acc])
        lse = torch.stack([lse for _, lse in acc], dim=1)  # [B, slots, H_kv, G, s]
        ctx.split = split
        ctx.save_for_backward(q, k, v, out, lse, doc_start)
        return token.detach().clone(), out

    @staticmethod
    def backward(ctx, g_token: Tensor | None, grad: Tensor | None):
        split: DistributedSplit = ctx.split
        q, k, v, out, lse, doc_start = ctx.saved_tensors
        d = k.shape[-1]
        grad = torch.zeros_like(out) if grad is None else grad
        b, h_kv = lse.shape[0], lse.shape[2]
        acc = accumulation_dtype(q.dtype)

        def heads(x: Tensor) -> Tensor:  # [B * slots, s, H, Dv] -> [B, slots, H_kv, G, s, Dv]
            return x.to(acc).unflatten(0, (b, split.slots)).unflatten(3, (h_kv, -1)).permute(0, 1, 3, 4, 2, 5)

        g_out = heads(grad)
        delta = (g_out * heads(out)).sum(-1)  # [B, slots, H_kv, G, s]
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.cat([k, v], dim=-1).contiguous()
        dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
        for t in range(split.cp):
            if t + 1 < split.cp:
                arrived = split.ring_exchange(kv)
            _grad_block(split, (split.rank - t) % split.cp, q, kv, d, doc_start, (lse, g_out, delta), dq, dkv)
            if t + 1 < split.cp:
                kv = arrived()
            # the gradients of the block just used go on with it (after the last step: to its
            # owner), after the keys/values: the same order on every rank
            dkv = split.ring_exchange(dkv)()
        return (_zero_if_none(g_token), None, dq.to(q.dtype), dkv[..., :d].to(k.dtype), dkv[..., d:].to(v.dtype), None)


def _attend_block(
    split: DistributedSplit, owner: int, q: Tensor, kv: Tensor, d: int, doc_start: Tensor | None,
    acc: list[tuple[Tensor, Tensor] | None],
) -> None:
    """Merge into ``acc`` (per local slot: output, log-sum-exp) the attention of the local
    queries to the block ``kv`` of rank ``owner``."""
    for j, i, mask in split.ring_pairs(owner, q.shape[1], doc_start, q.device):
        kb, vb = split.slot(kv, i).split([d, kv.shape[-1] - d], dim=-1)
        o, lse = block_forward(split.slot(q, j), kb, vb, mask)
        acc[j] = (o, lse) if acc[j] is None else merge(*acc[j], o, lse)


def _grad_block(
    split: DistributedSplit, owner: int, q: Tensor, kv: Tensor, d: int, doc_start: Tensor | None,
    saved: tuple[Tensor, Tensor, Tensor], dq: Tensor, dkv: Tensor,
) -> None:
    """Add to ``dq`` (local queries) and ``dkv`` (the visiting block's accumulators)
    the gradients of the local queries' attention to the block ``kv`` of rank ``owner``;
    ``saved``: the final log-sum-exp, output gradient and delta, ``[B, slots, ...]``."""
    lse, g_out, delta = saved
    dq_rows, dkv_rows = dq.unflatten(0, (-1, split.slots)), dkv.unflatten(0, (-1, split.slots))
    for j, i, mask in split.ring_pairs(owner, q.shape[1], doc_start, q.device):
        kb, vb = split.slot(kv, i).split([d, kv.shape[-1] - d], dim=-1)
        dqb, dkb, dvb = block_backward(split.slot(q, j), kb, vb, mask, lse[:, j], g_out[:, j], delta[:, j])
        dq_rows[:, j] += dqb
        dkv_rows[:, i] += torch.cat([dkb, dvb], dim=-1)


class _AllGather(Function):
    """``x`` of every rank stacked ``[cp, ...]``; backward: this rank's share of the summed
    gradients (a reduce-scatter on NCCL, an all-reduce elsewhere: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, token: Tensor, group: dist.ProcessGroup, x: Tensor):
        ctx.group = group
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return token.detach().clone(), torch.stack(parts)

    @staticmethod
    def backward(ctx, g_token: Tensor | None, grad: Tensor):
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            mine = torch.empty_like(grad[0])
            dist.reduce_scatter_tensor(mine, grad, group=ctx.group)
        else:
            dist.all_reduce(grad, group=ctx.group)
            mine = grad[dist.get_rank(ctx.group)]
        return _zero_if_none(g_token), None, mine


class _AllReduce(Function):
    """The sum of ``x`` over the ranks; backward: the sum of the gradients (every rank's loss
    depends on every rank's ``x``)."""

    @staticmethod
    def forward(ctx, token: Tensor, group: dist.ProcessGroup, x: Tensor):
        ctx.group = group
        total = x.detach().clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total, group=group)
        return token.detach().clone(), total

    @staticmethod
    def backward(ctx, g_token: Tensor | None, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return _zero_if_none(g_token), None, grad


class _Send(Function):
    """Forward: send ``state`` to global rank ``dst``; backward: receive its gradient from there."""

    @staticmethod
    def forward(ctx, token: Tensor, dst: int, group: dist.ProcessGroup, *state: Tensor) -> Tensor:
        ctx.dst, ctx.group = dst, group
        ctx.like = [(s.shape, s.dtype, s.device) for s in state]
        for s in state:
            dist.send(s.detach().contiguous(), dst, group=group)
        return token.detach().clone()

    @staticmethod
    def backward(ctx, g_token: Tensor | None):
        grads = []
        for shape, dtype, device in ctx.like:
            buf = torch.empty(shape, dtype=dtype, device=device)
            dist.recv(buf, ctx.dst, group=ctx.group)
            grads.append(buf)
        return (_zero_if_none(g_token), None, None, *grads)


class _Recv(Function):
    """Forward: receive a state shaped as ``like`` from global rank ``src``; backward: send its
    gradient back there (zeros where it has none)."""

    @staticmethod
    def forward(ctx, token: Tensor, src: int, group: dist.ProcessGroup, *like: Tensor):
        ctx.src, ctx.group = src, group
        bufs = [torch.empty_like(t) for t in like]
        for buf in bufs:
            dist.recv(buf, src, group=group)
        ctx.like = [(t.shape, t.dtype, t.device) for t in like]
        return (token.detach().clone(), *bufs)

    @staticmethod
    def backward(ctx, g_token: Tensor | None, *grads: Tensor | None):
        for (shape, dtype, device), g in zip(ctx.like, grads):
            g = torch.zeros(shape, dtype=dtype, device=device) if g is None else g.contiguous()
            dist.send(g, ctx.src, group=ctx.group)
        return (_zero_if_none(g_token), None, None, *(None for _ in ctx.like))


def _zero_if_none(g: Tensor | None) -> Tensor:
    return torch.zeros(()) if g is None else g


def apply_context_parallel(
    model: torch.nn.Module, group: dist.ProcessGroup, load_balance: bool, attention: str = "allgather"
) -> DistributedSplit:
    """Make ``model`` (a HybridLM, or a pipeline stage holding one as ``.model``) run on this
    rank's segments of every sequence, full attention as ``attention`` (parallel.cp_attention:
    'allgather' or 'ring') says; returns the split (whose :meth:`shard` cuts each batch)."""
    if attention not in ("allgather", "ring"):
        raise ValueError(f"apply_context_parallel: attention must be 'allgather' or 'ring', got {attention!r}")
    split = DistributedSplit(group, load_balance)
    split.ring = attention == "ring"
    inner = getattr(model, "model", model)
    inner.sequence_split = split
    return split


def cp_traffic(
    cfg, micro_batch: int, seq_len: int, cp: int, load_balance: bool, act_bytes: int = 4, attention: str = "allgather"
) -> list[tuple[str, str, float]]:
    """What one rank receives per layer in one forward of a ``micro_batch x seq_len`` micro-batch
    split over ``cp`` ranks (the backward sends as much again, but for ring attention):
    ``(mixer, what is exchanged, bytes)`` per mixer type of the
    :class:`~pretrain.config.ModelConfig` ``cfg``, and last the baseline of all-gathering a
    layer's hidden states. Exchanges are all-gathers of per-segment pieces (a rank receives the
    other cp - 1 ranks' ones); recurrent states and decays are fp32. ``attention``
    (parallel.cp_attention): with 'ring' every full-attention layer, cross-attention included,
    receives the other ranks' keys/values as cp - 1 blocks in the forward and, in the
    backward, those blocks again plus cp blocks of their fp32 gradients (in the text);
    differential attention rings its two maps' keys with the shared values twice (1.5x)."""
    slots = 2 if load_balance else 1
    n = cp * slots
    s = seq_len // n
    a, d = cfg.attention, cfg.d_model
    kv = 2 * (a.n_kv_heads or a.n_heads) * (a.head_dim or d // a.n_heads)  # keys + values per token
    others = (cp - 1) * slots * micro_batch  # rows of the other ranks

    def gathered(elements_per_row: float, nbytes: int = act_bytes) -> float:
        return others * elements_per_row * nbytes

    m, m2, g = cfg.mamba, cfg.mamba2, cfg.gla
    d_in, d_in2 = m.expand * d, m2.expand * d
    heads2 = d_in2 // m2.head_dim
    conv2 = d_in2 + 2 * m2.n_groups * m2.d_state
    gk, gv = int(g.expand_k * d), int(g.expand_v * d)
    t = cfg.titans
    hd = d // t.n_heads
    dims = [hd] + [t.memory_expand * hd] * (t.memory_depth - 1) + [hd]
    memory = t.n_heads * sum(i * o for i, o in zip(dims, dims[1:]))
    window_halo = min(a.window - 1, s)
    ring = ring_traffic(gathered(s * kv), cp, act_bytes)
    kinds = {
        "attn": ("all-gathered keys/values", gathered(s * kv)),
        "swa": (f"halo of {window_halo} keys/values", gathered(window_halo * kv)),
        "mamba": ("conv halo + (decay, state) pair", gathered(min(m.d_conv - 1, s) * d_in) + gathered(2 * d_in * m.d_state, 4)),
        "mamba2": ("conv halo + (decay, state) pair",
                   gathered(min(m2.d_conv - 1, s) * conv2) + gathered(heads2 * (m2.head_dim * m2.d_state + 1), 4)),
        "gla": ("(decay, state) pair", gathered(gk * (gv // g.n_heads) + gk, 4)),
        "xattn": ("nothing (the shared keys/values were gathered once)", 0.0),
        "gmu": ("nothing (token-local)", 0.0),
        "titans": ("relayed memory (weights + momentum) + window halo",
                   slots * micro_batch * 2 * memory * 4 + gathered(window_halo * kv)),
    }
    alias = {"attn_kv": "attn", "diff_attn": "attn", "diff_attn_kv": "attn", "diff_swa": "swa",
             "diff_xattn": "xattn", "mamba_mem": "mamba", "mamba2_mem": "mamba2", "gla_mem": "gla",
             "mac": "titans", "mag": "titans", "mal": "titans"}
    out, seen = [], set()
    for mixer, ffn in cfg.pattern():
        if mixer not in seen:
            seen.add(mixer)
            kind = alias.get(mixer, mixer)
            if attention == "ring" and kind in ("attn", "xattn"):
                out.append((mixer, *ring(1.5 if mixer.startswith("diff_") else 1.0)))
            else:
                out.append((mixer, *kinds[kind]))
        if ffn in ("moe", "moe_gru") and ffn not in seen:
            seen.add(ffn)
            out.append((ffn, "summed expert statistics", float((cp - 1) * (2 * cfg.moe.n_experts + 1) * 4)))
    out.append(("(baseline)", "all-gathering one layer's hidden states", gathered(s * d)))
    return out


def ring_traffic(kv_bytes: float, cp: int, act_bytes: int):
    """``factor -> (text, forward bytes)`` of a ring-attention layer whose other ranks' keys
    and values are ``kv_bytes`` (what an all-gather would receive) times ``factor``: the
    forward receives them as cp - 1 blocks; the backward receives them again plus cp blocks
    of their fp32 gradients."""

    def of(factor: float) -> tuple[str, float]:
        fwd = factor * kv_bytes
        bwd = fwd + fwd * cp / (cp - 1) * 4 / act_bytes
        return f"ring: {cp - 1} K/V blocks; backward {bwd / 2**20:.3f} MiB (K/V again + {cp} fp32 dK/dV blocks)", fwd

    return of


def format_cp(cfg) -> list[str]:
    """`pretrain plan`'s context-parallel lines: the split, then per mixer type what one rank
    receives per layer and forward pass (:func:`cp_traffic`)."""
    p, model = cfg.parallel, cfg.with_vocab().model
    lb = p.load_balanced(model.pattern())
    n = p.cp_segments(model.pattern())
    seq, micro = cfg.data.seq_len, cfg.train.micro_batch_size
    split = f"segments r and {2 * p.cp - 1}-r of {n}" if lb else f"segment r of {n}"
    tokens = f"{seq // n} token{'s' if seq // n != 1 else ''} each"
    full = any(m in FULL_ATTENTION for m, _ in model.pattern())
    lines = [f"context     cp {p.cp}: each rank holds {split} ({tokens}) of every sequence"
             + (f"; full attention: {p.cp_attention}" if full else "")]
    for mixer, what, nbytes in cp_traffic(model, micro, seq, p.cp, lb, attention=p.cp_attention):
        lines.append(f"  {mixer:<14}{nbytes / 2**20:>12.3f} MiB per layer and forward  {what}")
    return lines
