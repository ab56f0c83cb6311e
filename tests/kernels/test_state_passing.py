"""The state-passing corrections of GLA, the selective scan and SSD (what an incoming state adds
to a run from a zero state, used by context parallelism) against the token-by-token
specifications run from that nonzero initial state, in float64: outputs, final states and every
gradient, with document starts at t = 0, mid-sequence and none."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernels.gla import gla_initial_state_output, gla_total_decay
from kernels.gla.naive import naive_recurrent_gla
from kernels.selective_scan import selective_scan_initial_state_output, selective_scan_total_decay
from kernels.selective_scan import state_passing as scan_state_passing
from kernels.selective_scan.naive import naive_selective_scan
from kernels.ssd import ssd_initial_state_output, ssd_total_decay
from kernels.ssd.naive import naive_ssd

TOL = dict(rtol=1e-10, atol=1e-10)
B, T = 3, 9


def _gen(seed: int = 0) -> dict:
    return dict(generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _reset(kind: str) -> torch.Tensor | None:
    """Row 0: no start; row 1: a start at t = 4 (and 6); row 2: a start at t = 0."""
    if kind == "none":
        return None
    r = torch.zeros(B, T, dtype=torch.bool)
    r[1, 4] = r[1, 6] = r[2, 0] = True
    return r


def _compare(run_ref, run_split, leaves: list[torch.Tensor], h0: torch.Tensor) -> None:
    """run_ref(h0) -> (y, h) from the spec; run_split(h0) -> (y, h) as zero-state spec + the
    correction functions. Outputs, final states and gradients of a random projection."""
    h0 = h0.clone().requires_grad_()
    inputs = [*leaves, h0]
    y_ref, h_ref = run_ref(h0)
    y, h = run_split(h0)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(h, h_ref, **TOL)
    g = _gen(7)
    wy, wh = torch.randn(y.shape, **g), torch.randn(h.shape, **g)
    grads_ref = torch.autograd.grad((y_ref * wy).sum() + (h_ref * wh).sum(), inputs)
    grads = torch.autograd.grad((y * wy).sum() + (h * wh).sum(), inputs)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("resets", ["none", "some"])
def test_gla_correction_equals_recurrence_from_initial_state(resets):
    h, k, v = 2, 3, 4
    g = _gen()
    q, kk = torch.randn(B, T, h, k, **g), torch.randn(B, T, h, k, **g)
    vv = torch.randn(B, T, h, v, **g)
    gl = F.logsigmoid(torch.randn(B, T, h, k, **g))
    leaves = [z.requires_grad_() for z in (q, kk, vv, gl)]
    reset = _reset(resets)
    scale = 0.7

    def ref(h0):
        return naive_recurrent_gla(q, kk, vv, gl, scale, h0, reset)

    def split(h0):
        y0, h_end = naive_recurrent_gla(q, kk, vv, gl, scale, None, reset)
        y = y0 + gla_initial_state_output(q, gl, h0, scale, reset)
        return y, h_end + gla_total_decay(gl, reset)[..., None] * h0

    _compare(ref, split, leaves, torch.randn(B, h, k, v, **g))


@pytest.mark.parametrize("resets", ["none", "some"])
@pytest.mark.parametrize("block", [4, 64])
def test_selective_scan_correction_equals_scan_from_initial_state(resets, block, monkeypatch):
    """Blocks of 4 tokens (T = 9: a partial last block) and one block: the hand-written backward."""
    monkeypatch.setattr(scan_state_passing, "BLOCK", block)
    d, n = 5, 3
    g = _gen()
    x, dt = torch.randn(B, T, d, **g), F.softplus(torch.randn(B, T, d, **g))
    A = -torch.exp(torch.randn(d, n, **g))
    Bm, C = torch.randn(B, T, n, **g), torch.randn(B, T, n, **g)
    D = torch.randn(d, **g)
    leaves = [z.requires_grad_() for z in (x, dt, A, Bm, C, D)]
    reset = _reset(resets)

    def ref(h0):
        return naive_selective_scan(x, dt, A, Bm, C, D, h0, reset)

    def split(h0):
        y0, h_end = naive_selective_scan(x, dt, A, Bm, C, D, None, reset)
        y = y0 + selective_scan_initial_state_output(dt, A, C, h0, reset)
        return y, h_end + selective_scan_total_decay(dt, A, reset) * h0

    _compare(ref, split, leaves, torch.randn(B, d, n, **g))


@pytest.mark.parametrize("resets", ["none", "some"])
def test_ssd_correction_equals_recurrence_from_initial_state(resets):
    """Four heads in two groups of B and C."""
    h, p, grp, n = 4, 3, 2, 5
    g = _gen()
    x, dt = torch.randn(B, T, h, p, **g), F.softplus(torch.randn(B, T, h, **g))
    A = -torch.exp(torch.randn(h, **g))
    Bm, C = torch.randn(B, T, grp, n, **g), torch.randn(B, T, grp, n, **g)
    D = torch.randn(h, **g)
    leaves = [z.requires_grad_() for z in (x, dt, A, Bm, C, D)]
    reset = _reset(resets)

    def ref(h0):
        return naive_ssd(x, dt, A, Bm, C, D, h0, reset)

    def split(h0):
        y0, h_end = naive_ssd(x, dt, A, Bm, C, D, None, reset)
        y = y0 + ssd_initial_state_output(dt, A, C, h0, reset)
        return y, h_end + ssd_total_decay(dt, A, reset)[..., None, None] * h0

    _compare(ref, split, leaves, torch.randn(B, h, p, n, **g))


def test_corrections_reject_mismatched_shapes():
    z = torch.zeros
    with pytest.raises(ValueError, match="gla_initial_state_output"):
        gla_initial_state_output(z(1, 4, 2, 3), z(1, 4, 2, 3), z(1, 2, 4, 5))
    with pytest.raises(ValueError, match="selective_scan_initial_state_output"):
        selective_scan_initial_state_output(z(1, 4, 5), z(5, 3), z(1, 4, 2), z(1, 5, 3))
    with pytest.raises(ValueError, match="ssd_initial_state_output"):
        ssd_initial_state_output(z(1, 4, 4), z(4), z(1, 4, 3, 5), z(1, 4, 2, 5))
