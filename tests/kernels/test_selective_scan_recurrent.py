"""The Triton decoding step of the selective scan (kernels/selective_scan/recurrent.py) against one
token of the fp64 naive recurrence, chained after the Triton chunk kernel (prefix by the chunk
kernel, then token by token equals the whole sequence through the chunk kernel and the naive loop),
strided inputs at offsets past 2^31 elements, bf16 inputs, and a Mamba model decoding on it.
Fresh outputs are NaN-poisoned. Runs under TRITON_INTERPRET=1 (tests/conftest.py)."""

from __future__ import annotations


import pytest
import torch

import kernels.selective_scan.chunk as scan_chunk
import kernels.selective_scan.recurrent as scan_recurrent
from kernels.selective_scan import selective_state_update
from kernels.selective_scan.chunk import selective_scan_triton
from kernels.selective_scan.recurrent import selective_state_update_triton
from tests.kernels.test_selective_scan_triton import DEVICE, INTERPRET, make_inputs, naive_scan

ATOL, RTOL = 1e-5, 1e-5  # fp32 kernel vs fp64 loop; measured max abs error 1.0e-7 (y), 6.5e-8 (state)
# bf16 inputs (fp32 state) vs fp64 on the same bf16 values: y is rounded to bf16 once (relative
# 2^-8 = 3.9e-3 of |y| up to ~25); the fp32 state is not rounded. Measured max abs: step y 3.4e-3,
# state 6.0e-8; the chunk kernel (test_selective_scan_varlen) y 4.3e-2, state 7.6e-8.
BF16_Y, BF16_STATE = dict(atol=4e-2, rtol=1e-2), dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    if not INTERPRET and not torch.cuda.is_available():
        pytest.fail("TRITON_INTERPRET=0 needs CUDA; the kernel tests run under the interpreter on CPU")
    for module in (scan_chunk, scan_recurrent):
        monkeypatch.setattr(module, "POISON_OUTPUTS", True)
        monkeypatch.setattr(module, "BLOCK_D", 4)
    monkeypatch.setattr(scan_chunk, "CHUNK", 4)


def close(a, b, what, **tol):
    torch.testing.assert_close(a.double(), b.double(), **(tol or dict(atol=ATOL, rtol=RTOL)),
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("with_D, with_z, with_reset", [(True, True, True), (False, False, False), (True, False, True)])
def test_step_is_one_token_of_the_naive_loop(with_D, with_z, with_reset):
    """5 channels in blocks of 4 (a masked block), N = 3 (masked lanes); row 0 starts a document."""
    x, dt, A, B, C, D, z, h0, _ = make_inputs(3, 1, 5, 3, True, True, False, seed=11)
    reset = torch.tensor([True, False, False], device=DEVICE) if with_reset else None
    D, z = (D if with_D else None), (z if with_z else None)
    before = h0.clone()
    y, h = selective_state_update_triton(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D,
                                         None if z is None else z[:, 0], reset)
    assert y.dtype == h.dtype == torch.float32 and h.data_ptr() != h0.data_ptr()
    assert torch.equal(h0, before)  # the new state is a fresh tensor
    d64 = lambda v: None if v is None else v.double()  # noqa: E731
    y_ref, h_ref = naive_scan(x.double(), dt.double(), A.double(), B.double(), C.double(), d64(D), d64(z),
                              h0.double(), None if reset is None else reset[:, None])
    close(y, y_ref[:, 0], "y")
    close(h, h_ref, "state")


def test_chunk_prefix_then_steps_equal_the_whole_sequence():
    """Triton chunk over 6 tokens (two chunks, resets inside), then 4 Triton steps (a reset
    among them) == the whole sequence through the Triton chunk kernel == the fp64 naive loop."""
    t, p = 10, 6
    x, dt, A, B, C, D, z, h0, reset = make_inputs(2, t, 6, 3, False, True, True, seed=4)
    reset[1, 8] = True  # a document starting during decoding
    y_pre, h = selective_scan_triton(x[:, :p], dt[:, :p], A, B[:, :p], C[:, :p], D, z[:, :p], initial_state=h0,
                                     output_final_state=True, reset=reset[:, :p])
    ys = [y_pre]
    for i in range(p, t):
        y_i, h = selective_state_update_triton(h, x[:, i], dt[:, i], A, B[:, i], C[:, i], D, z[:, i], reset[:, i])
        ys.append(y_i[:, None])
    y = torch.cat(ys, 1)
    y_all, h_all = selective_scan_triton(x, dt, A, B, C, D, z, initial_state=h0, output_final_state=True, reset=reset)
    y_ref, h_ref = naive_scan(*(v.double() for v in (x, dt, A, B, C, D, z, h0)), reset)
    close(y, y_all, "y vs chunk kernel")
    close(h, h_all, "state vs chunk kernel")
    close(y, y_ref, "y vs naive")
    close(h, h_ref, "state vs naive")


def test_bf16_inputs():
    x, dt, A, B, C, D, z, h0, _ = make_inputs(2, 1, 5, 3, False, True, False, seed=8)
    low = [v[:, 0].bfloat16() for v in (x, dt, B, C, z)]
    y, h = selective_state_update_triton(h0, low[0], low[1], A, low[2], low[3], D, low[4])
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    y_ref, h_ref = naive_scan(*(v.double()[:, None] for v in low[:2]), A.double(),
                              *(v.double()[:, None] for v in low[2:4]), D.double(), low[4].double()[:, None],
                              h0.double())
    close(y, y_ref[:, 0], "y", **BF16_Y)
    close(h, h_ref, "state", **BF16_STATE)


def huge_stride_rows(b: int, width: int) -> tuple[torch.Tensor, int, int]:
    """A bf16 buffer and (stride, start) such that views starting at element ``start`` with row
    stride ``stride`` put batch row 2 at 2 * stride = 2^32 - 2^21 elements past the view's start:
    each size fits in int32 (Triton passes them so), but a kernel computing row * stride in 32
    bits wraps to -2^21 and reads the buffer's unwritten first elements instead of row 2, a wrong
    value rather than a crash. Only the touched pages are ever resident (8 GiB of address space)."""
    stride, start = 2**31 - 2**20, 2**21
    assert b == 3 and stride < 2**31 < 2 * stride
    buf = torch.empty(start + 2 * stride + width, dtype=torch.bfloat16, device=DEVICE)
    return buf, stride, start


def test_step_64bit_offsets():
    """x, dt, z, B, C of batch row 2 sit 2^32 - 2^21 elements into one buffer (row layout
    [x | dt | z | B | C], so they are strided views, read without a copy)."""
    b, d, n = 3, 5, 3
    x, dt, A, B, C, D, z, h0, _ = make_inputs(b, 1, d, n, True, True, False, seed=9)
    buf, stride, start = huge_stride_rows(b, 3 * d + 2 * n)
    views = []
    for i, (v, width) in enumerate(zip((x, dt, z, B, C), (d, d, d, n, n))):
        offset = start + [0, d, 2 * d, 3 * d, 3 * d + n][i]
        view = buf.as_strided((b, width), (stride, 1), offset)
        view.copy_(v[:, 0])
        views.append(view)
    xv, dtv, zv, Bv, Cv = views
    y, h = selective_state_update_triton(h0, xv, dtv, A, Bv, Cv, D, zv)
    y_ref, h_ref = naive_scan(*(v.double()[:, None] for v in (xv, dtv)), A.double(),
                              *(v.double()[:, None] for v in (Bv, Cv)), D.double(), zv.double()[:, None],
                              h0.double())
    close(y, y_ref[:, 0], "y", **BF16_Y)
    close(h, h_ref, "state", **BF16_STATE)
    y_dense, h_dense = selective_state_update_triton(h0, *(v.contiguous() for v in (xv, dtv)), A,
                                                     Bv.contiguous(), Cv.contiguous(), D, zv.contiguous())
    assert torch.equal(y, y_dense) and torch.equal(h, h_dense)


def test_public_step_dispatches_to_the_kernel(monkeypatch):
    """model.kernels='triton' reaches recurrent.py (poisoned outputs would show if it did not run)."""
    calls = []
    real = scan_recurrent.selective_state_update_triton
    monkeypatch.setattr(scan_recurrent, "selective_state_update_triton", lambda *a: calls.append(1) or real(*a))
    x, dt, A, B, C, D, z, h0, _ = make_inputs(2, 1, 3, 2, False, True, False)
    y, h = selective_state_update(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, z=z[:, 0], backend="triton")
    y_t, h_t = selective_state_update(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, z=z[:, 0], backend="torch")
    assert calls == [1]
    close(y, y_t, "y")
    close(h, h_t, "state")


def test_mamba_model_decodes_on_the_triton_kernels():
    """A Mamba model with model.kernels='triton' decoding token by token (and in uneven pieces,
    with a document start) gives the logits of one full forward on the PyTorch path."""
    from pretrain.models import build_model
    from tests.models.conftest import _make_cfg, _rel_err
    from tests.models.util import decode

    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(0))
    positions = torch.stack([torch.arange(7), torch.cat([torch.arange(3), torch.arange(4)])])
    models = {}
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        models[kernels] = build_model(_make_cfg("mamba", kernels=kernels, init_std=0.2))
    with torch.no_grad():
        full = models["torch"](ids, positions)
        assert _rel_err(decode(models["triton"], ids, [1] * 7, positions), full) <= 1e-4
        assert _rel_err(decode(models["triton"], ids, [3, 1, 3], positions), full) <= 1e-4
