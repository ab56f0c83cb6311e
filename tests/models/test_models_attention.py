"""Attention mixer and RoPE against per-query loops."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.models.context import build_context, doc_boundaries
from pretrain.models.layers.rope import apply_rope, rope_tables
from pretrain.models.registry import MIXERS


def naive_rope(x, positions, theta):
    """Rotate each pair (i, i + D/2) of x [B, T, H, D] by positions * theta^(-i / (D/2))."""
    out = x.clone()
    half = x.shape[-1] // 2
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for i in range(half):
                ang = float(positions[b, t]) * theta ** (-i / half)
                c, s = math.cos(ang), math.sin(ang)
                x1, x2 = x[b, t, :, i], x[b, t, :, i + half]
                out[b, t, :, i], out[b, t, :, i + half] = x1 * c - x2 * s, x2 * c + x1 * s
    return out


def naive_attention(q, k, v, positions, window, doc_masking):
    """Per query: softmax over the keys it may see. q [B, T, H, D], k/v [B, T, H_kv, D]."""
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = torch.zeros_like(q)
    for bi in range(b):
        doc = torch.cumsum((positions[bi] == 0).long(), 0) if doc_masking else torch.zeros(t)
        for hi in range(h):
            for i in range(t):
                keys = [j for j in range(i + 1) if (window is None or i - j < window) and doc[j] == doc[i]]
                kk, vv = k[bi, keys, hi // group], v[bi, keys, hi // group]  # [S, D]
                p = torch.softmax(kk @ q[bi, i, hi] / math.sqrt(d), dim=0)
                out[bi, i, hi] = p @ vv
    return out


def test_rope_matches_rotation_formula():
    x = torch.randn(2, 5, 3, 8)
    positions = torch.tensor([[0, 1, 2, 0, 1], [7, 8, 9, 10, 11]])
    cos, sin = rope_tables(positions, 8, 10000.0)
    torch.testing.assert_close(apply_rope(x, cos, sin), naive_rope(x, positions, 10000.0))


def test_rope_scores_depend_only_on_distance():
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        rq = apply_rope(q, *rope_tables(torch.tensor([[pq]]), 16, 500.0))
        rk = apply_rope(k, *rope_tables(torch.tensor([[pk]]), 16, 500.0))
        return (rq * rk).sum()

    torch.testing.assert_close(score(9, 4), score(105, 100))


def _packed_positions(lengths_per_row):
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])


@pytest.mark.parametrize("mixer", ["attn", "swa"])
@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("pos_encoding", ["rope", "none"])
@pytest.mark.parametrize("doc_masking", [True, False])
def test_attention_matches_naive(make_cfg, mixer, n_kv_heads, pos_encoding, doc_masking):
    cfg = make_cfg(mixer, attention=dict(pos_encoding=pos_encoding), doc_masking=doc_masking)
    cfg.attention.n_kv_heads = n_kv_heads
    torch.manual_seed(0)
    layer = MIXERS[mixer](cfg, 0)
    layer.init_weights(0.3, 0.3)  # large weights: sharp, informative attention patterns
    x = torch.randn(2, 11, cfg.d_model)
    positions = _packed_positions([[6, 5], [2, 9]])
    ctx = build_context(
        2, 11, x.device, positions, None, doc_masking, {layer.window}, (layer.head_dim, 10000.0), flash=False
    )
    y = layer(x, ctx)

    q = layer.wq(x).view(2, 11, 4, -1)  # [B, T, H, D]
    k = layer.wk(x).view(2, 11, n_kv_heads, -1)
    v = layer.wv(x).view(2, 11, n_kv_heads, -1)
    if pos_encoding == "rope":
        rope_pos = positions if doc_masking else torch.arange(11).expand(2, 11)
        q, k = naive_rope(q, rope_pos, 10000.0), naive_rope(k, rope_pos, 10000.0)
    o = naive_attention(q, k, v, positions, layer.window, doc_masking)
    torch.testing.assert_close(y, layer.wo(o.reshape(2, 11, -1)), rtol=1e-5, atol=1e-5)


def test_doc_boundaries_for_varlen_kernels():
    """cu_seqlens of the flattened batch: every document start and every row start."""
    positions = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]])
    cu, longest = doc_boundaries(positions)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 3, 5, 7, 10]
    assert longest == 3
