"""kernels.ssd's PyTorch path (the paper's chunked algorithm) against the token-by-token
specification kernels/ssd/naive.py, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.ssd import ssd_chunked, ssd_step
from kernels.ssd.chunk_torch import segsum
from kernels.ssd.naive import naive_ssd

TOL = dict(rtol=1e-9, atol=1e-9)


def _inputs(b, t, h, p, g, n, with_h0, resets, seed=0):
    gen = torch.Generator().manual_seed(seed)
    kw = dict(generator=gen, dtype=torch.float64)
    x = torch.randn(b, t, h, p, **kw)
    dt = F.softplus(torch.randn(b, t, h, **kw) - 1)
    A = -torch.exp(torch.randn(h, **kw))
    B, C = torch.randn(b, t, g, n, **kw), torch.randn(b, t, g, n, **kw)
    D = torch.randn(h, **kw)
    h0 = torch.randn(b, h, p, n, **kw) if with_h0 else None
    reset = None
    if resets:
        reset = torch.zeros(b, t, dtype=torch.bool)
        reset[0, t // 2] = True
        reset[-1, 0] = True  # drops the initial state of the last row
        if t > 4:
            reset[0, 4] = reset[0, 5] = True  # at a chunk start, and back to back
    return [x, dt, A, B, C, D, h0], reset


def _run(fn, leaves, reset):
    y, h = fn(*leaves, reset)
    g = torch.Generator().manual_seed(1)
    gy, gh = torch.randn(y.shape, generator=g, dtype=y.dtype), torch.randn(h.shape, generator=g, dtype=h.dtype)
    inputs = [z for z in leaves if z is not None]
    return y, h, torch.autograd.grad((y * gy).sum() + (h * gh).sum(), inputs)


@pytest.mark.parametrize(("t", "p", "chunk_size"), [(1, 4, 4), (13, 60, 4), (8, 3, 4), (11, 5, 64)])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("resets", [False, True])
@pytest.mark.parametrize("skip", [False, True])
def test_chunked_matches_naive(t, p, chunk_size, with_h0, resets, skip):
    """T = 1, T not a multiple of the chunk, head dim 60, two groups of two heads, with and
    without D; every gradient incl. the initial state's."""
    tensors, reset = _inputs(2, t, 4, p, 2, 3, with_h0, resets)
    if not skip:
        tensors[5] = None
    leaves = [z.clone().requires_grad_() if z is not None else None for z in tensors]
    chunk = lambda *a: ssd_chunked(*a[:-1], reset=a[-1], chunk_size=chunk_size, backend="torch")  # noqa: E731
    y, h, grads = _run(chunk, leaves, reset)
    y_ref, h_ref, grads_ref = _run(lambda *a: naive_ssd(*a[:-1], reset=a[-1]), leaves, reset)
    assert y.dtype == h.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(h, h_ref, **TOL)
    names = [n for n, z in zip("x dt A B C D initial_state".split(), leaves) if z is not None]
    for name, gr, gr_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(gr, gr_ref, **TOL, msg=lambda m, name=name: f"d{name}: {m}")


def test_segsum_is_sums_of_segments_without_nan():
    a = torch.tensor([0.5, -1.0, float("-inf"), 2.0])
    s = segsum(a)
    for i in range(4):
        for j in range(4):
            want = a[j + 1 : i + 1].sum() if j <= i else float("-inf")
            assert s[i, j] == want, (i, j)
    assert not s.isnan().any()


def test_a_document_start_forgets_everything_before():
    """After a reset the outputs equal a fresh call on the tail (chunk of 4, a start on a chunk
    boundary and one right after it)."""
    (x, dt, A, B, C, D, h0), _ = _inputs(1, 12, 2, 3, 1, 4, True, False)
    reset = torch.zeros(1, 12, dtype=torch.bool)
    reset[0, [0, 4, 5, 11]] = True
    y, _ = ssd_chunked(x, dt, A, B, C, D, h0, reset=reset, chunk_size=4, backend="torch")
    y_tail, _ = ssd_chunked(x[:, 5:], dt[:, 5:], A, B[:, 5:], C[:, 5:], D, chunk_size=4, backend="torch")
    torch.testing.assert_close(y[:, 5:11], y_tail[:, :6], **TOL)


def test_step_is_one_token_of_the_spec():
    (x, dt, A, B, C, D, h0), _ = _inputs(3, 1, 4, 3, 2, 5, True, False, seed=2)
    reset = torch.tensor([[True], [False], [False]])
    y, h = ssd_step(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, reset=reset[:, 0])
    y_ref, h_ref = naive_ssd(x, dt, A, B, C, D, h0, reset)
    torch.testing.assert_close(y, y_ref[:, 0], **TOL)
    torch.testing.assert_close(h, h_ref, **TOL)


def test_bad_inputs_raise(monkeypatch):
    (x, dt, A, B, C, D, h0), _ = _inputs(2, 4, 4, 3, 2, 5, True, False)
    with pytest.raises(ValueError, match="initial_state"):
        ssd_chunked(x, dt, A, B, C, D, h0[:, :2])
    with pytest.raises(ValueError, match="G dividing"):
        ssd_chunked(x, dt, A, B[:, :, :1].expand(2, 4, 3, 5), C[:, :, :1].expand(2, 4, 3, 5), D)
    with pytest.raises(ValueError, match="floating point"):
        ssd_chunked(x, dt, A, B, C, D.long())
    with pytest.raises(ValueError, match="reset"):
        ssd_chunked(x, dt, A, B, C, D, reset=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="state"):
        ssd_step(h0[:, :2], x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # Triton on CPU tensors only under the interpreter
    triton = r"model\.kernels='triton'.*needs CUDA"
    with pytest.raises(ValueError, match=triton):
        ssd_chunked(x, dt, A, B, C, D, backend="triton")
    with pytest.raises(ValueError, match=triton):
        ssd_step(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, backend="triton")
    with pytest.raises(ValueError, match="cu_seqlens"):
        ssd_chunked(x, dt, A, B, C, D, cu_seqlens=torch.tensor([0, 4]))  # B = 2
    with pytest.raises(ValueError, match="cu_seqlens"):
        ssd_chunked(x[:1], dt[:1], A, B[:1], C[:1], D, cu_seqlens=torch.tensor([0, 3, 3, 4]))
    with pytest.raises(ValueError, match="initial_state"):
        ssd_chunked(x[:1], dt[:1], A, B[:1], C[:1], D, h0[:1], cu_seqlens=torch.tensor([0, 3, 4]))
