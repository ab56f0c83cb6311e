"""Differential attention ('diff_attn', 'diff_swa') against a naive two-softmax loop; cached
decoding and packed documents."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.models import build_model
from pretrain.models.context import BandedMask, build_context
from pretrain.models.layers.attention import banded_sdpa
from pretrain.models.layers.diff_attention import DiffAttention, lambda_init
from pretrain.models.layers.diff_ops import diff_attention
from pretrain.models.layers.rope import apply_rope
from tests.models.util import assert_packed_equals_separate, decode as _decode

T = 13  # longer than the window (4)


def _naive(q, k, v, lam, window=None, doc_start=None):
    """Loop over batch, head pair and query: two explicit softmax maps over the visible keys.
    q [B, T, H, D], k/v [B, T, H_kv, D] -> [B, T, H/2, 2D]."""
    b, t, h, d = q.shape
    group = h // k.shape[2]  # query heads per KV head; pairs keep the ratio
    out = torch.zeros(b, t, h // 2, 2 * d, dtype=q.dtype)
    for bi in range(b):
        for i in range(h // 2):
            j = i // group
            value = torch.cat([v[bi, :, 2 * j], v[bi, :, 2 * j + 1]], dim=-1)  # [T, 2D]
            for ti in range(t):
                lo = 0 if window is None else max(0, ti - window + 1)
                if doc_start is not None:
                    lo = max(lo, int(doc_start[bi, ti]))
                keys = slice(lo, ti + 1)
                a1 = torch.softmax(k[bi, keys, 2 * j] @ q[bi, ti, 2 * i] / math.sqrt(d), dim=0)
                a2 = torch.softmax(k[bi, keys, 2 * j + 1] @ q[bi, ti, 2 * i + 1] / math.sqrt(d), dim=0)
                out[bi, ti, i] = (a1 - lam * a2) @ value[keys]
    return out


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("n_kv", [4, 2])
def test_core_matches_naive_with_gradients(window, n_kv, rel_err):
    torch.manual_seed(0)
    b, t, h, d = 2, 9, 4, 8
    q = torch.randn(b, t, h, d, requires_grad=True)
    k = torch.randn(b, t, n_kv, d, requires_grad=True)
    v = torch.randn(b, t, n_kv, d, requires_grad=True)
    lam = torch.tensor(0.37, requires_grad=True)
    positions = torch.stack([torch.arange(t), torch.cat([torch.arange(4), torch.arange(5)])])
    ctx = build_context(b, t, q.device, positions, None, True, {window}, None, False)

    def sdpa(q_, k_, v_):
        if isinstance(ctx.masks[window], BandedMask):  # a window of 4 over 9 tokens: block by block
            return banded_sdpa(q_, k_, v_, ctx.masks[window])
        o = F.scaled_dot_product_attention(
            q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2), attn_mask=ctx.masks[window],
            enable_gqa=q_.shape[2] != k_.shape[2],
        )
        return o.transpose(1, 2)

    got = diff_attention(q, k, v, lam, sdpa)
    doc_start = torch.arange(t) - positions
    want = _naive(q, k, v, lam, window, doc_start)
    assert rel_err(got, want) <= 1e-5
    g = torch.randn_like(want)
    grads_got = torch.autograd.grad(got, (q, k, v, lam), g)
    grads_want = torch.autograd.grad(want, (q, k, v, lam), g)
    for a, w in zip(grads_got, grads_want):
        assert rel_err(a, w) <= 1e-5


def test_core_rejects_odd_heads():
    q, k = torch.randn(1, 3, 3, 4), torch.randn(1, 3, 3, 4)
    with pytest.raises(ValueError, match="even"):
        diff_attention(q, k, k, torch.tensor(0.5), lambda *a: a[0])


@pytest.mark.parametrize("pattern", ["diff_attn", "diff_swa"])
@pytest.mark.parametrize("pos_encoding", ["rope", "none"])
def test_layer_matches_naive(make_cfg, pattern, pos_encoding, rel_err):
    """The whole mixer: projections, RoPE, lambda, per-pair RMSNorm, (1 - lambda_init), wo."""
    cfg = make_cfg(pattern, n_layers=3, attention={"pos_encoding": pos_encoding}, init_std=0.2)
    torch.manual_seed(0)
    model = build_model(cfg)
    layer = model.blocks["2"].mixer
    assert isinstance(layer, DiffAttention) and layer.lambda_init == pytest.approx(0.8 - 0.6 * math.exp(-0.6))
    x = torch.randn(2, T, cfg.d_model)
    window = None if pattern == "diff_attn" else cfg.attention.window
    rope = (layer.head_dim, cfg.attention.rope_theta) if pos_encoding == "rope" else None
    ctx = build_context(2, T, x.device, None, None, True, {window}, rope, False)
    with torch.no_grad():
        got = layer(x, ctx)
        q = (x @ layer.wq.weight.T).view(2, T, -1, layer.head_dim)
        k = (x @ layer.wk.weight.T).view(2, T, -1, layer.head_dim)
        v = (x @ layer.wv.weight.T).view(2, T, -1, layer.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        lam = (
            torch.exp((layer.lambda_q1 * layer.lambda_k1).sum())
            - torch.exp((layer.lambda_q2 * layer.lambda_k2).sum())
            + layer.lambda_init
        )
        o = _naive(q, k, v, lam, window)  # [B, T, H/2, 2D]
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * layer.subln.weight
        want = (o * (1 - layer.lambda_init)).reshape(2, T, -1) @ layer.wo.weight.T
    assert rel_err(got, want) <= 1e-5


def test_lambda_init_schedule():
    assert lambda_init(0) == pytest.approx(0.2)
    assert lambda_init(10) == pytest.approx(0.8 - 0.6 * math.exp(-3.0))


def test_odd_heads_rejected(make_cfg):
    cfg = make_cfg("diff_attn")
    cfg.attention.n_kv_heads = 1
    with pytest.raises(ValueError, match="even"):
        build_model(cfg)


@pytest.mark.parametrize("pattern", ["diff_attn", "diff_swa", "mamba diff_swa diff_attn"])
def test_decoding_parity(make_cfg, pattern, rel_err):
    cfg = make_cfg(pattern, init_std=0.2)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    positions = torch.stack([torch.cat([torch.arange(6), torch.arange(7)]), torch.cat([torch.arange(4), torch.arange(9)])])
    with torch.no_grad():
        full = model(ids)
        assert rel_err(_decode(model, ids, [1] * T), full) <= 1e-4
        assert rel_err(_decode(model, ids, [3, 1, 5, 1, 3]), full) <= 1e-4
        packed = model(ids, positions)
        assert rel_err(_decode(model, ids, [5, 1, 3, 4], positions), packed) <= 1e-4


def test_packed_equals_separate(make_cfg):
    cfg = make_cfg("diff_swa diff_attn", init_std=0.2)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert_packed_equals_separate(model, cfg.vocab_size)
