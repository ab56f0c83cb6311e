"""The decoding step's fast paths against independent references: attention of one query over
a long cache (a naive fp64 softmax), the fused decode-time projections (the separate layers),
one-token RoPE (the table formula), and whole models decoded through them, Mamba's short CPU
step included (the full forward, whose chunked scan shares none of the step's code)."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.models import build_model
from pretrain.models.layers import attention
from pretrain.models.layers.decode_weights import decode_linear, drop_decode_weights
from pretrain.models.layers.mamba import Mamba
from pretrain.models.layers.rope import rope_tables
from tests.models.util import decode as _decode


def naive_attention(q, k, v):
    """One query per head, a loop over heads in fp64: q [B, 1, H, D], k/v [B, S, H_kv, *]."""
    b, _, h, d = q.shape
    g = h // k.shape[2]
    out = torch.empty(b, 1, h, v.shape[-1], dtype=torch.float64)
    for i in range(b):
        for head in range(h):
            kk, vv = k[i, :, head // g].double(), v[i, :, head // g].double()
            w = torch.exp(kk @ q[i, 0, head].double() / math.sqrt(d))
            out[i, 0, head] = (w[:, None] * vv).sum(0) / w.sum()
    return out


@pytest.mark.parametrize("keys", [7, 12, 29])  # below one block, whole blocks, blocks + a tail
@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: blocks whose maxima differ by far more than exp's range
def test_decode_attention_equals_naive_softmax(monkeypatch, keys, scale):
    monkeypatch.setattr(attention, "DECODE_BLOCK", 6)
    g = torch.Generator().manual_seed(0)
    q = scale * torch.randn(2, 1, 6, 8, generator=g)
    buf_k, buf_v = torch.randn(2, 40, 3, 8, generator=g), torch.randn(2, 40, 3, 5, generator=g)
    k, v = buf_k[:, :keys], buf_v[:, :keys]  # strided views of a cache, as decoding passes them
    out = attention.decode_attention(q, k, v)
    assert out.shape == (2, 1, 6, 5)
    expected = naive_attention(q, k, v)
    assert (out.double() - expected).abs().max() < 1e-6 * expected.abs().max()


def test_decode_linear_equals_the_layers_and_follows_updates():
    torch.manual_seed(0)
    owner = torch.nn.Module()
    a, b = torch.nn.Linear(8, 16, bias=False), torch.nn.Linear(8, 4, bias=False)  # input-major, then not
    down = torch.nn.Linear(8, 3, bias=False)
    x = torch.randn(2, 1, 8)
    with torch.no_grad():
        assert torch.allclose(decode_linear(x, owner, "ab", a, b), torch.cat([a(x), b(x)], -1), atol=1e-6)
        assert torch.allclose(decode_linear(x, owner, "down", down), down(x), atol=1e-6)
        a.weight.mul_(2.0)  # an optimizer-like in-place update: the copy must be rebuilt
        assert torch.allclose(decode_linear(x, owner, "ab", a, b), torch.cat([a(x), b(x)], -1), atol=1e-6)
        b.load_state_dict({"weight": torch.randn(4, 8)})
        assert torch.allclose(decode_linear(x, owner, "ab", a, b), torch.cat([a(x), b(x)], -1), atol=1e-6)
        a.weight = torch.nn.Parameter(torch.randn(16, 8))  # a replaced parameter
        assert torch.allclose(decode_linear(x, owner, "ab", a, b), torch.cat([a(x), b(x)], -1), atol=1e-6)
        a.weight.data = torch.randn(16, 8)  # new storage under the same parameter (as Module.to does)
        assert torch.allclose(decode_linear(x, owner, "ab", a, b), torch.cat([a(x), b(x)], -1), atol=1e-6)
        rows = torch.randn(3, 1, 8)  # several rows (batched decoding)
        assert torch.allclose(decode_linear(rows, owner, "ab", a, b), torch.cat([a(rows), b(rows)], -1), atol=1e-6)
    drop_decode_weights(owner)
    assert "_decode_weights" not in owner.__dict__
    with pytest.raises(ValueError, match="bias-free"):
        decode_linear(x, owner, "bias", torch.nn.Linear(8, 2))


def test_rope_step_equals_the_rotation_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 5, 8, generator=g, dtype=torch.float64)
    cos, sin = rope_tables(torch.tensor([[0], [7], [40000]]), 8, 10000.0)
    half = 4
    inv_freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    angle = torch.tensor([0, 7, 40000], dtype=torch.float64)[:, None] * inv_freq
    c, s = angle.cos()[:, None, None, :], angle.sin()[:, None, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    expected = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    assert (attention.rope_step(x, cos.double(), sin.double()) - expected).abs().max() < 1e-6


@pytest.mark.parametrize("pattern, tied", [("attn", True), ("attn", False), ("swa attn", True), ("mamba swa attn", False),
                                           ("mamba_mem swa attn_kv gmu xattn", True)])
def test_decoding_through_the_fast_paths_equals_the_full_forward(make_cfg, monkeypatch, pattern, tied, rel_err):
    """Every one-token step through the fused projections, the output head's decode-time
    product (tied and untied) and (forced on for a short cache) the blocked attention gives
    the logits of one uncached forward."""
    calls = []
    real = attention.decode_attention
    monkeypatch.setattr(attention, "DECODE_BLOCK", 3)
    monkeypatch.setattr(attention, "use_decode_attention", lambda b, h_kv, keys: True)
    monkeypatch.setattr(attention, "decode_attention", lambda *a: calls.append(1) or real(*a))
    steps = []
    real_step = Mamba._step_cpu
    monkeypatch.setattr(Mamba, "_step_cpu", lambda *a: steps.append(1) or real_step(*a))
    cfg = make_cfg(pattern, init_std=0.2, tie_embeddings=tied)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        full = model(ids)
        assert rel_err(_decode(model, ids, [4] + [1] * 7), full) <= 1e-4
    assert calls  # the blocked attention really ran
    assert bool(steps) == ("mamba" in pattern)  # and the short Mamba step (SambaY's memory layer too)
    assert any("_decode_weights" in m.__dict__ for m in model.modules())  # and the fused projections
    assert "_decode_weights" in (model.head or model.tied_head).__dict__  # and the head's
