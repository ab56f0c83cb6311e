"""The Gated Memory Unit's element-wise core ``memory ⊙ silu(gate)`` (kernels/gmu) on the Triton
kernel and the PyTorch path against the fp64 loop of kernels/gmu/naive.py (output, both
gradients, fp32 and bf16, NaN-poisoned outputs), its operand order (the memory is not the gated
one), and the GMU layer with and without its gated norm on the kernels against the PyTorch
path. Runs under TRITON_INTERPRET=1."""

from __future__ import annotations

import os

import pytest
import torch

import kernels.rmsnorm.fused as rms_fused
import kernels.swiglu.elementwise as elementwise
from kernels.gmu import gated_memory, naive
from pretrain.models.layers.gmu import MEMORY, GatedMemoryUnit
from tests.kernels.test_rmsnorm import _randn, check
from tests.kernels.test_swiglu import BF16, FP32

pytestmark = pytest.mark.usefixtures("one_thread")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    if not INTERPRET and not torch.cuda.is_available():
        pytest.fail("TRITON_INTERPRET=0 needs CUDA; the kernel tests run under the interpreter on CPU")
    monkeypatch.setattr(elementwise, "POISON_OUTPUTS", True)
    monkeypatch.setattr(rms_fused, "POISON_OUTPUTS", True)
    monkeypatch.setattr(elementwise, "INTERPRETER_TILE_ELEMENTS" if INTERPRET else "TILE_ELEMENTS", 32)
    monkeypatch.setattr(elementwise, "INTERPRETER_MAX_BLOCK_N" if INTERPRET else "MAX_BLOCK_N", 16)


def _ref(memory, gate):
    return naive.gated_memory(memory, gate)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, FP32), (torch.bfloat16, BF16)])
def test_gated_memory_matches_loop(backend, dtype, tol):
    shape = (2, 5, 19)
    inputs = dict(memory=_randn(shape, 0, dtype, scale=2.0), gate=_randn(shape, 1, dtype, scale=3.0))
    check(lambda memory, gate: gated_memory(memory, gate, backend=backend), _ref, inputs, tol)


def test_the_gate_is_the_second_operand():
    """silu applies to ``gate`` only: a zero gate zeroes the output, and a large gate (silu(40)
    = 40 to fp32) scales the memory by itself."""
    m = torch.randn(2, 3, 5)
    assert torch.equal(gated_memory(m, torch.zeros_like(m), backend="triton"), torch.zeros_like(m))
    torch.testing.assert_close(gated_memory(m, torch.full_like(m, 40.0), backend="triton"), 40.0 * m)


@pytest.mark.parametrize("norm_group", [None, 4])
def test_gmu_layer_on_kernels_equals_torch_path(norm_group):
    """The layer (in_proj, gating or gated norm per group, out_proj) with kernels='triton':
    output and every parameter and input gradient as with 'torch'."""
    out = {}
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        layer = GatedMemoryUnit(16, 12, norm_group, kernels=kernels).to(DEVICE)
        layer.init_weights(0.3, 0.3)
        x, m = _randn((2, 5, 16), 2), _randn((2, 5, 12), 3)
        y, _ = layer(x, None, None, {MEMORY: m})
        grads = torch.autograd.grad(y.square().sum(), [x, m, *layer.parameters()])
        out[kernels] = y, grads
    torch.testing.assert_close(out["triton"][0], out["torch"][0], **FP32)
    for a, b in zip(out["triton"][1], out["torch"][1]):
        torch.testing.assert_close(a, b, **FP32)
