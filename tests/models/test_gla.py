"""Gated Linear Attention: chunk_gla against the per-token recurrence, the mixer's cached decoding,
packed documents and a short training run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import GLAConfig
from pretrain.models import build_model
from kernels.gla.chunk_torch import chunk_gla, recurrent_gla_step
from tests.models.util import decode as _decode


def naive_gla(q, k, v, g_log, h0=None, reset=None):
    """The paper's recurrence token by token, differentiated by autograd:
    S_t = Diag(exp(g_t)) S_{t-1} + k_t^T v_t, o_t = (q_t / sqrt(K)) S_t."""
    b, t, h, dk = q.shape
    s = q.new_zeros(b, h, dk, v.shape[-1]) if h0 is None else h0
    outs = []
    for i in range(t):
        alpha = torch.exp(g_log[:, i])  # [B, H, K]
        if reset is not None:
            alpha = alpha * (~reset[:, i]).float()[:, None, None]
        s = alpha[..., None] * s + k[:, i, ..., None] * v[:, i, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, i] * dk**-0.5, s))
    return torch.stack(outs, dim=1), s


def _inputs(b, t, h, dk, dv, with_h0, with_reset, strength=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, t, h, dk, generator=g), torch.randn(b, t, h, dk, generator=g)
    v = torch.randn(b, t, h, dv, generator=g)
    g_log = F.logsigmoid(strength * torch.randn(b, t, h, dk, generator=g) + 2)
    h0 = torch.randn(b, h, dk, dv, generator=g) if with_h0 else None
    reset = torch.rand(b, t, generator=g) < 0.1 if with_reset else None
    if reset is not None:
        reset[0, t // 2] = True
        reset[-1, 0] = True  # drops h0
    return [q, k, v, g_log, h0], reset


def _check_against_naive(tensors, reset, chunk_size, tol=1e-4):
    leaves = [z.clone().requires_grad_() if z is not None else None for z in tensors]
    o, h = chunk_gla(*leaves, reset=reset, chunk_size=chunk_size)
    o_ref, h_ref = naive_gla(*leaves, reset=reset)
    torch.testing.assert_close(o, o_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(h, h_ref, rtol=tol, atol=tol)
    go, gh = torch.randn_like(o), torch.randn_like(h)
    inputs = [z for z in leaves if z is not None]
    grads = torch.autograd.grad((o * go).sum() + (h * gh).sum(), inputs)
    grads_ref = torch.autograd.grad((o_ref * go).sum() + (h_ref * gh).sum(), inputs)
    for name, g, g_ref in zip("q k v g_log h0".split(), grads, grads_ref):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize(("t", "chunk_size"), [(1, 8), (19, 8), (37, 32), (40, 64)])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("with_reset", [False, True])
def test_chunk_matches_naive(t, chunk_size, with_h0, with_reset, nan_poison):
    tensors, reset = _inputs(2, t, 2, 4, 6, with_h0, with_reset)
    _check_against_naive(tensors, reset, chunk_size)


def test_strong_gates_stay_finite():
    """Log gates near -6 per token: a chunk of 64 decays by e^-380, which overflows fp32 in the
    naive exp(cum) / exp(-cum) factorisation; the sub-chunk split keeps every exponent <= 0."""
    tensors, reset = _inputs(1, 64, 1, 4, 4, with_h0=True, with_reset=False, strength=8.0)
    tensors[3] = tensors[3] - 4.0
    _check_against_naive(tensors, reset, chunk_size=64)


def test_reset_drops_the_carried_state():
    (q, k, v, g_log, h0), _ = _inputs(1, 20, 2, 4, 3, with_h0=True, with_reset=False)
    reset = torch.zeros(1, 20, dtype=torch.bool)
    reset[0, 11] = True
    o, h = chunk_gla(q, k, v, g_log, h0=h0, reset=reset, chunk_size=8)
    o_tail, h_tail = chunk_gla(q[:, 11:], k[:, 11:], v[:, 11:], g_log[:, 11:], chunk_size=8)
    torch.testing.assert_close(o[:, 11:], o_tail)
    torch.testing.assert_close(h, h_tail)


def test_step_is_one_token_of_the_recurrence():
    (q, k, v, g_log, h0), _ = _inputs(3, 1, 2, 4, 5, with_h0=True, with_reset=False, seed=1)
    reset = torch.tensor([[True], [False], [False]])
    o, h = recurrent_gla_step(q[:, 0], k[:, 0], v[:, 0], g_log[:, 0], h0, reset=reset[:, 0])
    o_ref, h_ref = naive_gla(q, k, v, g_log, h0, reset)
    torch.testing.assert_close(o, o_ref[:, 0])
    torch.testing.assert_close(h, h_ref)


def test_bad_shapes_raise():
    (q, k, v, g_log, _), _ = _inputs(2, 4, 2, 4, 3, False, False)
    with pytest.raises(ValueError, match="g_log"):
        chunk_gla(q, k, v, g_log[..., :3])
    with pytest.raises(ValueError, match="h0"):
        chunk_gla(q, k, v, g_log, h0=torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="reset"):
        chunk_gla(q, k, v, g_log, reset=torch.zeros(2, 3, dtype=torch.bool))


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
