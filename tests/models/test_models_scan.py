"""selective_scan (chunked, hand-written backward) against the per-token executable spec."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.selective_scan import selective_scan as public_scan
from kernels.selective_scan.chunk_torch import SCAN_CHUNK, selective_scan, selective_state_update
from tests.models.util import assert_scan_matches


def naive_scan(x, dt, A, B, C, D, h0=None, reset=None):
    """The recurrence token by token, differentiated by autograd."""
    b, t, d = x.shape
    h = x.new_zeros(b, d, A.shape[1]) if h0 is None else h0
    ys = []
    for i in range(t):
        a = torch.exp(dt[:, i, :, None] * A)  # [B, D, N]
        if reset is not None:
            a = a * (~reset[:, i]).float()[:, None, None]
        h = a * h + (dt[:, i] * x[:, i])[:, :, None] * B[:, i, None, :]
        ys.append((h * C[:, i, None, :]).sum(-1) + D * x[:, i])
    return torch.stack(ys, dim=1), h


def _inputs(b, t, d, n, with_h0, with_reset, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=g)
    dt = F.softplus(torch.randn(b, t, d, generator=g) - 1)
    A = -torch.exp(torch.randn(d, n, generator=g))
    B, C = torch.randn(b, t, n, generator=g), torch.randn(b, t, n, generator=g)
    D = torch.randn(d, generator=g)
    h0 = torch.randn(b, d, n, generator=g) if with_h0 else None
    reset = torch.rand(b, t, generator=g) < 0.15 if with_reset else None
    return [x, dt, A, B, C, D, h0], reset


@pytest.mark.parametrize("t", [1, 3, SCAN_CHUNK, 2 * SCAN_CHUNK + 3])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("with_reset", [False, True])
def test_scan_matches_naive(t, with_h0, with_reset, nan_poison):
    tensors, reset = _inputs(2, t, 6, 4, with_h0, with_reset)
    leaves = [z.requires_grad_() if z is not None else None for z in tensors]
    y, h = selective_scan(*leaves, reset=reset)
    y_ref, h_ref = naive_scan(*leaves, reset=reset)
    assert_scan_matches(y, h, y_ref, h_ref, leaves)


def test_reset_drops_the_carried_state():
    tensors, _ = _inputs(1, 10, 3, 2, with_h0=True, with_reset=False)
    reset = torch.zeros(1, 10, dtype=torch.bool)
    reset[0, 6] = True
    y, _ = selective_scan(*tensors, reset=reset)
    x, dt, A, B, C, D, _ = tensors
    y_tail, _ = selective_scan(x[:, 6:], dt[:, 6:], A, B[:, 6:], C[:, 6:], D)
    torch.testing.assert_close(y[:, 6:], y_tail)


def test_state_update_is_one_step_of_the_scan():
    (x, dt, A, B, C, D, h0), reset = _inputs(3, 1, 5, 4, with_h0=True, with_reset=True, seed=1)
    reset = torch.tensor([[True], [False], [False]])
    y, h = selective_state_update(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, reset=reset[:, 0])
    y_ref, h_ref = naive_scan(x, dt, A, B, C, D, h0, reset)
    torch.testing.assert_close(y, y_ref[:, 0])
    torch.testing.assert_close(h, h_ref)


def test_scan_rejects_bad_shapes():
    (x, dt, A, B, C, D, _), _ = _inputs(2, 4, 3, 2, False, False)
    with pytest.raises(ValueError, match="B"):
        public_scan(x, dt, A, B[:, :3], C, D)
    with pytest.raises(ValueError, match="initial_state"):
        public_scan(x, dt, A, B, C, D, initial_state=torch.zeros(2, 3, 3))
