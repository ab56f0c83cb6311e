"""Titans memory: the chunked scan (chunk-start reads and per-token reads) against a per-token
autograd loop, and the MAC/MAG/MAL mixers' decoding parity, causality, document resets and
training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import AttentionConfig, ConfigError, ModelConfig, TitansConfig, load_config
from pretrain.models import build_model
from pretrain.models.context import ForwardContext
from pretrain.models.layers import titans
from kernels.titans.chunk_torch import MemoryState, memory_scan
from kernels.titans.naive import naive_memory_scan as naive_scan
from tests.models.util import decode_with_cache as _decode

B, H, D, HID = 2, 2, 4, 6


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(depth, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (F.normalize(torch.randn(B, t, H, D, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(B, t, H, D, generator=g)
    theta = 0.5 * torch.rand(B, t, H, generator=g)
    eta, alpha = torch.rand(B, t, H, generator=g), 0.3 * torch.rand(B, t, H, generator=g)
    dims = [D] + [HID] * (depth - 1) + [D]
    init = [torch.randn(H, i, o, generator=g) / i**0.5 for i, o in zip(dims, dims[1:])]
    leaves = [x.requires_grad_() for x in (q, k, v, theta, eta, alpha, *init)]
    return leaves


def _flatten(y, st):
    return [y, *st.w0, *st.m, *st.s]


@pytest.mark.parametrize("read", ["chunk_start", "per_token"])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_memory_scan_matches_naive(depth, packed, read, rel_err):
    t, chunk = 11, 4
    q, k, v, theta, eta, alpha, *init = _inputs(depth, t)
    if packed:  # row 0: documents of 6 and 5 tokens (a start inside a chunk); row 1: 3 and 8
        positions = torch.tensor([list(range(6)) + list(range(5)), list(range(3)) + list(range(8))])
        reset = positions == 0
    else:
        positions, reset = torch.arange(t).expand(B, t), None
    args = (q, k, v, theta, eta, alpha)
    outs = _flatten(*memory_scan(*args, MemoryState.fresh(init, B), init, positions, chunk, reset, read))
    refs = _flatten(*naive_scan(*args, MemoryState.fresh(init, B), init, positions, chunk, reset, read))
    for o, r in zip(outs, refs):
        assert rel_err(o, r) <= 1e-5
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(r.shape, generator=g) for r in refs]
    leaves = [q, k, v, theta, eta, alpha, *init]
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), leaves)
    want = torch.autograd.grad(sum((r * w).sum() for r, w in zip(refs, weights)), leaves)
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-4


@pytest.mark.parametrize("read", ["chunk_start", "per_token"])
@pytest.mark.parametrize("depth", [1, 2])
def test_memory_scan_continues_from_a_state(depth, read, rel_err, nan_poison):
    """Pieces of 3, 1, 5, 2 tokens chained through the state equal one call (pieces start inside
    chunks, where the running weights are not the chunk-start ones)."""
    q, k, v, theta, eta, alpha, *init = (x.detach() for x in _inputs(depth, 11, seed=3))
    positions = torch.arange(11).expand(B, 11)
    args = (q, k, v, theta, eta, alpha)
    y, st = memory_scan(*args, MemoryState.fresh(init, B), init, positions, 4, read=read)
    ys, st2, start = [], MemoryState.fresh(init, B), 0
    for n in (3, 1, 5, 2):
        sl = slice(start, start + n)
        yp, st2 = memory_scan(*(x[:, sl] for x in args), st2, init, positions[:, sl], 4, read=read)
        ys.append(yp)
        start += n
    for a, b in zip(_flatten(torch.cat(ys, 1), st2), _flatten(y, st)):
        assert rel_err(a, b) <= 1e-5


def test_memory_scan_rejects_bad_shapes():
    q, k, v, theta, eta, alpha, *init = (x.detach() for x in _inputs(1, 5))
    with pytest.raises(ValueError):
        memory_scan(q, k[:, :4], v, theta, eta, alpha, MemoryState.fresh(init, B), init, torch.zeros(B, 5), 4)
    with pytest.raises(ValueError, match="read"):
        memory_scan(q, k, v, theta, eta, alpha, MemoryState.fresh(init, B), init, torch.zeros(B, 5), 4, read="end")


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
