"""kernels.selective_scan's PyTorch path (chunked, hand-written backward) against the
token-by-token specification kernels/selective_scan/naive.py, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.selective_scan import selective_scan, selective_state_update
from kernels.selective_scan.chunk_torch import SCAN_CHUNK
from kernels.selective_scan.naive import naive_selective_scan

TOL = dict(rtol=1e-9, atol=1e-9)


def _inputs(b, t, d, n, with_h0, resets, seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64)
    x = torch.randn(b, t, d, **kw)
    dt = F.softplus(torch.randn(b, t, d, **kw) - 1)
    A = -torch.exp(torch.randn(d, n, **kw))
    B, C = torch.randn(b, t, n, **kw), torch.randn(b, t, n, **kw)
    D = torch.randn(d, **kw)
    h0 = torch.randn(b, d, n, **kw) if with_h0 else None
    reset = None
    if resets:
        reset = torch.zeros(b, t, dtype=torch.bool)
        reset[0, t // 2] = True
        reset[-1, 0] = True  # drops the initial state of the last row
    return [x, dt, A, B, C, D, h0], reset


def _run(fn, leaves, reset):
    y, h = fn(*leaves, reset)
    g = torch.Generator().manual_seed(1)
    gy, gh = torch.randn(y.shape, generator=g, dtype=y.dtype), torch.randn(h.shape, generator=g, dtype=h.dtype)
    inputs = [z for z in leaves if z is not None]
    return y, h, torch.autograd.grad((y * gy).sum() + (h * gh).sum(), inputs)


@pytest.mark.parametrize(("t", "d"), [(1, 6), (SCAN_CHUNK + 3, 60), (2 * SCAN_CHUNK, 5)])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("resets", [False, True])
def test_scan_matches_naive(t, d, with_h0, resets):
    """T = 1, T not a multiple of SCAN_CHUNK, 60 channels; every gradient incl. the initial state."""
    tensors, reset = _inputs(2, t, d, 4, with_h0, resets)
    leaves = [z.clone().requires_grad_() if z is not None else None for z in tensors]
    y, h, grads = _run(lambda *a: selective_scan(*a[:-1], reset=a[-1], backend="torch"), leaves, reset)
    y_ref, h_ref, grads_ref = _run(lambda *a: naive_selective_scan(*a[:-1], reset=a[-1]), leaves, reset)
    assert y.dtype == h.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(h, h_ref, **TOL)
    for name, gr, gr_ref in zip("x dt A B C D initial_state".split(), grads, grads_ref):
        torch.testing.assert_close(gr, gr_ref, **TOL, msg=lambda m, name=name: f"d{name}: {m}")


def test_a_document_start_forgets_everything_before():
    """After a reset the outputs equal a fresh call on the tail."""
    (x, dt, A, B, C, D, h0), _ = _inputs(1, 10, 3, 2, True, False)
    reset = torch.zeros(1, 10, dtype=torch.bool)
    reset[0, 6] = True
    y, _ = selective_scan(x, dt, A, B, C, D, h0, reset=reset, backend="torch")
    y_tail, _ = selective_scan(x[:, 6:], dt[:, 6:], A, B[:, 6:], C[:, 6:], D, backend="torch")
    torch.testing.assert_close(y[:, 6:], y_tail, **TOL)


def test_state_update_is_one_token_of_the_spec():
    (x, dt, A, B, C, D, h0), _ = _inputs(3, 1, 5, 4, True, False, seed=2)
    reset = torch.tensor([[True], [False], [False]])
    y, h = selective_state_update(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, reset=reset[:, 0])
    y_ref, h_ref = naive_selective_scan(x, dt, A, B, C, D, h0, reset)
    torch.testing.assert_close(y, y_ref[:, 0], **TOL)
    torch.testing.assert_close(h, h_ref, **TOL)


def test_bad_inputs_raise(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors: 'triton' cannot run uninterpreted
    (x, dt, A, B, C, D, _), _ = _inputs(2, 4, 3, 2, False, False)
    with pytest.raises(ValueError, match="B "):
        selective_scan(x, dt, A, B[:, :3], C, D)
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan(x, dt, A, B, C, D, torch.zeros(2, 3, 3, dtype=x.dtype))
    with pytest.raises(ValueError, match="reset"):
        selective_scan(x, dt, A, B, C, D, reset=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="floating point"):
        selective_scan(x.long(), dt, A, B, C, D)
    with pytest.raises(ValueError, match="state"):
        selective_state_update(torch.zeros(2, 3, 3), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D)
    with pytest.raises(ValueError, match=r"model\.kernels='triton'.*needs CUDA tensors"):
        selective_scan(x, dt, A, B, C, D, backend="triton")
    with pytest.raises(ValueError, match=r"model\.kernels='triton'.*selective_state_update.*needs CUDA tensors"):
        selective_state_update(torch.zeros(2, 3, 2), x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, backend="triton")
