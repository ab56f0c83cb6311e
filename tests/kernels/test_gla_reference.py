"""kernels.gla's PyTorch path (chunk_gla, fused_recurrent_gla) against the token-by-token
specification kernels/gla/naive.py, in float64: outputs, final state and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.gla import chunk_gla, fused_recurrent_gla
from kernels.gla.naive import naive_recurrent_gla

TOL = dict(rtol=1e-9, atol=1e-9)


def _inputs(b, t, h, dk, dv, with_h0, resets, seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64)
    q, k = torch.randn(b, t, h, dk, **kw), torch.randn(b, t, h, dk, **kw)
    v = torch.randn(b, t, h, dv, **kw)
    g_log = F.logsigmoid(torch.randn(b, t, h, dk, **kw) + 2)
    h0 = torch.randn(b, h, dk, dv, **kw) if with_h0 else None
    reset = None
    if resets:
        reset = torch.zeros(b, t, dtype=torch.bool)
        reset[0, t // 2] = True
        reset[-1, 0] = True  # drops the initial state of the last row
    return [q, k, v, g_log, h0], reset


def _grads(fn, leaves, reset, seed=1):
    o, h = fn(*leaves, reset)
    g = torch.Generator().manual_seed(seed)
    go = torch.randn(o.shape, generator=g, dtype=o.dtype)
    gh = torch.randn(h.shape, generator=g, dtype=h.dtype)
    inputs = [z for z in leaves if z is not None]
    return o, h, torch.autograd.grad((o * go).sum() + (h * gh).sum(), inputs)


def _compare(tensors, reset, fn):
    leaves = [z.clone().requires_grad_() if z is not None else None for z in tensors]
    o, h, grads = _grads(fn, leaves, reset)
    o_ref, h_ref, grads_ref = _grads(
        lambda q, k, v, g, h0, r: naive_recurrent_gla(q, k, v, g, initial_state=h0, reset=r), leaves, reset
    )
    assert o.dtype == h.dtype == torch.float64
    torch.testing.assert_close(o, o_ref, **TOL)
    torch.testing.assert_close(h, h_ref, **TOL)
    for name, gr, gr_ref in zip("q k v g initial_state".split(), grads, grads_ref):
        torch.testing.assert_close(gr, gr_ref, **TOL, msg=lambda m, name=name: f"d{name}: {m}")


def _chunk(chunk_size):
    def fn(q, k, v, g, h0, reset):
        return chunk_gla(q, k, v, g, None, h0, True, reset=reset, chunk_size=chunk_size, backend="torch")

    return fn


def _recurrent(q, k, v, g, h0, reset):
    return fused_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True, reset=reset, backend="torch")


@pytest.mark.parametrize(("t", "chunk_size", "dk"), [(1, 16, 4), (19, 16, 4), (37, 32, 60), (21, 8, 6)])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("resets", [False, True])
def test_chunk_matches_naive(t, chunk_size, dk, with_h0, resets):
    """T = 1, T not a multiple of the chunk, K = 60, chunks with and without sub-chunks."""
    tensors, reset = _inputs(2, t, 2, dk, 5, with_h0, resets)
    _compare(tensors, reset, _chunk(chunk_size))


def test_strong_gates_stay_finite():
    """Log gates near -6 per token in fp32: a chunk of 64 decays by e^-380, which overflows in the
    naive exp(cum) / exp(-cum) factorisation; the sub-chunk split keeps every exponent <= 0."""
    (q, k, v, g, h0), _ = _inputs(1, 64, 1, 4, 4, True, False)
    g = 8 * g - 4.0
    q, k, v, g, h0 = (z.float().requires_grad_() for z in (q, k, v, g, h0))
    o, h = chunk_gla(q, k, v, g, None, h0, True, chunk_size=64, backend="torch")
    o_ref, h_ref = naive_recurrent_gla(q.double(), k.double(), v.double(), g.double(), initial_state=h0.double())
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-4, atol=1e-4)
    grads = torch.autograd.grad(o.sum() + h.sum(), (q, k, v, g, h0))
    assert all(torch.isfinite(gr).all() for gr in grads)


def test_a_document_start_forgets_everything_before():
    (q, k, v, g, h0), _ = _inputs(1, 20, 2, 4, 3, True, False)
    reset = torch.zeros(1, 20, dtype=torch.bool)
    reset[0, 11] = True
    o, h = _chunk(8)(q, k, v, g, h0, reset)
    o_tail, h_tail = _chunk(8)(q[:, 11:], k[:, 11:], v[:, 11:], g[:, 11:], None, None)
    torch.testing.assert_close(o[:, 11:], o_tail, **TOL)
    torch.testing.assert_close(h, h_tail, **TOL)


@pytest.mark.parametrize("t", [1, 7])
@pytest.mark.parametrize("resets", [False, True])
def test_fused_recurrent_matches_naive(t, resets):
    tensors, reset = _inputs(2, t, 2, 6, 3, True, resets)
    _compare(tensors, reset, _recurrent)


def test_cu_seqlens_is_a_reset_at_each_offset():
    (q, k, v, g, _), _ = _inputs(1, 12, 2, 4, 3, False, False)
    o, h = chunk_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 5, 12]), backend="torch")
    assert h is None
    parts = [naive_recurrent_gla(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b])[0] for a, b in ((0, 5), (5, 12))]
    torch.testing.assert_close(o, torch.cat(parts, dim=1), **TOL)


def test_scale_and_output_dtype():
    (q, k, v, g, h0), _ = _inputs(1, 9, 1, 4, 3, True, False)
    o, h = chunk_gla(q.float(), k.float(), v.bfloat16(), g.float(), 0.3, h0.float(), True, chunk_size=4)
    v = v.bfloat16().double()  # the rounding the inputs went through; the rest runs in fp32
    o_ref, h_ref = naive_recurrent_gla(q, k, v, g, scale=0.3, initial_state=h0)
    assert o.dtype == torch.bfloat16 and h.dtype == torch.float32
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-2, atol=1e-2)  # o rounded to bf16


def test_bad_inputs_raise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors: 'triton' cannot run uninterpreted
    (q, k, v, g, _), _ = _inputs(2, 4, 2, 4, 3, False, False)
    for fn in (chunk_gla, fused_recurrent_gla):
        with pytest.raises(ValueError, match="g "):
            fn(q, k, v, g[..., :3])
        with pytest.raises(ValueError, match="initial_state"):
            fn(q, k, v, g, initial_state=torch.zeros(2, 2, 4, 4, dtype=q.dtype))
        with pytest.raises(ValueError, match="reset"):
            fn(q, k, v, g, reset=torch.zeros(2, 3, dtype=torch.bool))
        with pytest.raises(ValueError, match="floating point"):
            fn(q, k.long(), v, g)
        with pytest.raises(ValueError, match="cu_seqlens"):
            fn(q, k, v, g, cu_seqlens=torch.tensor([0, 4]))  # B = 2
        with pytest.raises(ValueError, match=r"model\.kernels='triton'"):
            fn(q, k, v, g, backend="triton")
