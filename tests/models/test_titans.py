"""Titans: the MAC/MAG/MAL mixers' projections against the naive memory scan, decoding parity,
causality, document resets and training (the scan itself: tests/kernels/test_titans_*.py)."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import AttentionConfig, ConfigError, ModelConfig, TitansConfig, load_config
from pretrain.models import build_model
from pretrain.models.context import ForwardContext
from pretrain.models.layers import titans
from kernels.titans.naive import naive_memory_scan as naive_scan
from tests.models.util import decode_with_cache as _decode

B = 2  # rows of the test batches

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(pattern, doc_masking=True, **titans_kw):
    kw = dict(n_heads=2, memory_depth=2, memory_expand=2, chunk_size=4, segment_size=6, n_persistent=3, max_lr=0.5)
    kw.update(titans_kw)
    return ModelConfig(
        vocab_size=61, d_model=32, n_layers=len(pattern.split()), layer_pattern=pattern, ffn_hidden=48,
        init_std=0.2, doc_masking=doc_masking, attention=AttentionConfig(n_heads=4, window=5),
        titans=TitansConfig(**kw),
    )


@pytest.mark.parametrize("mac_output", ["per_token", "none"])
def test_projection_gradients_match_naive(mac_output, monkeypatch, rel_err):
    """The output and every parameter gradient of a MAC + MAG + MAL model (10 tokens: MAC's
    second segment starts inside the sequence) equal those through the token-by-token scan."""
    torch.manual_seed(0)
    model = build_model(_cfg("mac mag mal", mac_output=mac_output))
    ids = torch.randint(0, 61, (B, 10))

    def run():
        model.zero_grad()
        out = model(ids)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out, got = run()
    monkeypatch.setattr(titans, "memory_scan", lambda *args, backend: naive_scan(*args))
    out_ref, want = run()
    assert rel_err(out, out_ref) <= 1e-5
    for name, g in want.items():
        assert rel_err(got[name], g) <= 1e-4, name


VARIANTS = [("mac", "per_token"), ("mac", "none"), ("mag", "per_token"), ("mal", "per_token")]


@pytest.mark.parametrize("pattern, mac_output", VARIANTS)
@pytest.mark.parametrize("docs", ["one", "packed", "no_doc_masking"])
def test_decoding_parity(pattern, mac_output, docs, rel_err):
    """Token by token and uneven pieces (a 13-token prompt first: longer than a chunk of 4, a
    segment of 6 and a window of 5) equal one forward; with packed documents, starts fall inside
    chunks and segments."""
    t = 19
    torch.manual_seed(0)
    model = build_model(_cfg(pattern, doc_masking=docs != "no_doc_masking", mac_output=mac_output))
    ids = torch.randint(0, 61, (B, t))
    positions = None
    if docs == "packed":
        positions = torch.stack([
            torch.cat([torch.arange(7), torch.arange(12)]), torch.cat([torch.arange(2), torch.arange(17)])
        ])
    with torch.no_grad():
        full = model(ids, positions)
        for chunks in ([1] * t, [3, 1, 5, 1, 7, 2], [13, 1, 1, 4], [t]):
            assert rel_err(_decode(model, ids, chunks, positions)[0], full) <= 1e-4


@pytest.mark.parametrize("pattern, mac_output", VARIANTS)
def test_packed_equals_separate(pattern, mac_output, rel_err):
    torch.manual_seed(0)
    model = build_model(_cfg(pattern, mac_output=mac_output))
    lens = (9, 3, 8)
    ids = torch.randint(0, 61, (1, sum(lens)))
    positions = torch.cat([torch.arange(n) for n in lens]).unsqueeze(0)
    with torch.no_grad():
        packed = model(ids, positions)
        alone = torch.cat([model(doc) for doc in ids.split(list(lens), dim=1)], dim=1)
    assert rel_err(packed, alone) <= 1e-4


@pytest.mark.parametrize("mac_output", ["per_token", "none"])
def test_mac_is_causal(mac_output):
    """Changing token j changes no output before j and changes the output at j (14 tokens,
    segments of 6: j runs through the start, middle and end of segments)."""
    torch.manual_seed(0)
    model = build_model(_cfg("mac mac", mac_output=mac_output))
    ids = torch.randint(0, 61, (1, 14))
    with torch.no_grad():
        base = model(ids)[0]
        for j in range(1, 14):
            other = ids.clone()
            other[0, j] = (ids[0, j] + 1) % 61
            out = model(other)[0]
            scale = base.abs().max()
            assert (out[:j] - base[:j]).abs().max() <= 1e-6 * scale, j
            assert (out[j] - base[j]).abs().max() > 1e-4 * scale, j


@pytest.mark.parametrize("mac_output", ["per_token", "none"])
def test_mac_write_gates_read(mac_output):
    """The memory's write gates theta, eta, alpha are computed from the attention output y (what
    attention's W_o returns) with 'per_token', from the block input with 'none'."""
    torch.manual_seed(0)
    mixer = build_model(_cfg("mac", mac_output=mac_output)).blocks["0"].mixer
    seen = {}

    def keep(name, pick):
        def hook(module, *args):  # the first call's tensor; returns None: the call is unchanged
            seen.setdefault(name, pick(*args))

        return hook

    hooks = [
        mixer.register_forward_pre_hook(keep("x", lambda args: args[0])),
        mixer.attn.wo.register_forward_hook(keep("y", lambda args, out: out)),
        mixer.memory.theta_proj.register_forward_pre_hook(keep("gates", lambda args: args[0])),
    ]
    with torch.no_grad():  # 5 tokens: one piece of one segment, one call of each
        mixer(torch.randn(B, 5, 32), ForwardContext(positions=torch.arange(5).expand(B, 5)))
    for h in hooks:
        h.remove()
    assert torch.equal(seen["gates"], seen["y" if mac_output == "per_token" else "x"])
    assert not torch.equal(seen["y"], seen["x"])


def test_mac_output_is_checked():
    with pytest.raises(ConfigError, match="model.titans.mac_output"):
        load_config("configs/titans_mac_tiny.toml", ["model.vocab_size=512", "model.titans.mac_output='end'"])


def test_short_sequence_updates_memory(rel_err):
    """A prompt shorter than a chunk leaves the chunk-start weights alone (later tokens of the
    chunk still read them) but the running weights hold its update, whatever the pieces."""
    torch.manual_seed(0)
    model = build_model(_cfg("mag", chunk_size=8))
    ids = torch.randint(0, 61, (B, 5))
    with torch.no_grad():
        _, one = _decode(model, ids, [5])
        _, steps = _decode(model, ids, [2, 1, 2])
    init = [p.expand(B, *p.shape) for p in model.blocks["0"].mixer.memory.init]
    mem, mem2 = one.states["0"].memory, steps.states["0"].memory
    for p, w0, m, m2 in zip(init, mem.w0, mem.m, mem2.m):
        assert torch.equal(w0, p)
        assert (m - p).abs().max() > 1e-3
        assert rel_err(m2, m) <= 1e-5


def test_memory_carries_beyond_the_window():
    """MAG's attention sees 5 tokens; the first token still changes the last output, through the
    memory trained on it (and not through the conv, which reaches 3 tokens back)."""
    torch.manual_seed(0)
    model = build_model(_cfg("mag"))
    ids = torch.randint(0, 61, (1, 16))
    other = ids.clone()
    other[0, 0] = (ids[0, 0] + 1) % 61
    with torch.no_grad():
        diff = (model(ids)[0, -1] - model(other)[0, -1]).abs().max()
    assert diff > 1e-5


def test_trains_end_to_end(small_corpus, prepared_dir, tmp_path):
    from pretrain.train.trainer import train
    from tests.conftest import losses, tiny_overrides

    overrides = tiny_overrides(
        small_corpus, prepared_dir, tmp_path,
        **{
            "model.n_layers": 3,
            "model.layer_pattern": "'mac mag mal'",
            "model.titans.n_heads": 2,
            "model.titans.chunk_size": 8,
            "model.titans.segment_size": 16,
            "model.titans.n_persistent": 4,
            "train.max_steps": 6,
            "checkpoint.interval": 0,
            "optim.lr": 1e-2,
        },
    )
    train(load_config(None, overrides))
    logged = losses(tmp_path)
    assert sum(v for _, v in logged[-2:]) / 2 < logged[0][1]


@pytest.mark.parametrize("pattern", ["mac", "mag"])
def test_memory_stays_bounded_at_training_length(pattern):
    """The initial gates must keep the inner descent stable over realistic chunks (64 tokens)
    and a 256-token sequence: earlier gates (theta = max_lr/2, eta 0.88) blew the memory up
    to ~1e38 and the backward to NaN."""
    from pretrain.config import load_config

    cfg = load_config("configs/titans_mac_tiny.toml", [
        "model.vocab_size=512", f"model.layer_pattern='{pattern}'", "model.n_layers=2",
        "model.titans.chunk_size=64",
    ]).model
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, 512, (2, 256))
    logits = model(ids)
    logits.logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
    cache = model.new_cache(2)
    with torch.no_grad():
        model(ids, cache=cache)
    for state in cache.states.values():
        for w in state.memory.m:
            assert w.abs().max() < 10.0
