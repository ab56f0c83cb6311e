"""The Triton chunked GLA kernel against a naive token loop (fp64) and the PyTorch chunked
reference: outputs, final states and every gradient, with documents packed by resets, an initial
state, strong and weak gates, lengths that are not a multiple of the chunk, and key/value sizes
that are not powers of two (K = V = 128, 60, 100: several key and value blocks). Fresh outputs
are NaN-poisoned so an element the kernel forgets to write fails the comparison. Runs under
TRITON_INTERPRET=1 (tests/kernels/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch

import kernels.gla.chunk as gla_chunk
from kernels.gla.chunk import chunk_gla_triton
from kernels.gla.chunk_torch import chunk_gla

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
# fp32 kernel vs fp64 loop; measured max abs error <= 1.1e-5 on outputs and gradients of size ~10
ATOL, RTOL = 1e-4, 1e-4


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    if not INTERPRET and not torch.cuda.is_available():
        pytest.fail("TRITON_INTERPRET=0 needs CUDA; the kernel tests run under the interpreter on CPU")
    monkeypatch.setattr(gla_chunk, "POISON_OUTPUTS", True)


def naive_gla(q, k, v, g, scale, h0=None, reset=None):
    """The recurrence token by token in fp64: S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t."""
    b, t, h, dk = q.shape
    q, k, v, g = (z.double() for z in (q, k, v, g))
    state = q.new_zeros(b, h, dk, v.shape[-1]) if h0 is None else h0.double()
    out = []
    for i in range(t):
        alpha = g[:, i].exp()
        if reset is not None:
            alpha = alpha * (~reset[:, i]).double()[:, None, None]
        state = alpha.unsqueeze(-1) * state + k[:, i].unsqueeze(-1) * v[:, i].unsqueeze(-2)
        out.append(scale * (q[:, i].unsqueeze(-2) @ state).squeeze(-2))
    return torch.stack(out, 1), state


def make_inputs(b, t, h, dk, dv, gate_min, with_h0, with_reset, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, t, h, dk, generator=gen) for _ in range(2))
    v = torch.randn(b, t, h, dv, generator=gen)
    g = torch.rand(b, t, h, dk, generator=gen) * gate_min  # in [gate_min, 0]
    h0 = torch.randn(b, h, dk, dv, generator=gen) if with_h0 else None
    reset = None
    if with_reset:
        reset = torch.rand(b, t, generator=gen) < 0.15
        reset[0, 0] = True  # a document starting at the first token drops h0
        if t > 17:
            reset[-1, 16] = True  # one starting exactly on a chunk boundary
    move = lambda z: None if z is None else z.to(DEVICE)  # noqa: E731
    return [move(z) for z in (q, k, v, g, h0, reset)]


CASES = [
    # (B, T, H, K, V, gate_min, h0, reset)
    (1, 1, 1, 16, 16, -5.0, True, False),  # a single token
    (2, 37, 2, 12, 20, -5.0, True, True),  # T not a multiple of 16, odd sizes, strong gates
    (1, 33, 1, 20, 12, -0.02, False, True),  # weak gates: the state carries far
    (1, 32, 2, 16, 72, -1.0, True, False),  # three value blocks (32 + 32 + 8), T a multiple of 16
    (2, 19, 1, 8, 8, -5.0, False, False),  # no h0, no resets
    (1, 20, 1, 128, 128, -1.0, True, True),  # K = V = 128: 4 x 4 tiles of 32 x 32
    (1, 18, 1, 60, 100, -3.0, True, True),  # odd head sizes: key blocks 32 + 28, value blocks 32 x 3 + 4
    (1, 17, 1, 100, 60, -0.05, True, False),  # key blocks 32 x 3 + 4
]


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_naive_and_torch_chunked(case):
    b, t, h, dk, dv, gate_min, with_h0, with_reset = case
    q, k, v, g, h0, reset = make_inputs(b, t, h, dk, dv, gate_min, with_h0, with_reset)
    scale = dk**-0.5
    o, ht = chunk_gla_triton(q, k, v, g, initial_state=h0, output_final_state=True, reset=reset)
    o_ref, ht_ref = naive_gla(q, k, v, g, scale, h0, reset)
    torch.testing.assert_close(o.double(), o_ref, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ht.double(), ht_ref, atol=ATOL, rtol=RTOL)
    assert o.dtype == v.dtype and ht.dtype == torch.float32
    o_chunk, ht_chunk = chunk_gla(q, k, v, g, h0, reset)
    torch.testing.assert_close(o, o_chunk, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(ht, ht_chunk, atol=ATOL, rtol=RTOL)
    o_only, none = chunk_gla_triton(q, k, v, g, initial_state=h0, reset=reset)
    assert none is None and torch.equal(o_only, o)


def run_backward(q, k, v, g, h0, reset, do, dht, kernel):
    ins = [z.detach().clone().requires_grad_() for z in (q, k, v, g)]
    h0_in = h0.detach().clone().requires_grad_() if h0 is not None else None
    if kernel:
        o, ht = chunk_gla_triton(*ins, initial_state=h0_in, output_final_state=True, reset=reset)
    else:
        o, ht = naive_gla(*ins, q.shape[-1] ** -0.5, h0_in, reset)
    ((o * do).sum() + (ht * dht).sum()).backward()
    return [z.grad for z in ins] + ([h0_in.grad] if h0 is not None else [])


@pytest.mark.parametrize("case", CASES)
def test_gradients_match_naive_loop(case):
    b, t, h, dk, dv, gate_min, with_h0, with_reset = case
    q, k, v, g, h0, reset = make_inputs(b, t, h, dk, dv, gate_min, with_h0, with_reset)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(b, t, h, dv, generator=gen).to(DEVICE)
    dht = torch.randn(b, h, dk, dv, generator=gen).to(DEVICE)
    grads = run_backward(q, k, v, g, h0, reset, do, dht, kernel=True)
    refs = run_backward(q, k, v, g, h0, reset, do, dht, kernel=False)
    for name, got, ref in zip(["dq", "dk", "dv", "dg", "dh0"], grads, refs):
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.double(), ref.double(), atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")


def test_gradients_without_final_state_grad():
    """Only o carries a gradient: the final-state term of dg must vanish, not read garbage."""
    q, k, v, g, h0, reset = make_inputs(1, 21, 1, 12, 12, -3.0, True, True, seed=3)
    do = torch.randn(1, 21, 1, 12, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    ins = [z.clone().requires_grad_() for z in (q, k, v, g, h0)]
    o, _ = chunk_gla_triton(*ins[:4], initial_state=ins[4], reset=reset)
    (o * do).sum().backward()
    refs = [z.clone().requires_grad_() for z in (q, k, v, g, h0)]
    o_ref, _ = naive_gla(*refs[:4], 12**-0.5, refs[4], reset)
    (o_ref * do).sum().backward()
    for got, ref in zip(ins, refs):
        torch.testing.assert_close(got.grad.double(), ref.grad.double(), atol=ATOL, rtol=RTOL)


def test_backward_is_bitwise_deterministic():
    q, k, v, g, h0, reset = make_inputs(2, 37, 1, 12, 72, -5.0, True, True, seed=5)
    gen = torch.Generator().manual_seed(6)
    do = torch.randn(2, 37, 1, 72, generator=gen).to(DEVICE)
    dht = torch.randn(2, 1, 12, 72, generator=gen).to(DEVICE)
    first = run_backward(q, k, v, g, h0, reset, do, dht, kernel=True)
    second = run_backward(q, k, v, g, h0, reset, do, dht, kernel=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_bf16_inputs_against_the_loop_on_rounded_inputs():
    """bf16 q, k, v, g (fp32 state): o and the gradients come back in bf16; compared with the
    fp64 loop on the same bf16 values, the bf16 rounding of the results dominates (measured max
    abs error 0.21 on dg of size ~40, 0.03 on o of size ~6, 1e-6 on the fp32 final state)."""
    q, k, v, g, h0, reset = make_inputs(2, 20, 1, 20, 12, -2.0, True, True, seed=7)
    low = [z.bfloat16() for z in (q, k, v, g)]
    gen = torch.Generator().manual_seed(8)
    do = torch.randn(2, 20, 1, 12, generator=gen).to(DEVICE).bfloat16()  # what a bf16 o receives
    dht = torch.randn(2, 1, 20, 12, generator=gen).to(DEVICE)
    ins = [z.clone().requires_grad_() for z in (*low, h0)]
    o, ht = chunk_gla_triton(*ins[:4], initial_state=ins[4], output_final_state=True, reset=reset)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    ((o * do).float().sum() + (ht * dht).sum()).backward()
    assert [z.grad.dtype for z in ins] == [torch.bfloat16] * 4 + [torch.float32]
    refs = [z.double().requires_grad_() for z in (*low, h0)]
    o_ref, ht_ref = naive_gla(*refs[:4], 20**-0.5, refs[4], reset)
    ((o_ref * do.double()).sum() + (ht_ref * dht.double()).sum()).backward()
    pairs = [(o, o_ref), (ht, ht_ref)] + [(z.grad, r.grad) for z, r in zip(ins, refs)]
    for name, (got, ref) in zip(["o", "ht", "dq", "dk", "dv", "dg", "dh0"], pairs):
        torch.testing.assert_close(got.double(), ref, atol=0.1, rtol=0.02, msg=lambda m, n=name: f"{n}: {m}")


def test_bad_state_and_reset_shapes_raise():
    q = torch.zeros(1, 4, 1, 8)
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gla_triton(q, q, q, q, initial_state=torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="reset"):
        chunk_gla_triton(q, q, q, q, reset=torch.zeros(1, 5, dtype=torch.bool))
