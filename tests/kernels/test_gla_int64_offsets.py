"""64-bit pointer offsets in the GLA Triton kernels (chunk and fused recurrent): q, k, g and v are
rows of a batch whose batch stride, ``2^30 + 64`` elements, fits in int32 while the offset of the
third row, ``2 * stride``, does not (mamba#1015: kernels that multiply in int32 silently read
the wrong memory past about 2^31 elements). The batch is a strided view over one lazily
allocated bf16 buffer of 4 GiB of address space of which only the rows themselves are ever
touched, so the interpreter affords it; the result must equal the fp64 loop on a contiguous copy.
Runs under TRITON_INTERPRET=1 (tests/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch

import kernels.gla.chunk as gla_chunk
from kernels.gla.chunk import chunk_gla_triton
from kernels.gla.fused_recurrent import fused_recurrent_gla
from kernels.gla.naive import naive_recurrent_gla

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
STRIDE = 2**30 + 64  # < 2^31, but 2 * STRIDE > 2^31
B, T, H, D = 3, 5, 1, 16
# bf16 inputs and outputs vs the fp64 loop on the same values; the bf16 rounding of o and of the
# gradients dominates (measured max abs error 0.03)
ATOL, RTOL = 0.1, 0.02


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    if not INTERPRET and not torch.cuda.is_available():
        pytest.fail("TRITON_INTERPRET=0 needs CUDA; the kernel tests run under the interpreter on CPU")
    monkeypatch.setattr(gla_chunk, "POISON_OUTPUTS", True)


@pytest.fixture(scope="module")
def far_apart_rows():
    """q, k, v, g ``[3, 5, 1, 16]`` bf16 views with batch stride ``STRIDE``, and their values."""
    # pages never written stay virtual: about 4 KiB of the 4 GiB are ever touched
    storage = torch.empty(2 * STRIDE + 4 * T * H * D, dtype=torch.bfloat16, device=DEVICE)
    gen = torch.Generator().manual_seed(0)
    values = [torch.randn(B, T, H, D, generator=gen) for _ in range(3)] + [torch.rand(B, T, H, D, generator=gen) * -2]
    views = []
    for i, val in enumerate(values):
        view = storage.as_strided((B, T, H, D), (STRIDE, H * D, D, 1), i * T * H * D)
        view.copy_(val)
        views.append(view)
    yield views, [z.to(DEVICE, torch.bfloat16) for z in values]
    del views, storage


@pytest.mark.parametrize("kernel", [chunk_gla_triton, fused_recurrent_gla], ids=["chunk", "recurrent"])
def test_rows_past_2_to_the_31_elements(far_apart_rows, kernel):
    views, values = far_apart_rows
    assert views[0].stride(0) * (B - 1) > 2**31 > views[0].stride(0)
    gen = torch.Generator().manual_seed(1)
    h0 = torch.randn(B, H, D, D, generator=gen).to(DEVICE)
    do, dht = torch.randn(B, T, H, D, generator=gen).to(DEVICE), torch.randn(B, H, D, D, generator=gen).to(DEVICE)

    leaves = [z.detach().requires_grad_() for z in views] + [h0.clone().requires_grad_()]
    assert leaves[0].stride(0) == STRIDE  # the kernel sees the strided view, not a copy
    o, ht = kernel(*leaves[:4], initial_state=leaves[4], output_final_state=True)
    grads = torch.autograd.grad((o.float() * do).sum() + (ht * dht).sum(), leaves)

    refs = [z.double().requires_grad_() for z in values] + [h0.double().requires_grad_()]
    o_ref, ht_ref = naive_recurrent_gla(*refs[:4], initial_state=refs[4])
    grads_ref = torch.autograd.grad((o_ref * do.bfloat16().double()).sum() + (ht_ref * dht.double()).sum(), refs)
    for name, got, ref in zip(["o", "ht", "dq", "dk", "dv", "dg", "dh0"], [o, ht, *grads], [o_ref, ht_ref, *grads_ref]):
        torch.testing.assert_close(got.double(), ref, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")
