"""The Triton fused recurrent GLA kernel (kernels/gla/fused_recurrent.py) against the token loop
of kernels/gla/naive.py in fp64 and against the Triton chunk kernel (the chain Triton chunk ->
Triton recurrent -> torch -> naive): outputs, final states and every gradient including the
initial state, with resets, strong and weak gates, T = 1, several key and value blocks and sizes
that are not powers of two. Fresh outputs are NaN-poisoned; the backward runs twice and must
agree bitwise. Runs under TRITON_INTERPRET=1 (tests/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch

import kernels.gla.chunk as gla_chunk
from kernels.gla import fused_recurrent_gla as public_fused_recurrent_gla
from kernels.gla.chunk import chunk_gla_triton
from kernels.gla.fused_recurrent import fused_recurrent_gla
from kernels.gla.naive import naive_recurrent_gla

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend
# fp32 kernel vs fp64 loop: measured max abs error 8.4e-6 (dg, values up to 39), o 1.9e-6
ATOL, RTOL = 1e-4, 1e-4
# bf16 inputs, outputs and gradients vs the fp64 loop on the same bf16-rounded inputs: the bf16
# rounding of the results (2^-9 relative) dominates; measured max abs error 0.21 on dg (values
# up to 39), 0.031 on o (up to 6), 3e-6 on the fp32 final state
BF16_ATOL, BF16_RTOL = 0.1, 0.02


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    if not INTERPRET and not torch.cuda.is_available():
        pytest.fail("TRITON_INTERPRET=0 needs CUDA; the kernel tests run under the interpreter on CPU")
    monkeypatch.setattr(gla_chunk, "POISON_OUTPUTS", True)


def make_inputs(b, t, h, dk, dv, gate_min, with_h0, with_reset, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, t, h, dk, generator=gen) for _ in range(2))
    v = torch.randn(b, t, h, dv, generator=gen)
    g = torch.rand(b, t, h, dk, generator=gen) * gate_min  # in [gate_min, 0]
    h0 = torch.randn(b, h, dk, dv, generator=gen) if with_h0 else None
    reset = None
    if with_reset:
        reset = torch.rand(b, t, generator=gen) < 0.2
        reset[0, 0] = True  # drops h0 of the first row
        reset[-1, t // 2] = True
    move = lambda z: None if z is None else z.to(DEVICE)  # noqa: E731
    return [move(z) for z in (q, k, v, g, h0)], move(reset)


def grads_of(fn, tensors, reset, do, dht, dtype=None):
    """(o, final state, [dq, dk, dv, dg, dh0]) of ``sum(o * do) + sum(ht * dht)``."""
    leaves = [z.detach().to(dtype or z.dtype).clone().requires_grad_() if z is not None else None for z in tensors]
    o, ht = fn(*leaves[:4], initial_state=leaves[4], reset=reset)
    loss = (o.to(do.dtype) * do).sum() + (ht.to(dht.dtype) * dht).sum()
    inputs = [z for z in leaves if z is not None]
    return o, ht, torch.autograd.grad(loss, inputs)


def recurrent(q, k, v, g, initial_state, reset):
    return fused_recurrent_gla(q, k, v, g, initial_state=initial_state, output_final_state=True, reset=reset)


def chunked(q, k, v, g, initial_state, reset):
    return chunk_gla_triton(q, k, v, g, initial_state=initial_state, output_final_state=True, reset=reset)


def naive(q, k, v, g, initial_state, reset):
    return naive_recurrent_gla(q, k, v, g, initial_state=initial_state, reset=reset)


def cotangents(tensors):
    """Random gradients of o [B, T, H, V] and of the final state [B, H, K, V]."""
    (b, t, h, dk), dv = tensors[0].shape, tensors[2].shape[-1]
    gen = torch.Generator().manual_seed(1)
    return torch.randn(b, t, h, dv, generator=gen).to(DEVICE), torch.randn(b, h, dk, dv, generator=gen).to(DEVICE)


CASES = [
    # (B, T, H, K, V, gate_min, h0, reset)
    (1, 1, 1, 16, 16, -5.0, True, False),  # a single token (decoding)
    (2, 1, 2, 12, 20, -1.0, True, True),  # a single token that starts a document in row 0
    (2, 9, 2, 12, 20, -5.0, True, True),  # odd sizes, strong gates, resets
    (1, 13, 1, 20, 12, -0.02, False, True),  # weak gates: the state carries far
    (1, 5, 1, 100, 72, -1.0, True, False),  # two key blocks (64 + 36) and two value blocks (64 + 8)
    (1, 3, 1, 128, 128, -1.0, True, True),  # K = V = 128: 2 x 2 tiles of 64 x 64
]


@pytest.mark.parametrize("case", CASES)
def test_matches_naive_and_chunk_kernel(case):
    b, t, h, dk, dv, gate_min, with_h0, with_reset = case
    tensors, reset = make_inputs(b, t, h, dk, dv, gate_min, with_h0, with_reset)
    do, dht = cotangents(tensors)
    o, ht, grads = grads_of(recurrent, tensors, reset, do, dht)
    assert o.dtype == torch.float32 and ht.dtype == torch.float32
    o_ref, ht_ref, grads_ref = grads_of(naive, tensors, reset, do.double(), dht.double(), torch.float64)
    o_chunk, ht_chunk, grads_chunk = grads_of(chunked, tensors, reset, do, dht)
    names = ["o", "ht", "dq", "dk", "dv", "dg", "dh0"]
    triples = zip([o, ht, *grads], [o_ref, ht_ref, *grads_ref], [o_chunk, ht_chunk, *grads_chunk])
    for name, (got, ref, link) in zip(names, triples):
        torch.testing.assert_close(got.double(), ref, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n} vs naive: {m}")
        torch.testing.assert_close(got, link, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n} vs chunk: {m}")


def test_public_function_dispatches_to_the_kernel():
    """kernels.gla.fused_recurrent_gla with backend='triton' runs this kernel (same bits)."""
    (q, k, v, g, h0), reset = make_inputs(2, 4, 2, 8, 8, -1.0, True, True, seed=2)
    o, ht = public_fused_recurrent_gla(q, k, v, g, None, h0, True, reset=reset, backend="triton")
    o_k, ht_k = fused_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True, reset=reset)
    assert torch.equal(o, o_k) and torch.equal(ht, ht_k)
    o_only, none = public_fused_recurrent_gla(q, k, v, g, None, h0, reset=reset, backend="triton")
    assert none is None and torch.equal(o_only, o)


def test_gradients_without_final_state_grad():
    """Only o carries a gradient: the final-state term of dg must vanish, not read garbage."""
    (q, k, v, g, h0), reset = make_inputs(1, 7, 1, 12, 12, -3.0, True, True, seed=3)
    do = torch.randn(1, 7, 1, 12, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    ins = [z.clone().requires_grad_() for z in (q, k, v, g, h0)]
    o, none = fused_recurrent_gla(*ins[:4], initial_state=ins[4], reset=reset)
    assert none is None
    (o * do).sum().backward()
    refs = [z.double().requires_grad_() for z in (q, k, v, g, h0)]
    (naive(*refs, reset)[0] * do.double()).sum().backward()
    for got, ref in zip(ins, refs):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=ATOL, rtol=RTOL)


def test_backward_is_bitwise_deterministic():
    tensors, reset = make_inputs(2, 6, 1, 100, 72, -5.0, True, True, seed=5)
    do, dht = cotangents(tensors)
    first = grads_of(recurrent, tensors, reset, do, dht)[2]
    second = grads_of(recurrent, tensors, reset, do, dht)[2]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_bf16_inputs_against_the_loop_on_rounded_inputs():
    tensors, reset = make_inputs(2, 6, 2, 20, 12, -2.0, True, True, seed=7)
    tensors = [z.bfloat16() for z in tensors[:4]] + [tensors[4]]  # the state stays fp32
    do, dht = cotangents(tensors)
    o, ht, grads = grads_of(recurrent, tensors, reset, do, dht)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    o_ref, ht_ref, grads_ref = grads_of(naive, tensors, reset, do.double(), dht.double(), torch.float64)
    assert [z.dtype for z in grads] == [torch.bfloat16] * 4 + [torch.float32]
    for name, got, ref in zip(["o", "ht", "dq", "dk", "dv", "dg", "dh0"], [o, ht, *grads], [o_ref, ht_ref, *grads_ref]):
        torch.testing.assert_close(got.double(), ref, atol=BF16_ATOL, rtol=BF16_RTOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(
    "shapes",
    [
        dict(q=(1, 4, 1, 8), k=(1, 4, 1, 9), v=(1, 4, 1, 8), g=(1, 4, 1, 8)),
        dict(q=(1, 4, 1, 8), k=(1, 4, 1, 8), v=(1, 5, 1, 8), g=(1, 4, 1, 8)),
        dict(q=(1, 0, 1, 8), k=(1, 0, 1, 8), v=(1, 0, 1, 8), g=(1, 0, 1, 8)),
    ],
)
@pytest.mark.parametrize("fn", [fused_recurrent_gla, chunk_gla_triton], ids=["recurrent", "chunk"])
def test_bad_shapes_raise(shapes, fn):
    args = [torch.zeros(s) for s in shapes.values()]
    with pytest.raises(ValueError, match=fn.__name__):
        fn(*args)


def test_bad_state_reset_and_offsets_raise():
    q = torch.zeros(1, 4, 1, 8)
    with pytest.raises(ValueError, match="initial_state"):
        fused_recurrent_gla(q, q, q, q, initial_state=torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="reset"):
        fused_recurrent_gla(q, q, q, q, reset=torch.zeros(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="cu_seqlens"):
        fused_recurrent_gla(q, q, q, q, cu_seqlens=torch.tensor([0, 3, 3, 4]))
    with pytest.raises(ValueError, match="initial_state"):  # two sequences need two states
        fused_recurrent_gla(q, q, q, q, initial_state=torch.zeros(1, 1, 8, 8), cu_seqlens=torch.tensor([0, 1, 4]))
