"""Gated Linear Attention in pure PyTorch, chunkwise: the CPU path, and what the Triton kernel
(``kernels/gla/chunk.py``) replaces on CUDA. Called through :mod:`kernels.gla`.

The recurrence (Yang et al. 2023), per head, with a per-key-channel forget gate
``alpha_t = exp(g_t)`` (``g_t <= 0`` given in log space):

    S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t          (S_{t-1} := 0 where reset_t)
    o_t = (scale * q_t) S_t

:func:`chunk_gla` evaluates it chunkwise: inside a chunk, ``o_i`` sums
``(q_i * exp(cum_i - cum_j)) . k_j  v_j`` over ``j <= i`` (``cum``: log gates summed from the
chunk start), and the state entering the chunk reaches ``o_i`` through ``q_i * exp(cum_i)``.
Every exponent is kept <= 0, so nothing overflows however strong the gates: the intra-chunk
decays are exact pairwise differences inside sub-chunks of ``SUB_CHUNK`` tokens, and between
sub-chunks the difference is split at the sub-chunk boundary r between key and query,
``exp(cum_i - cum_r) * exp(cum_r - cum_j)`` (fla's secondary chunking). A Python loop runs
over chunks (the inter-chunk state passing); autograd differentiates the whole thing except the
pairwise decays, whose own backward recomputes them a cache-sized block at a time
(:class:`_DiagScores`): time and memory per token stay flat in T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from kernels.dispatch import at_least_fp32

SUB_CHUNK = 16  # tokens per secondary chunk: pairwise decays cost SUB_CHUNK x the keys' memory


def _to_chunks(z: Tensor, n: int, c: int) -> Tensor:
    """[B, T, H, D] -> at least fp32 [B, H, N, C, D], zero-padded at the end to N * C tokens."""
    z = F.pad(at_least_fp32(z), (0, 0, 0, 0, 0, n * c - z.shape[1]))
    return z.unflatten(1, (n, c)).permute(0, 3, 1, 2, 4)


class _DiagScores(torch.autograd.Function):
    """Decayed causal scores inside each sub-chunk, ``A[m, i, j] = sum_d q_id k_jd exp(cum_id - cum_jd)``
    for ``j <= i`` else 0: q, k, cum ``[M, S, K]`` -> ``[M, S, S]``.

    The pairwise decays ``[M, S, S, K]`` are S x the keys' memory: they are formed a block of
    :data:`_PAIR_BLOCK` elements at a time, in forward and again in backward, so that they stay in
    cache and are never saved (materialised whole, their traffic grew the time per token with T).
    Backward uses ``d cum = q * dq - k * dk`` (each exponent is ``cum_i - cum_j``). The sums
    over K (forward) and over the tokens (backward) are vector-matrix products: faster than
    multiply-and-sum, and what a FLOP counter sees as the tile's multiply-adds.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, cum: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(q, k, cum)
        out = q.new_empty(q.shape[0], q.shape[1], q.shape[1])
        for rows in _row_blocks(q):
            k_decayed = _pair_decays(cum[rows]).mul_(k[rows].unsqueeze(-3))  # [m, i, j, K]
            out[rows] = (q[rows].unsqueeze(-2) @ k_decayed.mT).squeeze(-2)  # q_i . (decayed k_j)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        q, k, cum = ctx.saved_tensors
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        for rows in _row_blocks(q):
            decay, d_a = _pair_decays(cum[rows]), d_out[rows]  # [m, i, j, K], [m, i, j]
            dq[rows] = (d_a.unsqueeze(-2) @ (decay * k[rows].unsqueeze(-3))).squeeze(-2)
            q_decayed = decay.mul_(q[rows].unsqueeze(-2)).transpose(1, 2)  # [m, j, i, K]
            dk[rows] = (d_a.mT.unsqueeze(-2) @ q_decayed).squeeze(-2)
        return dq, dk, q * dq - k * dk


_PAIR_BLOCK = 1 << 18  # elements of one block of pairwise decays (1 MiB in fp32): cache-sized


def _row_blocks(z: Tensor) -> list[slice]:
    """Slices of z's first dimension holding about :data:`_PAIR_BLOCK` pairwise decays each."""
    m, s, d = z.shape
    step = max(1, _PAIR_BLOCK // (s * s * d))
    return [slice(i, min(i + step, m)) for i in range(0, m, step)]


def _pair_decays(cum: Tensor) -> Tensor:
    """``exp(cum_i - cum_j)`` for ``j <= i`` else 0: ``[m, S, K]`` -> ``[m, S, S, K]``, every exponent <= 0."""
    s = cum.shape[1]
    above = torch.ones(s, s, dtype=torch.bool, device=cum.device).triu(1)
    return (cum.unsqueeze(-2) - cum.unsqueeze(-3)).masked_fill_(above[:, :, None], float("-inf")).exp_()


def _intra_scores(q: Tensor, k: Tensor, cum: Tensor, sub: int) -> Tensor:
    """Decayed causal scores inside each chunk, ``A[i, j] = sum_d q_id k_jd exp(cum_id - cum_jd)``
    for ``j <= i``, else 0. q, k, cum ``[B, H, N, C, K]`` -> ``[B, H, N, C, C]``."""
    c = q.shape[-2]
    s = c // sub
    qs, ks, cs = (z.unflatten(-2, (s, sub)) for z in (q, k, cum))  # [B, H, N, s, sub, K]
    # diagonal sub-chunks: exact pairwise decays
    diag = _DiagScores.apply(*(z.reshape(-1, sub, z.shape[-1]) for z in (qs, ks, cs)))
    diag = diag.view(*qs.shape[:-1], sub)  # [B, H, N, s, sub, sub]
    eye = torch.eye(s, dtype=q.dtype, device=q.device)
    scores = (diag.unsqueeze(-2) * eye[:, None, :, None]).flatten(-2)  # [B, H, N, s, sub, C]
    if s > 1:
        # query sub-chunk u >= 1 against keys of sub-chunks < u, split at r = end of sub-chunk u-1
        ref = cs[..., :-1, -1:, :]  # [B, H, N, s-1, 1, K]
        q_r = qs[..., 1:, :, :] * (cs[..., 1:, :, :] - ref).exp()  # [B, H, N, s-1, sub, K]
        before = torch.arange(c, device=q.device) < torch.arange(1, s, device=q.device)[:, None] * sub
        k_exp = (ref - cum.unsqueeze(-3)).masked_fill(~before[:, :, None], float("-inf"))
        k_r = k.unsqueeze(-3) * k_exp.exp()  # [B, H, N, s-1, C, K]
        off = q_r @ k_r.transpose(-1, -2)  # [B, H, N, s-1, sub, C]
        scores = torch.cat([scores[..., :1, :, :], scores[..., 1:, :, :] + off], dim=-3)
    return scores.flatten(-3, -2)  # [B, H, N, C, C]


def _check(q: Tensor, k: Tensor, v: Tensor, g_log: Tensor, h0: Tensor | None, reset: Tensor | None) -> None:
    b, t, h, dk = q.shape
    if k.shape != q.shape or g_log.shape != q.shape:
        raise ValueError(f"chunk_gla: q {tuple(q.shape)}, k {tuple(k.shape)} and g_log {tuple(g_log.shape)} must match")
    if v.dim() != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(f"chunk_gla: v {tuple(v.shape)} must be [B, T, H, V] with B, T, H = {(b, t, h)}")
    if h0 is not None and h0.shape != (b, h, dk, v.shape[-1]):
        raise ValueError(f"chunk_gla: h0 {tuple(h0.shape)} must be {(b, h, dk, v.shape[-1])}")
    if reset is not None and reset.shape != (b, t):
        raise ValueError(f"chunk_gla: reset {tuple(reset.shape)} must be {(b, t)}")
    if t == 0:
        raise ValueError("chunk_gla: empty sequence")


@torch.compiler.disable  # the data-dependent chunk loop; a Triton kernel replaces this function
def chunk_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_log: Tensor,
    h0: Tensor | None = None,
    reset: Tensor | None = None,
    chunk_size: int = 64,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Gated linear attention over a whole sequence (training / prefill), chunkwise.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys.
        v: ``[B, T, H, V]`` values.
        g_log: ``[B, T, H, K]`` log forget gates (<= 0), alpha_t = exp(g_log_t).
        h0: ``[B, H, K, V]`` initial state, or None for zeros.
        reset: ``[B, T]`` bool, True where a document starts: the carried state is dropped
            before that token is added.
        chunk_size: tokens per chunk (a multiple of ``SUB_CHUNK`` splits into sub-chunks).
        scale: query scale; None is ``K ** -0.5``.

    Returns:
        ``o [B, T, H, V]`` in the dtype of ``v``, and the final state ``[B, H, K, V]`` in fp32 (fp64 for fp64 inputs).
    """
    _check(q, k, v, g_log, h0, reset)
    if chunk_size <= 0:
        raise ValueError(f"chunk_gla: chunk_size {chunk_size} must be > 0")
    b, t, h, dk = q.shape
    c, n = chunk_size, math.ceil(t / chunk_size)
    scale = dk**-0.5 if scale is None else scale
    with torch.autocast(q.device.type, enabled=False):  # decays and states need fp32
        qc, kc, vc, gc = (_to_chunks(z, n, c) for z in (q, k, v, g_log))  # [B, H, N, C, *]
        qc = qc * scale
        cum = gc.cumsum(-2)  # log decay from the chunk start through each token
        scores = _intra_scores(qc, kc, cum, SUB_CHUNK if c % SUB_CHUNK == 0 else c)  # [B, H, N, C, C]
        q_in = qc * cum.exp()  # queries reading the state that entered the chunk
        k_out = kc * (cum[..., -1:, :] - cum).exp()  # keys decayed to the chunk end
        decay = cum[..., -1, :].exp()  # [B, H, N, K] chunk-wide decay of the carried state
        if reset is not None:
            seg = F.pad(reset.long(), (0, n * c - t)).view(b, 1, n, c).cumsum(-1)  # segment inside chunk
            scores = scores * (seg.unsqueeze(-1) == seg.unsqueeze(-2))  # same document only
            q_in = q_in * (seg == 0).unsqueeze(-1)  # no start between chunk start and token
            k_out = k_out * (seg == seg[..., -1:]).unsqueeze(-1)  # still in the chunk's last document
            decay = decay * (seg[..., -1] == 0).unsqueeze(-1)
        o = scores @ vc  # [B, H, N, C, V]
        chunk_states = k_out.transpose(-1, -2) @ vc  # [B, H, N, K, V]
        state = qc.new_zeros(b, h, dk, vc.shape[-1]) if h0 is None else h0.to(qc.dtype)
        inter = []
        # unbind: one backward node for all chunks (indexing chunk i in the loop made each of the
        # N backward steps write a whole [B, H, N, ...] gradient: O(N^2) time)
        for q_i, decay_i, states_i in zip(q_in.unbind(2), decay.unbind(2), chunk_states.unbind(2)):
            inter.append(q_i @ state)  # [B, H, C, V]
            state = decay_i[..., None] * state + states_i
        o = o + torch.stack(inter, dim=2)
    o = o.permute(0, 2, 3, 1, 4).flatten(1, 2)[:, :t]  # [B, T, H, V]
    return o.to(v.dtype), state


def recurrent_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_log: Tensor,
    h0: Tensor | None = None,
    reset: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """The recurrence one token at a time (decoding), shapes as :func:`chunk_gla`."""
    b, t, h, dk = q.shape
    dtype = torch.promote_types(q.dtype, torch.float32)
    state = q.new_zeros(b, h, dk, v.shape[-1], dtype=dtype) if h0 is None else h0
    outs = []
    for i in range(t):
        r = None if reset is None else reset[:, i]
        o, state = recurrent_gla_step(q[:, i], k[:, i], v[:, i], g_log[:, i], state, reset=r, scale=scale)
        outs.append(o)
    return torch.stack(outs, dim=1), state


def recurrent_gla_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_log: Tensor,
    h: Tensor,
    reset: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor]:
    """One recurrent step: ``q, k, g_log [B, H, K]``, ``v [B, H, V]``, state ``h [B, H, K, V]``,
    ``reset [B]`` bool. Returns ``(o [B, H, V] in v's dtype, new h fp32 (fp64 for fp64))``."""
    if q.dim() != 3 or k.shape != q.shape or g_log.shape != q.shape or h.shape != (*q.shape, v.shape[-1]):
        raise ValueError(
            f"recurrent_gla_step: q {tuple(q.shape)}, k {tuple(k.shape)}, g_log {tuple(g_log.shape)}, "
            f"v {tuple(v.shape)}, h {tuple(h.shape)}"
        )
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    f = at_least_fp32
    alpha = f(g_log).exp()
    if reset is not None:
        alpha = alpha * (~reset).to(alpha.dtype)[:, None, None]
    h = alpha.unsqueeze(-1) * f(h) + f(k).unsqueeze(-1) * f(v).unsqueeze(-2)
    o = ((f(q) * scale).unsqueeze(-2) @ h).squeeze(-2)
    return o.to(v.dtype), h
