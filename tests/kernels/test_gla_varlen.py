"""Packed variable-length sequences (``cu_seqlens``, B = 1, each sequence with its own initial
and final state ``[N, H, K, V]``) equal a loop over the single sequences, for the Triton chunk and
recurrent kernels and both PyTorch paths: outputs, final states and every gradient including the
initial states. Lengths cross chunk boundaries, include 1 and a multiple of the chunk. Fresh
Triton outputs are NaN-poisoned. Runs under TRITON_INTERPRET=1 (tests/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch

import kernels.gla.chunk as gla_chunk
from kernels.gla import chunk_gla, fused_recurrent_gla

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend
ATOL, RTOL = 1e-5, 1e-5  # the same fp32 arithmetic per sequence: measured bitwise equal on CPU

LENGTHS = [5, 17, 1, 16, 9]  # T = 48


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    if not INTERPRET and not torch.cuda.is_available():
        pytest.fail("TRITON_INTERPRET=0 needs CUDA; the kernel tests run under the interpreter on CPU")
    monkeypatch.setattr(gla_chunk, "POISON_OUTPUTS", True)


def make_inputs(lengths, h, dk, dv, seed=0):
    t, n = sum(lengths), len(lengths)
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, t, h, dk, generator=gen) for _ in range(2))
    v = torch.randn(1, t, h, dv, generator=gen)
    g = torch.rand(1, t, h, dk, generator=gen) * -3.0
    h0 = torch.randn(n, h, dk, dv, generator=gen)
    do = torch.randn(1, t, h, dv, generator=gen)
    dht = torch.randn(n, h, dk, dv, generator=gen)
    return [z.to(DEVICE) for z in (q, k, v, g, h0, do, dht)]


def run(fn, q, k, v, g, h0, do, dht, cu_seqlens):
    leaves = [z.clone().requires_grad_() for z in (q, k, v, g, h0)]
    o, ht = fn(*leaves[:4], None, leaves[4], True, cu_seqlens)
    grads = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), leaves)
    return [o, ht, *grads]


def packed_and_looped(fn, lengths, h, dk, dv, cu_dtype=torch.int32):
    q, k, v, g, h0, do, dht = make_inputs(lengths, h, dk, dv)
    bounds = torch.tensor([0, *lengths]).cumsum(0)
    packed = run(fn, q, k, v, g, h0, do, dht, bounds.to(DEVICE, cu_dtype))
    parts = []
    for i, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        one = lambda z: z[:, a:b]  # noqa: E731
        parts.append(run(fn, one(q), one(k), one(v), one(g), h0[i : i + 1], one(do), dht[i : i + 1], None))
    # o, dq, dk, dv, dg are concatenated along T; ht and dh0 along N
    looped = [torch.cat([p[j] for p in parts], dim=0 if j in (1, 6) else 1) for j in range(7)]
    return packed, looped


def backend_fns():
    def chunk_torch(q, k, v, g, scale, h0, out, cu):
        return chunk_gla(q, k, v, g, scale, h0, out, cu, chunk_size=16, backend="torch")

    def recurrent_torch(q, k, v, g, scale, h0, out, cu):
        return fused_recurrent_gla(q, k, v, g, scale, h0, out, cu, backend="torch")

    def chunk_triton(q, k, v, g, scale, h0, out, cu):
        return chunk_gla(q, k, v, g, scale, h0, out, cu, backend="triton")

    def recurrent_triton(q, k, v, g, scale, h0, out, cu):
        return fused_recurrent_gla(q, k, v, g, scale, h0, out, cu, backend="triton")

    return [chunk_triton, recurrent_triton, chunk_torch, recurrent_torch]


@pytest.mark.parametrize("fn", backend_fns(), ids=lambda f: f.__name__)
def test_packed_equals_loop_over_sequences(fn):
    packed, looped = packed_and_looped(fn, LENGTHS, 2, 20, 12)
    for name, got, ref in zip(["o", "ht", "dq", "dk", "dv", "dg", "dh0"], packed, looped):
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")


def test_packed_kernels_agree_with_each_other_and_int64_offsets():
    """Chain: Triton chunk == Triton recurrent == PyTorch chunk on the packed batch (int64
    cu_seqlens, several key and value blocks)."""
    chunk_triton, recurrent_triton, chunk_torch, _ = backend_fns()
    lengths = [3, 18, 4]
    fns = (chunk_triton, recurrent_triton, chunk_torch)
    results = [packed_and_looped(fn, lengths, 1, 60, 72, torch.int64)[0] for fn in fns]
    for other in results[1:]:
        for name, got, ref in zip(["o", "ht", "dq", "dk", "dv", "dg", "dh0"], results[0], other):
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_single_sequence_cu_seqlens_equals_plain_call():
    q, k, v, g, h0, do, dht = make_inputs([7], 1, 8, 8)
    for fn in backend_fns()[:2]:
        with_cu = run(fn, q, k, v, g, h0, do, dht, torch.tensor([0, 7], device=DEVICE))
        plain = run(fn, q, k, v, g, h0, do, dht, None)
        for a, b in zip(with_cu, plain):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("fn", [chunk_gla, fused_recurrent_gla])
def test_states_must_be_per_sequence(fn):
    q, k, v, g, h0, _, _ = make_inputs([2, 3], 1, 4, 4)
    cu = torch.tensor([0, 2, 5], device=DEVICE)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=r"initial_state .* must be \(2, 1, 4, 4\)"):
            fn(q, k, v, g, None, h0[:1], True, cu, backend=backend)
        o, ht = fn(q, k, v, g, None, None, True, cu, backend=backend)
        assert o.shape == q.shape and ht.shape == (2, 1, 4, 4)
