"""SambaY (GMU + shared-KV cross-decoder) and its YOCO baseline: layers against their formulas,
whole-model decoding parity, the cross-decoder's empty cache, packed documents, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import load_config
from pretrain.models import build_model, count_parameters
from pretrain.models.context import build_context
from pretrain.models.layers.gmu import MEMORY, SHARED_K, SHARED_V, CrossAttention, GatedMemoryUnit
from kernels.gmu import gated_memory
from pretrain.models.sambay import sambay_pattern
from tests.conftest import ROOT
from tests.models.util import assert_packed_equals_separate, decode_with_cache as _decode

T = 13  # longer than the window (4)
DOCS = torch.stack([torch.cat([torch.arange(6), torch.arange(7)]), torch.cat([torch.arange(4), torch.arange(9)])])


def _cfg(make_cfg, variant, n_layers=8, rnn="mamba", **kw):
    cfg = make_cfg(" ".join(sambay_pattern(n_layers, variant, rnn)), init_std=0.2, **kw)
    cfg.mamba2.head_dim, cfg.mamba2.d_state, cfg.mamba2.chunk_size = 16, 8, 4  # 4 heads, 2 chunks
    cfg.gla.n_heads, cfg.gla.chunk_size = 2, 4
    return cfg


def test_pattern():
    assert sambay_pattern(8) == ["mamba", "swa", "mamba", "swa", "mamba_mem", "attn_kv", "gmu", "xattn"]
    p = sambay_pattern(16, "sambay_da")
    assert p[:8] == ["mamba", "diff_swa"] * 4 and p[8:10] == ["mamba_mem", "diff_attn_kv"]
    assert p[10:] == ["gmu", "diff_xattn"] * 3
    assert sambay_pattern(8, "yoco")[4:] == ["mamba", "attn_kv", "xattn", "xattn"]
    assert sambay_pattern(6, "sambay", "gla") == ["gla", "swa", "gla", "gla_mem", "attn_kv", "gmu"]
    with pytest.raises(ValueError):
        sambay_pattern(7)
    with pytest.raises(ValueError):
        sambay_pattern(8, "samba")


def test_gated_memory_core_matches_loop(rel_err):
    torch.manual_seed(0)
    m = torch.randn(2, 5, 6, requires_grad=True)
    z = torch.randn(2, 5, 6, requires_grad=True)
    got = gated_memory(m, z)
    want = torch.stack([m[:, t] * z[:, t] / (1 + torch.exp(-z[:, t])) for t in range(5)], dim=1)
    assert rel_err(got, want) <= 1e-6
    g = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (m, z), g), torch.autograd.grad(want, (m, z), g)):
        assert rel_err(a, b) <= 1e-6


def test_gmu_layer_formula(make_cfg, rel_err):
    cfg = _cfg(make_cfg, "sambay")
    model = build_model(cfg)
    gmu = model.blocks["6"].mixer
    assert isinstance(gmu, GatedMemoryUnit) and gmu.new_state(2) is None
    x, m = torch.randn(2, T, cfg.d_model), torch.randn(2, T, cfg.mamba.expand * cfg.d_model)
    ctx = build_context(2, T, x.device, None, None, True, set(), None, False)
    y, carry = gmu(x, ctx, None, {MEMORY: m})
    w1, w2 = gmu.in_proj.weight, gmu.out_proj.weight
    assert rel_err(y, (m * F.silu(x @ w1.T)) @ w2.T) <= 1e-6
    assert carry[MEMORY] is m
    with pytest.raises(RuntimeError, match="gmu_memory"):
        gmu(x, ctx, None, {})


def test_memory_is_the_pre_gate_scan_output(make_cfg, rel_err):
    """'mamba_mem' is Mamba (same weights, same output) that exports y with y * silu(z) gated."""
    cfg = _cfg(make_cfg, "sambay")
    model = build_model(cfg)
    mem_layer = model.blocks["4"].mixer
    plain = build_model(make_cfg("mamba")).blocks["0"].mixer
    plain.load_state_dict(mem_layer.state_dict())
    x = torch.randn(2, T, cfg.d_model)
    ctx = build_context(2, T, x.device, None, None, True, set(), None, False)
    with torch.no_grad():
        y, carry = mem_layer(x, ctx, None, {})
        assert rel_err(y, plain(x, ctx)) <= 1e-6
        z = x @ mem_layer.in_proj_z.weight.T
        assert rel_err(mem_layer.out_proj(carry[MEMORY] * F.silu(z)), y) <= 1e-6


@pytest.mark.parametrize("rnn", ["mamba2", "gla"])
def test_normed_memory_layers(make_cfg, rnn, rel_err):
    """'mamba2_mem' / 'gla_mem' behave as their mixer and export what enters its gated norm; the
    GMU then applies RMSNormGated: y = W2(groupnorm(m ⊙ SiLU(W1 x)) * w)."""
    cfg = _cfg(make_cfg, "sambay", rnn=rnn)
    model = build_model(cfg)
    mem_layer, gmu = model.blocks["4"].mixer, model.blocks["6"].mixer
    plain = build_model(_cfg(make_cfg, "yoco", rnn=rnn)).blocks["4"].mixer
    plain.load_state_dict(mem_layer.state_dict())
    x = torch.randn(2, T, cfg.d_model)
    ctx = build_context(2, T, x.device, DOCS, None, True, set(), None, False)
    with torch.no_grad():
        y, carry = mem_layer(x, ctx, None, {})
        assert rel_err(y, plain(x, ctx)) <= 1e-6
        m = carry[MEMORY]
        if rnn == "mamba2":
            z = x @ mem_layer.in_proj_z.weight.T
            assert rel_err(mem_layer.out_proj(mem_layer.norm(m, z)), y) <= 1e-6
            group = mem_layer.d_inner // cfg.mamba2.n_groups
        else:
            o = mem_layer.g_norm(m.unflatten(-1, (cfg.gla.n_heads, -1))).flatten(2)
            assert rel_err(mem_layer.o_proj(o * F.silu(mem_layer.g_proj(x))), y) <= 1e-6
            group = m.shape[-1] // cfg.gla.n_heads
        out, _ = gmu(x, ctx, None, carry)
        gated = (m * F.silu(x @ gmu.in_proj.weight.T)).unflatten(-1, (-1, group))
        normed = (gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + 1e-5)).flatten(-2) * gmu.norm.weight
        assert rel_err(out, normed @ gmu.out_proj.weight.T) <= 1e-5


@pytest.mark.parametrize("pos_encoding", ["none", "rope"])
def test_xattn_matches_naive_attention_to_shared_kv(make_cfg, pos_encoding, rel_err):
    cfg = _cfg(make_cfg, "yoco", attention={"pos_encoding": pos_encoding})
    model = build_model(cfg)
    kv_layer, xattn = model.blocks["5"].mixer, model.blocks["6"].mixer
    assert isinstance(xattn, CrossAttention) and not hasattr(xattn, "wk") and xattn.new_state(1) is None
    x1, x2 = torch.randn(2, T, cfg.d_model), torch.randn(2, T, cfg.d_model)
    rope = (kv_layer.head_dim, cfg.attention.rope_theta) if pos_encoding == "rope" else None
    ctx = build_context(2, T, x1.device, DOCS, None, True, {None}, rope, False)
    with torch.no_grad():
        _, carry = kv_layer(x1, ctx, None, {})
        y, _ = xattn(x2, ctx, None, carry)
        k, v = carry[SHARED_K], carry[SHARED_V]  # [B, T, H_kv, D]
        d = xattn.head_dim
        q = (x2 @ xattn.wq.weight.T).view(2, T, -1, d)
        if rope is not None:
            from pretrain.models.layers.rope import apply_rope

            q = apply_rope(q, *ctx.rope)
        group = q.shape[2] // k.shape[2]
        want = torch.zeros_like(q)
        for b in range(2):
            for t in range(T):
                start = t - int(DOCS[b, t])  # own document only
                for h in range(q.shape[2]):
                    a = torch.softmax(k[b, start : t + 1, h // group] @ q[b, t, h] / math.sqrt(d), dim=0)
                    want[b, t, h] = a @ v[b, start : t + 1, h // group]
        want = want.reshape(2, T, -1) @ xattn.wo.weight.T
    assert rel_err(y, want) <= 1e-5


@pytest.mark.parametrize(
    "variant,rnn,pos_encoding",
    [
        ("sambay", "mamba", "none"),
        ("sambay", "mamba", "rope"),
        ("sambay_da", "mamba", "none"),
        ("yoco", "mamba", "none"),
        ("sambay", "mamba2", "none"),
        ("sambay", "gla", "none"),
    ],
)
def test_decoding_parity(make_cfg, variant, rnn, pos_encoding, rel_err):
    cfg = _cfg(make_cfg, variant, rnn=rnn, attention={"pos_encoding": pos_encoding})
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    with torch.no_grad():
        full = model(ids)
        for chunks in ([1] * T, [3, 1, 5, 1, 3]):
            out, cache = _decode(model, ids, chunks)
            assert rel_err(out, full) <= 1e-4
        # only the self-decoder and the one full-attention layer keep state; the full layer all T keys
        for name, block in model.blocks.items():
            state = cache.states[name]
            assert (state is None) == (block.mixer_name in ("gmu", "xattn", "diff_xattn"))
        assert cache.states["5"].length == T and cache.states["1"].capacity == cfg.attention.window  # a ring
        packed = model(ids, DOCS)
        assert rel_err(_decode(model, ids, [5, 1, 3, 4], DOCS)[0], packed) <= 1e-4


@pytest.mark.parametrize("variant", ["sambay", "yoco"])
def test_packed_equals_separate(make_cfg, variant):
    cfg = _cfg(make_cfg, variant)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert_packed_equals_separate(model, cfg.vocab_size)


def test_gmu_needs_an_earlier_memory_layer(make_cfg):
    with pytest.raises(ValueError, match="memory layer"):
        build_model(make_cfg("gmu mamba_mem"))


@pytest.mark.parametrize(
    "name,published", [("sambay_d16", 1.0e9), ("sambay_da_d16", 1.0e9), ("yoco_d16", 1.0e9), ("samba_421m", 421e6)]
)
def test_paper_sizes(name, published):
    """Non-embedding parameters of the ArchScale d16 models (~1.0B); Samba 421M counts its
    (tied) embedding."""
    counts = count_parameters(load_config(ROOT / "configs" / f"{name}.toml").model)
    n = counts["total"] if name == "samba_421m" else counts["non_embedding"]
    assert abs(n - published) / published < 0.05


@pytest.mark.parametrize("variant", ["sambay", "sambay_da"])
def test_tiny_sambay_trains(small_corpus, prepared_dir, tmp_path, variant):
    from pretrain.train.trainer import train
    from tests.conftest import losses, tiny_overrides

    pattern = sambay_pattern(6, variant)
    overrides = tiny_overrides(
        small_corpus, prepared_dir, tmp_path,
        **{
            "model.n_layers": 6,
            "model.layer_pattern": "'" + " ".join(pattern) + "'",
            "model.attention.pos_encoding": "'none'",
            "train.max_steps": 6,
            "checkpoint.interval": 0,
            "optim.lr": 1e-2,
        },
    )
    train(load_config(None, overrides), log=lambda *_: None)
    logged = losses(tmp_path)
    assert sum(v for _, v in logged[-2:]) / 2 < logged[0][1]
