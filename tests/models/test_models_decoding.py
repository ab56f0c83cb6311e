"""Cached decoding: one forward == token by token == uneven chunks."""

from __future__ import annotations

import pytest
import torch

from pretrain.models import build_model
from tests.models.util import decode as _decode

T = 13  # longer than the window (4) of 'swa'


@pytest.mark.parametrize("pattern", ["attn", "swa", "mamba", "mamba swa attn"])
def test_decoding_parity(make_cfg, pattern, rel_err):
    cfg = make_cfg(pattern, init_std=0.2)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    with torch.no_grad():
        full = model(ids)
        assert rel_err(_decode(model, ids, [1] * T), full) <= 1e-4
        assert rel_err(_decode(model, ids, [3, 1, 5, 1, 3]), full) <= 1e-4
        assert rel_err(_decode(model, ids, [T]), full) <= 1e-4


def test_decoding_parity_with_document_starts(make_cfg, rel_err):
    """Packed documents fed through the cache in pieces: resets inside chunks and at steps."""
    cfg = make_cfg("mamba swa attn", init_std=0.2)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    positions = torch.stack([torch.cat([torch.arange(6), torch.arange(7)]), torch.cat([torch.arange(4), torch.arange(9)])])
    with torch.no_grad():
        full = model(ids, positions)
        assert rel_err(_decode(model, ids, [1] * T, positions), full) <= 1e-4
        assert rel_err(_decode(model, ids, [5, 1, 3, 4], positions), full) <= 1e-4


def test_sliding_window_cache_is_bounded(make_cfg):
    """A window layer's cache is a ring of ``window`` slots however many tokens pass through it
    (a prompt, then single tokens wrapping the ring several times); a full layer's grows."""
    cfg = make_cfg("swa attn")
    model = build_model(cfg)
    cache = model.new_cache(1)
    w = cfg.attention.window
    with torch.no_grad():
        model(torch.randint(0, 61, (1, 7)), cache=cache)
        for _ in range(3 * w):
            model(torch.randint(0, 61, (1, 1)), cache=cache)
            assert cache.states["0"].capacity == w
    assert cache.states["0"].length == cache.states["1"].length == 7 + 3 * w
    assert cache.states["1"].capacity >= 7 + 3 * w


def test_reserved_cache_is_static(make_cfg, rel_err):
    """``new_cache(B, max_tokens)`` allocates every K/V buffer once: decoding ``max_tokens``
    tokens one at a time never moves them, and gives the full forward's logits."""
    cfg = make_cfg("swa attn", init_std=0.2)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    cache = model.new_cache(2, T)
    before = {name: s.k.data_ptr() for name, s in cache.states.items()}
    with torch.no_grad():
        out = torch.cat([model(ids[:, i : i + 1], cache=cache) for i in range(T)], dim=1)
        assert rel_err(out, model(ids)) <= 1e-4
    assert {name: s.k.data_ptr() for name, s in cache.states.items()} == before
    assert cache.states["1"].capacity == T and cache.states["0"].capacity == cfg.attention.window
