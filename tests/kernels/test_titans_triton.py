"""The Triton Titans memory kernels (linear memory, depth 1, and 2-layer MLP memory, depth 2)
against the token-by-token specification
kernels/titans/naive.py in fp64 and the PyTorch chunked path: reads, the final MemoryState and
every gradient (q, k, v, theta, eta, alpha, init, and the incoming w0, m, s), with both read modes,
documents packed by resets, positions not starting at 0 (a start mid-chunk), T not a multiple of
the chunk, T = 1, odd head widths, pieces cut inside a chunk; continuation (decoding) equals one
call; NaN-poisoned outputs; a bitwise-deterministic backward; bf16 inputs; 64-bit offsets.
Runs under TRITON_INTERPRET=1 (tests/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import kernels.titans as titans
import kernels.titans.chunk as titans_chunk
from kernels.titans import MemoryState, memory_scan
from kernels.titans import chunk_torch
from kernels.titans.naive import naive_memory_scan

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
# fp32 kernel vs fp64 loop: measured max |error| / (1 + |value|) 1.4e-4 (the PyTorch path in fp32:
# 1.4e-4 too), on d eta, where the log-space gates divide by eta (down to 0.003 here)
ATOL, RTOL = 5e-4, 5e-4
# bf16 inputs vs the fp64 loop on the same (bf16-rounded) inputs: the kernel computes in fp32, so
# the fp32 outputs keep fp32 errors (measured <= 4e-7); the gradients come back rounded to bf16
# (8 mantissa bits: measured max error 6e-2 on values up to 29, relative 3e-3)
BF16_OUT, BF16_GRAD = dict(atol=2e-4, rtol=1e-4), dict(atol=2e-2, rtol=1e-2)


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    if not INTERPRET and not torch.cuda.is_available():
        pytest.fail("TRITON_INTERPRET=0 needs CUDA; the kernel tests run under the interpreter on CPU")
    monkeypatch.setattr(titans_chunk, "POISON_OUTPUTS", True)


def make_inputs(b, t, h, d, first_position, chunk, resets, seed=0, dtype=torch.float32, depth=1, hidden=20):
    """Leaves q, k, v, theta, eta, alpha, init (one per layer), then w0, m, s (one per layer each;
    a memory mid-sequence: W0 != M, S != 0), positions and reset (row 0: a document starting at
    t // 2; row 1 at its first token). Depth 2 takes smaller learning rates: the MLP's inner
    descent diverges at theta ~ 0.5 over 40 tokens (in the fp64 reference too)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (F.normalize(torch.randn(b, t, h, d, generator=g), dim=-1) for _ in range(2))
    v = torch.randn(b, t, h, d, generator=g)
    theta = (0.5 if depth == 1 else 0.15) * torch.rand(b, t, h, generator=g)
    eta, alpha = torch.rand(b, t, h, generator=g), 0.3 * torch.rand(b, t, h, generator=g)
    dims = [d] + [hidden] * (depth - 1) + [d]
    init = [torch.randn(h, i, o, generator=g) / i**0.5 for i, o in zip(dims, dims[1:])]
    states = [p.expand(b, *p.shape) + 0.1 * torch.randn(b, *p.shape, generator=g) for _ in range(3) for p in init]
    positions = (torch.arange(t) + first_position).expand(b, t).clone()
    reset = None
    if resets:
        reset = torch.zeros(b, t, dtype=torch.bool)
        reset[0, t // 2] = reset[1, 0] = True
        positions[0, t // 2 :] = torch.arange(t - t // 2)
        positions[1] = torch.arange(t)
    leaves = [x.to(dtype) for x in (q, k, v, theta, eta, alpha, *init)] + states
    move = lambda z: None if z is None else z.to(DEVICE)  # noqa: E731
    return [move(x) for x in leaves], move(positions), move(reset)


def split(leaves):
    """(the six sequence tensors, init, MemoryState) of :func:`make_inputs`' leaves."""
    depth = (len(leaves) - 6) // 4
    init, st = leaves[6 : 6 + depth], leaves[6 + depth :]
    return leaves[:6], init, MemoryState(st[:depth], st[depth : 2 * depth], st[2 * depth :])


def run(fn, leaves, positions, chunk, reset, read, cast=None, seed=1):
    """Outputs (y, then w0, m, s per layer) and the gradients of a random weighting of them
    w.r.t. every leaf."""
    ins = [(x if cast is None else x.to(cast)).detach().requires_grad_() for x in leaves]
    args, init, st = split(ins)
    y, st = fn(*args, st, init, positions, chunk, reset, read)
    outs = [y, *st.w0, *st.m, *st.s]
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device) for o in outs]
    loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, ins, allow_unused=True)  # init is unused without resets
    return [o.detach() for o in outs], [torch.zeros_like(x) if gr is None else gr for x, gr in zip(ins, grads)]


def triton_scan(*args):
    return memory_scan(*args, backend="triton")


def names(depth):
    layers = [f"{n}{i}" for n in ("init", "w0", "m", "s") for i in range(depth)]
    return "q k v theta eta alpha".split() + layers


CASES = [
    # (depth, B, T, H, D, first position, chunk, resets)
    (1, 2, 1, 1, 12, 3, 4, False),  # one token, mid-chunk (decoding)
    (1, 2, 37, 2, 12, 2, 8, True),  # T not a multiple of the chunk or the tile, resets, odd D
    (1, 1, 36, 1, 20, 5, 20, False),  # chunk 20, tile 32: the cut at t = 32 falls inside a chunk
    (1, 2, 11, 1, 16, 0, 4, True),  # a document start exactly at t = 0 of row 1
    (2, 2, 1, 1, 12, 3, 4, False),  # the MLP memory (hidden width 20): one token, mid-chunk
    (2, 2, 19, 2, 12, 2, 8, True),  # resets, two heads, odd D and hidden width
    (2, 1, 36, 1, 12, 5, 20, False),  # the tile's cut inside a chunk
]


@pytest.mark.parametrize("read", ["chunk_start", "per_token"])
@pytest.mark.parametrize("case", CASES)
def test_matches_naive_and_torch_path(case, read):
    depth, b, t, h, d, first, chunk, resets = case
    leaves, positions, reset = make_inputs(b, t, h, d, first, chunk, resets, depth=depth)
    outs, grads = run(triton_scan, leaves, positions, chunk, reset, read)
    refs, ref_grads = run(naive_memory_scan, leaves, positions, chunk, reset, read, cast=torch.float64)
    torch_outs, torch_grads = run(chunk_torch.memory_scan, leaves, positions, chunk, reset, read)
    assert all(o.dtype == torch.float32 for o in outs)
    for name, o, r, p in zip(["y"] + names(depth)[6 + depth :], outs, refs, torch_outs):
        torch.testing.assert_close(o.double(), r, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")
        torch.testing.assert_close(o, p, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n} vs torch: {m}")
    for name, a, r, p in zip(names(depth), grads, ref_grads, torch_grads):
        assert a.dtype == torch.float32 and a.shape == p.shape, name
        torch.testing.assert_close(a.double(), r, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"d{n}: {m}")
        torch.testing.assert_close(a, p, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"d{n} vs torch: {m}")


@pytest.mark.parametrize(("depth", "read"), [(1, "chunk_start"), (1, "per_token"), (2, "per_token")])
def test_continuation_equals_one_call(depth, read):
    """Pieces of 5, 1, 1, 6 and 4 tokens (decoding steps among them), each starting from the
    state the previous one left (mid-chunk: M != W0), equal one call over the 17 tokens."""
    leaves, positions, _ = make_inputs(2, 17, 1, 12, 1, 4, False, seed=2, depth=depth)
    args, init, st = split(leaves)
    y, whole = triton_scan(*args, st, init, positions, 4, None, read)
    ys, start = [], 0
    for n in (5, 1, 1, 6, 4):
        sl = slice(start, start + n)
        yp, st = triton_scan(*(x[:, sl] for x in args), st, init, positions[:, sl], 4, None, read)
        ys.append(yp)
        start += n
    torch.testing.assert_close(torch.cat(ys, 1), y, atol=1e-5, rtol=1e-5)
    for a, c in zip((*st.w0, *st.m, *st.s), (*whole.w0, *whole.m, *whole.s)):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth", [1, 2])
def test_backward_is_bitwise_deterministic(depth):
    leaves, positions, reset = make_inputs(2, 21, 1, 12, 2, 8, True, seed=5, depth=depth)
    _, first = run(triton_scan, leaves, positions, 8, reset, "per_token")
    _, second = run(triton_scan, leaves, positions, 8, reset, "per_token")
    for name, a, c in zip(names(depth), first, second):
        assert torch.equal(a, c), name


@pytest.mark.parametrize(("depth", "read"), [(1, "chunk_start"), (1, "per_token"), (2, "per_token")])
def test_bf16_inputs_against_the_naive_loop(depth, read):
    """bf16 q, k, v, gates and init: outputs fp32, gradients in the inputs' dtypes."""
    leaves, positions, reset = make_inputs(2, 19, 1, 12, 2, 8, True, seed=7, depth=depth)
    low = [x.bfloat16() for x in leaves[: 6 + depth]] + leaves[6 + depth :]
    outs, grads = run(triton_scan, low, positions, 8, reset, read)
    refs, ref_grads = run(naive_memory_scan, low, positions, 8, reset, read, cast=torch.float64)
    assert outs[0].dtype == torch.float32 and grads[0].dtype == torch.bfloat16
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o.double(), r, **BF16_OUT)
    for name, a, r in zip(names(depth), grads, ref_grads):
        torch.testing.assert_close(a.double(), r, **BF16_GRAD, msg=lambda m, n=name: f"d{n}: {m}")


def test_offsets_past_2_31_elements():
    """q, k, v are views whose batch stride puts row 2 past 2^31 elements, in lazily allocated
    bf16 storages (only the touched pages exist). The views start 2^32 elements in, so an offset
    wrapped to 32 bits still lands inside the storage (zeros) and the comparison fails cleanly."""
    leaves, positions, reset = make_inputs(3, 5, 1, 12, 0, 4, True, seed=9, dtype=torch.bfloat16)
    stride_b, start = 2**30 + 64, 2**32  # row 2 starts at 2^31 + 128
    big = []
    for x in leaves[:3]:
        storage = torch.empty(start + 2 * stride_b + x[0].numel(), dtype=x.dtype, device=x.device)
        view = storage.as_strided(x.shape, (stride_b, *x.stride()[1:]), start)
        view.copy_(x)
        big.append(view)
    outs, grads = run(triton_scan, big + leaves[3:], positions, 4, reset, "per_token")
    refs, ref_grads = run(triton_scan, leaves, positions, 4, reset, "per_token")
    for o, r in zip(outs + grads, refs + ref_grads):
        assert torch.equal(o, r)


def test_unsupported_cases():
    """'triton' names what its kernels lack; 'auto' takes the PyTorch path for it."""
    leaves, positions, _ = make_inputs(1, 3, 1, 4, 0, 4, False, depth=3, hidden=6)
    args, init, st = split(leaves)
    with pytest.raises(ValueError, match=r"model\.kernels='triton'.*memory depth 3"):
        memory_scan(*args, st, init, positions, 4, backend="triton")
    args, init, st = split([x.double() for x in make_inputs(1, 3, 1, 4, 0, 4, False)[0]])
    with pytest.raises(ValueError, match=r"model\.kernels='triton'.*float64"):
        memory_scan(*args, st, init, positions, 4, backend="triton")


def test_auto_falls_back_where_the_kernels_lack_a_case(monkeypatch):
    """Where 'auto' would pick Triton (CUDA), a depth-3 memory runs the PyTorch path instead."""
    leaves, positions, _ = make_inputs(1, 3, 1, 4, 0, 4, False, depth=3, hidden=6)
    args, init, st = split(leaves)
    monkeypatch.setattr(titans, "select", lambda *a: "triton")
    y, _ = memory_scan(*args, st, init, positions, 4, backend="auto")
    ref, _ = chunk_torch.memory_scan(*args, st, init, positions, 4)
    assert torch.equal(y, ref)
