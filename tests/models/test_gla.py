"""Gated Linear Attention: the mixer's cached decoding, packed documents, parameters and a short
training run (the GLA op itself: tests/kernels/test_gla_*.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import GLAConfig
from pretrain.models import build_model
from tests.models.util import decode as _decode


# ------------------------------------------------------------------------------ the mixer

T = 13


def _gla_cfg(make_cfg, pattern, **overrides):
    # chunk 4 < T: prefill and decode cross chunk boundaries and pad the last chunk
    return make_cfg(pattern, gla=GLAConfig(n_heads=2, chunk_size=4, gate_normalizer=4.0), init_std=0.2, **overrides)


@pytest.mark.parametrize("pattern", ["gla", "gla swa"])
def test_decoding_parity(make_cfg, rel_err, pattern):
    cfg = _gla_cfg(make_cfg, pattern)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, T))
    positions = torch.stack(
        [torch.cat([torch.arange(6), torch.arange(7)]), torch.cat([torch.arange(4), torch.arange(9)])]
    )
    with torch.no_grad():
        for pos in (None, positions):
            full = model(ids, pos)
            for chunks in ([1] * T, [3, 1, 5, 1, 3], [T]):
                assert rel_err(_decode(model, ids, chunks, pos), full) <= 1e-4, (pos is None, chunks)


def test_packed_equals_separate(make_cfg):
    cfg = _gla_cfg(make_cfg, "gla swa", n_layers=2)
    torch.manual_seed(0)
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    rows = [[5, 11], [3, 6, 7]]
    docs = [[torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in row] for row in rows]
    ids = torch.stack([torch.cat(row) for row in docs])
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])
    with torch.no_grad():
        packed = model(ids, positions)
        for b, row in enumerate(docs):
            start = 0
            for doc in row:
                alone = model(doc[None])[0]
                torch.testing.assert_close(packed[b, start : start + len(doc)], alone, rtol=1e-5, atol=1e-5)
                start += len(doc)
        cfg.doc_masking = False  # later documents now see their predecessors
        assert (model(ids, positions)[1, 3:] - packed[1, 3:]).abs().max() > 1e-3


def test_every_parameter_gets_a_gradient(make_cfg):
    cfg = _gla_cfg(make_cfg, "gla")
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    logits = model(ids, torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4], list(range(9))]))
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_parameter_names_and_init(make_cfg):
    cfg = _gla_cfg(make_cfg, "gla", d_model=64)
    mixer = build_model(cfg).blocks["0"].mixer
    assert mixer.q_proj.weight.shape == (32, 64) and mixer.v_proj.weight.shape == (64, 64)
    assert mixer.gk_proj[0].weight.shape == (16, 64) and mixer.gk_proj[1].weight.shape == (32, 16)
    assert mixer.g_norm.weight.shape == (32,) and torch.equal(mixer.gk_proj[1].bias, torch.zeros(32))
    assert mixer.new_state(3).h.shape == (3, 2, 16, 32)


def test_tiny_config_trains(small_corpus, prepared_dir, tmp_path):
    from pretrain.config import load_config
    from pretrain.train.trainer import train
    from tests.conftest import losses, tiny_overrides

    overrides = tiny_overrides(
        small_corpus,
        prepared_dir,
        tmp_path,
        **{
            "model.layer_pattern": "'gla'",
            "model.gla.n_heads": 2,
            "model.gla.chunk_size": 16,
            "train.max_steps": 6,
            "optim.lr": 3e-3,
        },
    )
    train(load_config(None, overrides), log=lambda *_: None)
    logged = [loss for _, loss in losses(tmp_path)]
    assert len(logged) >= 3
    assert sum(logged[-2:]) / 2 < logged[0]
