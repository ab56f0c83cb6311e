"""The Triton SwiGLU gating ``silu(gate) * up`` (kernels/swiglu/elementwise.py) against the fp64
row loop of naive.py: output and both gradients, widths that are not powers of two and tiles
shrunk so that rows and columns both span several blocks (masked lanes at both edges),
NaN-poisoned fresh outputs, fp32 and bf16 inputs, a bitwise-deterministic backward and offsets
past 2^31. The PyTorch path is checked against the same loop. Runs under TRITON_INTERPRET=1."""

from __future__ import annotations

import os

import pytest
import torch

import kernels.swiglu.elementwise as elementwise
from kernels.swiglu import naive, swiglu
from tests.kernels.test_rmsnorm import _randn, check

pytestmark = pytest.mark.usefixtures("one_thread")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
# fp32 kernel vs fp64 loop at values up to ~50: measured max abs error 1.5e-6
FP32 = dict(atol=1e-5, rtol=1e-5)
# bf16 outputs and gradients (each rounded once from fp32) vs the loop on the rounded inputs:
# measured max abs error 0.25 at outputs up to ~100 (half a bf16 ulp there), 0.11 for gradients
BF16 = dict(atol=1e-2, rtol=2**-7)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    if not INTERPRET and not torch.cuda.is_available():
        pytest.fail("TRITON_INTERPRET=0 needs CUDA; the kernel tests run under the interpreter on CPU")
    monkeypatch.setattr(elementwise, "POISON_OUTPUTS", True)
    monkeypatch.setattr(elementwise, "INTERPRETER_TILE_ELEMENTS" if INTERPRET else "TILE_ELEMENTS", 32)
    # N = 37 -> 3 column blocks of 16, 2 rows each
    monkeypatch.setattr(elementwise, "INTERPRETER_MAX_BLOCK_N" if INTERPRET else "MAX_BLOCK_N", 16)


def _ref(gate, up):
    return naive.swiglu(gate, up)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, FP32), (torch.bfloat16, BF16)])
def test_swiglu_matches_loop(backend, dtype, tol):
    shape = (3, 5, 37)
    inputs = dict(gate=_randn(shape, 0, dtype, scale=3.0), up=_randn(shape, 1, dtype, scale=2.0))
    check(lambda gate, up: swiglu(gate, up, backend=backend), _ref, inputs, tol)


def test_single_column_and_mixed_dtypes():
    """N = 1 (one masked lane of sixteen), and a bf16 gate with an fp32 up: fp32 out, each
    gradient in its input's dtype."""
    check(lambda gate, up: swiglu(gate, up, backend="triton"), _ref,
          dict(gate=_randn((7, 1), 0), up=_randn((7, 1), 1)), FP32)
    gate, up = _randn((4, 5), 0, torch.bfloat16), _randn((4, 5), 1)
    y = swiglu(gate, up, backend="triton")
    assert y.dtype == torch.float32
    dg, du = torch.autograd.grad(y.sum(), (gate, up))
    assert (dg.dtype, du.dtype) == (torch.bfloat16, torch.float32)


def test_backward_is_bitwise_deterministic():
    gate, up = _randn((9, 37), 0), _randn((9, 37), 1)
    runs = [torch.autograd.grad(swiglu(gate, up, backend="triton").square().sum(), (gate, up)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_offsets_past_2_31_are_64_bit():
    """gate and up are views with a row stride of 2^31 - 2^20 elements into one lazily allocated
    bf16 buffer: row 2 starts 2^32 - 2^21 elements in, where 32-bit row * stride wraps."""
    b, n, stride, start = 3, 37, 2**31 - 2**20, 2**21
    assert stride < 2**31 < 2 * stride
    buf = torch.empty(start + 2 * stride + 2 * n, dtype=torch.bfloat16, device=DEVICE)
    views = []
    for i in range(2):
        view = buf.as_strided((b, n), (stride, 1), start + i * n)
        view.copy_(_randn((b, n), i, torch.bfloat16, scale=2.0).detach())
        views.append(view.requires_grad_())
    check(lambda gate, up: swiglu(gate, up, backend="triton"), _ref, dict(gate=views[0], up=views[1]), BF16)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shapes differ"):
        swiglu(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match="floating point"):
        swiglu(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3))
