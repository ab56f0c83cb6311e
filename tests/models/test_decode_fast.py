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
from tests.models.util import uncached_greedy


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


def test_writes_the_version_counter_misses_are_seen_by_the_next_session(make_cfg):
    """Writes through ``.data`` (an EMA update, a weight copy between models) bump no version
    counter, and inference tensors have none: the next decoding session (a new cache, or a
    one-token forward of its own) must still decode with the weights as they are then."""
    from pretrain.generate import generate

    cfg = make_cfg("mamba swa attn", init_std=0.3)
    torch.manual_seed(0)
    model, other = build_model(cfg), build_model(cfg)
    prompt = [3, 14, 15, 9, 2]
    assert generate(model, prompt, 6, greedy=True) == uncached_greedy(model, prompt, 6)
    for p, q in zip(model.parameters(), other.parameters()):
        p.data.copy_(q.data)  # no version bump
    assert generate(model, prompt, 6, greedy=True) == uncached_greedy(model, prompt, 6)
    with torch.no_grad():  # a one-token forward without a cache, after another .data write
        for p in model.parameters():
            p.data.mul_(1.5)
        one = model(torch.tensor([[7]]))
    with torch.enable_grad():
        assert torch.allclose(one, model(torch.tensor([[7]])), rtol=1e-5, atol=1e-5)

    with torch.inference_mode():  # parameters that are inference tensors: no version counter at all
        built = build_model(cfg)
        built.load_state_dict(model.state_dict())
    assert all(p.is_inference() for p in built.parameters())
    with torch.inference_mode():
        ids = list(prompt)
        for _ in range(4):
            ids.append(int(built(torch.tensor([ids]))[0, -1].argmax()))
    assert generate(built, prompt, 4, greedy=True) == ids[len(prompt):]


@pytest.mark.parametrize("pattern", ["mamba", "mamba_mem swa attn_kv gmu xattn"])
def test_conv_width_one_decodes_as_the_full_forward(make_cfg, pattern):
    """mamba.d_conv = 1 (no convolution history) through every decoding path: a one-token
    prompt, batched ragged prompts (the general step with positions) and the short CPU step."""
    from pretrain.generate import generate, generate_batch

    cfg = make_cfg(pattern, init_std=0.3, mamba={"d_conv": 1})
    torch.manual_seed(0)
    model = build_model(cfg)
    prompts = [[4], [1, 2, 3, 5, 8]]
    alone = [uncached_greedy(model, p, 4) for p in prompts]
    assert [generate(model, p, 4, greedy=True) for p in prompts] == alone
    assert generate_batch(model, prompts, 4, greedy=True) == alone


@pytest.mark.parametrize("pattern", ["swa", "attn", "mamba swa attn", "mamba_mem swa attn_kv gmu xattn"])
def test_decoding_under_bf16_autocast_runs(make_cfg, pattern):
    """Under CPU bf16 autocast the projections give bf16 keys while the cache holds fp32: every
    attention layer (ring buffers included) stores them in the cache's dtype, and the steps'
    logits stay near the uncached forward's under the same autocast."""
    cfg = make_cfg(pattern, init_std=0.2)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(ids).float()
        cache = model.new_cache(1)
        steps = [model(ids[:, :3], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(3, 9)]
    got = torch.cat(steps, dim=1).float()
    assert torch.isfinite(got).all()
    assert (got - full).abs().max() <= 0.05 * full.abs().max()
