"""kernels.titans' PyTorch path (closed-form chunked scan, dual-form per-token reads) against
the token-by-token specification kernels/titans/naive.py (inner gradients by autograd), in
float64: reads, the final memory, and every gradient incl. those of the initial memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.titans import MemoryState, memory_read, memory_scan
from kernels.titans.naive import naive_memory, naive_memory_scan

TOL = dict(rtol=1e-9, atol=1e-9)


def _inputs(b, t, h, d, depth, seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64)
    q, k = (F.normalize(torch.randn(b, t, h, d, **kw), dim=-1) for _ in range(2))
    v = torch.randn(b, t, h, d, **kw)
    theta = 0.5 * torch.rand(b, t, h, **kw)
    eta, alpha = torch.rand(b, t, h, **kw), 0.3 * torch.rand(b, t, h, **kw)
    dims = [d] + [6] * (depth - 1) + [d]
    init = [torch.randn(h, i, o, **kw) / i**0.5 for i, o in zip(dims, dims[1:])]
    # a memory mid-sequence: chunk-start and running weights differ, momentum is not zero
    state = [[p.expand(b, *p.shape) + 0.1 * torch.randn(b, *p.shape, **kw) for p in init] for _ in range(3)]
    return [q, k, v, theta, eta, alpha], init, state


def _flatten(y, st):
    return [y, *st.w0, *st.m, *st.s]


@pytest.mark.parametrize(("t", "d", "first_position"), [(1, 4, 0), (11, 4, 2), (6, 60, 1)])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("read", ["chunk_start", "per_token"])
@pytest.mark.parametrize("resets", [False, True])
def test_scan_matches_naive(t, d, first_position, depth, read, resets):
    """T = 1, T not a multiple of the chunk (4), head width 60, a start mid-chunk; packed
    documents reset the memory (row 0 at t // 2, row 1 at its first token)."""
    b, chunk = 2, 4
    tensors, init, state = _inputs(b, t, 2 if d < 60 else 1, d, depth)
    positions = (torch.arange(t) + first_position).expand(b, t).clone()
    reset = None
    if resets:
        reset = torch.zeros(b, t, dtype=torch.bool)
        reset[0, t // 2] = reset[1, 0] = True
        for r, s in ((0, t // 2), (1, 0)):
            positions[r, s:] = torch.arange(t - s)
    leaves = [z.clone().requires_grad_() for z in tensors + init + [w for ws in state for w in ws]]
    n, depth_ = len(tensors), len(init)
    args, init_, flat = leaves[:n], leaves[n : n + depth_], leaves[n + depth_ :]
    st = MemoryState(*(flat[i * depth_ : (i + 1) * depth_] for i in range(3)))
    outs = _flatten(*memory_scan(*args, st, init_, positions, chunk, reset, read, backend="torch"))
    refs = _flatten(*naive_memory_scan(*args, st, init_, positions, chunk, reset, read))
    assert outs[0].dtype == torch.float64
    for name, o, r in zip(["y"] + ["w0", "m", "s"] * depth_, outs, refs):
        torch.testing.assert_close(o, r, **TOL, msg=lambda m, name=name: f"{name}: {m}")
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(r.shape, generator=g, dtype=r.dtype) for r in refs]
    got = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), leaves, allow_unused=True)
    want = torch.autograd.grad(sum((r * w).sum() for r, w in zip(refs, weights)), leaves, allow_unused=True)
    names = "q k v theta eta alpha".split() + [f"init{i}" for i in range(depth_)]
    names += [f"{s}{i}" for s in ("w0", "m", "s") for i in range(depth_)]
    for name, a, c in zip(names, got, want):
        if a is None or c is None:  # e.g. init without a reset: both must agree it is unused
            assert a is None or not a.any(), name
            assert c is None or not c.any(), name
            continue
        torch.testing.assert_close(a, c, **TOL, msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("read", ["chunk_start", "per_token"])
@pytest.mark.parametrize("depth", [1, 2])
def test_scan_continues_from_a_state(depth, read, nan_poison):
    """Pieces of 3, 1, 5, 2 tokens chained through the state equal one call (pieces start inside
    chunks, where the running weights are not the chunk-start ones)."""
    args, init, _ = _inputs(2, 11, 2, 4, depth, seed=3)
    positions = torch.arange(11).expand(2, 11)
    scan = lambda a, st, pos: memory_scan(*a, st, init, pos, 4, read=read, backend="torch")  # noqa: E731
    y, st = scan(args, MemoryState.fresh(init, 2), positions)
    ys, st2, start = [], MemoryState.fresh(init, 2), 0
    for n in (3, 1, 5, 2):
        sl = slice(start, start + n)
        yp, st2 = scan([x[:, sl] for x in args], st2, positions[:, sl])
        ys.append(yp)
        start += n
    for a, b in zip(_flatten(torch.cat(ys, 1), st2), _flatten(y, st)):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("depth", [1, 2])
def test_memory_read_is_the_mlp(depth):
    _, init, state = _inputs(2, 1, 2, 4, depth)
    x = torch.randn(2, 2, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(memory_read(state[0], x), naive_memory(state[0], x), **TOL)


def test_bad_inputs_raise():
    (q, k, v, theta, eta, alpha), init, _ = _inputs(2, 5, 2, 4, 1)
    st, pos = MemoryState.fresh(init, 2), torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(ValueError, match="k "):
        memory_scan(q, k[:, :4], v, theta, eta, alpha, st, init, pos, 4)
    with pytest.raises(ValueError, match="read"):
        memory_scan(q, k, v, theta, eta, alpha, st, init, pos, 4, read="end")
    with pytest.raises(ValueError, match="floating point"):
        memory_scan(q, k, v, theta.long(), eta, alpha, st, init, pos, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        memory_scan(q, k, v, theta, eta, alpha, st, init, pos, 0)
    with pytest.raises(ValueError, match=r"model\.kernels='triton'.*Triton kernel does not support"):
        memory_scan(q, k, v, theta, eta, alpha, st, init, pos, 4, backend="triton")
