"""Blockwise causal attention with log-sum-exp: the math of ring attention (Liu et al. 2023,
"Ring Attention with Blockwise Transformers"), shared by the one-process reference
(:meth:`pretrain.models.sequence_split.LocalSplit.ring_attention`, plain autograd) and the
distributed ring (``parallel/context.py``, whose backward calls :func:`block_backward`).

A query block attends to one key/value block at a time: :func:`block_forward` returns the
block's normalised output and its log-sum-exp, :func:`merge` combines two partial results
(the online softmax of Milakov & Gimelshein 2018, as flash-attention does), and
:func:`block_backward` recomputes the block's probabilities from the final log-sum-exp and
returns its gradients (flash-attention's backward), so nothing of size ``s x s`` is kept.

Layouts: queries ``[B, s, H, D]``, keys ``[B, s, H_kv, D]``, values ``[B, s, H_kv, Dv]`` (GQA:
query head h reads KV head ``h // (H / H_kv)``, as SDPA's ``enable_gqa``); partial outputs
``[B, H_kv, G, s, Dv]`` and log-sum-exps ``[B, H_kv, G, s]`` in float32, or float64 for
float64 inputs (``G = H / H_kv``).
"""

from __future__ import annotations

import torch
from torch import Tensor

MASKED = -1e30
"""Score of a masked key: finite, so a query row that sees no key of a block gets a
log-sum-exp near -1e30 (its block weight exp(lse - total) is exactly 0 in the merge) instead
of -inf, whose logsumexp gradient would be NaN."""


def block_mask(q_start: int, k_start: int, s: int, doc_start: Tensor | None, device: torch.device) -> Tensor | None:
    """Bool ``[B, 1, 1, s, s]`` (True: visible) of the queries of tokens ``q_start ..
    q_start + s - 1`` against the keys of tokens ``k_start .. k_start + s - 1`` (global
    indices): causal, and not before each query's document start ``doc_start [B, s]`` (int64
    global index; None without document masking). None when every key is visible (a block
    wholly in the past without document masking). A block wholly in the future is the
    caller's to skip."""
    q = q_start + torch.arange(s, device=device)[:, None]  # [s, 1]
    k = k_start + torch.arange(s, device=device)[None, :]  # [1, s]
    if doc_start is None:
        return None if k_start + s - 1 <= q_start else (k <= q)[None, None, None]
    return ((k <= q) & (k >= doc_start[:, :, None]))[:, None, None]  # [B, 1, 1, s, s]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the block math and the accumulators: float32, or float64 for float64."""
    return torch.promote_types(dtype, torch.float32)


def _heads(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``q [B, H_kv, G, s, D]``, ``k [B, H_kv, 1, s, D]``, ``v [B, H_kv, 1, s, Dv]`` in the
    accumulation dtype."""
    b, s, h, d = q.shape
    h_kv = k.shape[2]
    if h % h_kv:
        raise ValueError(f"ring attention: {h} query heads are not a multiple of {h_kv} KV heads")
    acc = accumulation_dtype(q.dtype)
    qh = q.to(acc).reshape(b, s, h_kv, h // h_kv, d).permute(0, 2, 3, 1, 4)
    return qh, k.to(acc).transpose(1, 2).unsqueeze(2), v.to(acc).transpose(1, 2).unsqueeze(2)


def _scores(qh: Tensor, kh: Tensor, mask: Tensor | None) -> Tensor:
    scores = qh @ kh.transpose(-1, -2) * qh.shape[-1] ** -0.5  # [B, H_kv, G, s, s]
    return scores if mask is None else scores.masked_fill(~mask, MASKED)


def block_forward(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Softmax attention of ``q [B, s, H, D]`` over one block ``k [B, s, H_kv, D]``, ``v [B, s,
    H_kv, Dv]`` under ``mask`` (:func:`block_mask`; scale 1/sqrt(D)): the float32 output ``[B,
    H_kv, G, s, Dv]`` (float64 for float64 inputs) normalised over this block and its log-sum-exp ``[B, H_kv, G, s]``.
    Differentiable (the one-process reference's autograd); ValueError on head counts that do
    not divide."""
    with torch.autocast(q.device.type, enabled=False):  # the scores and lse stay float32 under autocast
        qh, kh, vh = _heads(q, k, v)
        scores = _scores(qh, kh, mask)
        lse = torch.logsumexp(scores, dim=-1)
        return torch.exp(scores - lse[..., None]) @ vh, lse


def merge(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """The attention over the union of two disjoint key sets from each one's normalised output
    and log-sum-exp (shapes of :func:`block_forward`): ``lse' = logaddexp(lse, block_lse)``,
    ``out' = exp(lse - lse') out + exp(block_lse - lse') block_out``. Differentiable."""
    total = torch.logaddexp(lse, block_lse)
    return torch.exp(lse - total)[..., None] * out + torch.exp(block_lse - total)[..., None] * block_out, total


def to_heads_last(out: Tensor, dtype: torch.dtype) -> Tensor:
    """A merged output ``[B, H_kv, G, s, Dv]`` -> ``[B, s, H, Dv]`` in ``dtype``."""
    b, h_kv, g, s, dv = out.shape
    return out.permute(0, 3, 1, 2, 4).reshape(b, s, h_kv * g, dv).to(dtype)


def block_backward(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, lse: Tensor, grad_out: Tensor, delta: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of one block's share of the attention, recomputed (flash-attention's backward):
    ``q, k, v, mask`` as :func:`block_forward`, ``lse [B, H_kv, G, s]`` the FINAL log-sum-exp
    over every block, ``grad_out [B, H_kv, G, s, Dv]`` the (accumulation dtype) gradient of the final
    output and ``delta = (grad_out * out).sum(-1)`` ``[B, H_kv, G, s]``. With ``P = exp(S -
    lse)``: dV = P^T dO, dS = P (dO V^T - delta), dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D).
    Returns in the accumulation dtype ``dq [B, s, H, D]``, ``dk [B, s, H_kv, D]``, ``dv [B, s, H_kv, Dv]``."""
    with torch.autocast(q.device.type, enabled=False):
        qh, kh, vh = _heads(q, k, v)
        scale = qh.shape[-1] ** -0.5
        p = torch.exp(_scores(qh, kh, mask) - lse[..., None])  # [B, H_kv, G, s, s]
        dv = (p.transpose(-1, -2) @ grad_out).sum(2)  # [B, H_kv, s, Dv]: the G query heads of a KV head
        ds = p * (grad_out @ vh.transpose(-1, -2) - delta[..., None])
        dq = ds @ kh * scale  # [B, H_kv, G, s, D]
        dk = (ds.transpose(-1, -2) @ qh).sum(2) * scale  # [B, H_kv, s, D]
        return to_heads_last(dq, dq.dtype), dk.transpose(1, 2), dv.transpose(1, 2)
