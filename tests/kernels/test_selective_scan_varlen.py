"""Packed sequences (``cu_seqlens``), the fused z gate on the public function, 64-bit offsets and
bf16 inputs of the selective scan, on the Triton chunk kernel (under TRITON_INTERPRET=1) and the
PyTorch path: packed equals a loop over the single sequences (outputs, per-sequence final states
and every gradient including the per-sequence initial states), each against the fp64 naive loop.
Fresh Triton outputs are NaN-poisoned; chunks and channel blocks are shrunk to 4."""

from __future__ import annotations

import pytest
import torch

import kernels.selective_scan.chunk as scan_chunk
from kernels.selective_scan import selective_scan, selective_state_update
from kernels.selective_scan.chunk import selective_scan_triton
from tests.kernels.test_selective_scan_recurrent import BF16_STATE, huge_stride_rows
from tests.kernels.test_selective_scan_triton import DEVICE, INTERPRET, make_inputs, naive_scan

TOL = {"triton": dict(atol=1e-5, rtol=1e-5), "torch": dict(atol=1e-9, rtol=1e-9)}  # fp32 kernel / fp64 path
# bf16 inputs vs fp64 on the same bf16 values. y and the gradients of bf16 inputs are rounded to
# bf16 once (2^-8 relative, values up to ~25); fp32 states and fp32 parameters' gradients are not.
# Measured max abs over 3 seeds (B=2, T=9, D=5, N=3, strong decays, resets, h0): y 4.3e-2,
# state 7.6e-8, dx/ddt/dB/dC/dz 5.1e-2, dA/dD/dh0 4.5e-7. fp32: every output and gradient <= 1.7e-6.
BF16 = dict(atol=1e-1, rtol=2e-2)
LENGTHS = (5, 1, 7)  # two chunks, a single token, two chunks with a tail


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    if not INTERPRET and not torch.cuda.is_available():
        pytest.fail("TRITON_INTERPRET=0 needs CUDA; the kernel tests run under the interpreter on CPU")
    monkeypatch.setattr(scan_chunk, "POISON_OUTPUTS", True)
    monkeypatch.setattr(scan_chunk, "CHUNK", 4)
    monkeypatch.setattr(scan_chunk, "BLOCK_D", 4)


def packed_inputs(dtype, seed=0):
    """One row of the sequences of LENGTHS, 5 channels, N = 3, an initial state per sequence."""
    t, n_seq = sum(LENGTHS), len(LENGTHS)
    x, dt, A, B, C, D, z, _, _ = make_inputs(1, t, 5, 3, True, False, False, seed=seed)
    h0 = torch.randn(n_seq, 5, 3, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], device=DEVICE)
    return [v.to(dtype) for v in (x, dt, A, B, C, D, z, h0)], cu


def scan_and_grads(fn, leaves, seed=1):
    """fn(*leaves) -> (y, h); the outputs and the gradients of a random linear loss of both (its
    weights bf16-representable, so a bf16 run and its fp64 reference see the same ones)."""
    y, h = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    gy, gh = (torch.randn(v.shape, generator=g).bfloat16().to(v) for v in (y, h))
    return y, h, torch.autograd.grad((y * gy).sum() + (h * gh).sum(), leaves)


def one_by_one(fn, cu):
    """Applies fn sequence by sequence (B = 1 each) and concatenates: the reference layout."""
    def run(x, dt, A, B, C, D, z, h0):
        ys, hs = [], []
        for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            y, h = fn(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], D, z[:, s:e], h0[i : i + 1])
            ys.append(y)
            hs.append(h)
        return torch.cat(ys, 1), torch.cat(hs, 0)
    return run


def check(ours, ref, what, tol):
    names = "y state dx ddt dA dB dC dD dz dh0".split()
    (y, h, g), (y_ref, h_ref, g_ref) = ours, ref
    for name, a, b in zip(names, (y, h, *g), (y_ref, h_ref, *g_ref)):
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m, name=name: f"{what} {name}: {m}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_packed_equals_a_loop_over_sequences(backend):
    dtype = torch.float32 if backend == "triton" else torch.float64
    tensors, cu = packed_inputs(dtype)
    leaves = [v.clone().requires_grad_() for v in tensors]
    public = lambda x, dt, A, B, C, D, z, h0, cu_seqlens=None: selective_scan(  # noqa: E731
        x, dt, A, B, C, D, h0, z=z, cu_seqlens=cu_seqlens, backend=backend)
    packed = scan_and_grads(lambda *a: public(*a, cu_seqlens=cu), leaves)
    assert packed[1].shape == (len(LENGTHS), 5, 3)
    check(packed, scan_and_grads(one_by_one(public, cu), leaves), "vs one by one", TOL[backend])
    ref_leaves = [v.detach().double().requires_grad_() for v in tensors]
    naive = one_by_one(lambda x, dt, A, B, C, D, z, h0: naive_scan(x, dt, A, B, C, D, z, h0), cu)
    check(packed, scan_and_grads(naive, ref_leaves), "vs naive", TOL[backend])


def test_packed_backward_is_bitwise_deterministic():
    tensors, cu = packed_inputs(torch.float32, seed=3)
    runs = []
    for _ in range(2):
        leaves = [v.clone().requires_grad_() for v in tensors]
        runs.append(scan_and_grads(lambda *a: selective_scan_triton(*a[:7], initial_state=a[7], output_final_state=True,
                                                                    cu_seqlens=cu), leaves))
    for a, b in zip((runs[0][0], runs[0][1], *runs[0][2]), (runs[1][0], runs[1][1], *runs[1][2])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_public_z_gate_with_resets(backend):
    """selective_scan(z=...) is (C.h + D x) * silu(z), gradient of z included; the step too."""
    dtype = torch.float32 if backend == "triton" else torch.float64
    inputs = make_inputs(2, 6, 5, 3, False, True, True, seed=6)
    reset = inputs[8]
    tensors = [v.to(dtype) for v in inputs[:8]]
    leaves = [v.clone().requires_grad_() for v in tensors]
    ours = scan_and_grads(lambda x, dt, A, B, C, D, z, h0: selective_scan(x, dt, A, B, C, D, h0, z=z, reset=reset,
                                                                          backend=backend), leaves)
    ref_leaves = [v.detach().double().requires_grad_() for v in tensors]
    ref = scan_and_grads(lambda *a: naive_scan(*a, reset=reset), ref_leaves)
    check(ours, ref, "scan", TOL[backend])
    x, dt, A, B, C, D, z, h0 = tensors
    y, h = selective_state_update(h0, x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, z=z[:, 0], reset=reset[:, 0],
                                  backend=backend)
    y_ref, h_ref = naive_scan(*(v.double()[:, :1] if v.dim() == 3 and v is not h0 else v.double()
                                for v in (x, dt, A, B, C, D, z, h0)), reset=reset[:, :1])
    torch.testing.assert_close(y.double(), y_ref[:, 0], **TOL[backend])
    torch.testing.assert_close(h.double(), h_ref, **TOL[backend])


def test_bf16_inputs_forward_and_backward():
    """bf16 activations (x, dt, B, C, z), fp32 A, D and initial state, against fp64 on the same
    values; tolerance BF16 for bf16 outputs and gradients, fp32's for the rest."""
    x, dt, A, B, C, D, z, h0, reset = make_inputs(2, 9, 5, 3, True, True, True, seed=12)
    leaves = [v.bfloat16().requires_grad_() if v.dim() == 3 and v is not h0 else v.clone().requires_grad_()
              for v in (x, dt, A, B, C, D, z, h0)]
    ours = scan_and_grads(lambda *a: selective_scan_triton(*a[:7], initial_state=a[7], output_final_state=True,
                                                           reset=reset), leaves)
    ref = scan_and_grads(lambda *a: naive_scan(*a, reset=reset), [v.detach().double().requires_grad_() for v in leaves])
    names = "y state dx ddt dA dB dC dD dz dh0".split()
    for name, a, b in zip(names, (ours[0], ours[1], *ours[2]), (ref[0], ref[1], *ref[2])):
        tol = BF16 if a.dtype == torch.bfloat16 else BF16_STATE
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_chunk_kernel_64bit_offsets():
    """x, dt, z, B, C of batch row 2 sit 2^32 - 2^21 elements into one bf16 buffer (tokens laid
    out [x | dt | z | B | C], so all five are strided views the kernel reads without a copy):
    forward and backward equal the fp64 loop and, bitwise, the kernel on dense copies."""
    b, t, d, n = 3, 5, 5, 3
    x, dt, A, B, C, D, z, h0, reset = make_inputs(b, t, d, n, True, True, True, seed=13)
    width = 3 * d + 2 * n
    buf, stride, start = huge_stride_rows(b, t * width)
    views = []
    for v, offset, w in zip((x, dt, z, B, C), (0, d, 2 * d, 3 * d, 3 * d + n), (d, d, d, n, n)):
        view = buf.as_strided((b, t, w), (stride, width, 1), start + offset)
        view.copy_(v)
        views.append(view.requires_grad_())
    xv, dtv, zv, Bv, Cv = views

    def run(xs, dts, zs, Bs, Cs):
        return scan_and_grads(lambda *a: selective_scan_triton(a[0], a[1], A, a[3], a[4], D, a[2], initial_state=h0,
                                                               output_final_state=True, reset=reset),
                              [xs, dts, zs, Bs, Cs])

    ours = run(*views)
    dense = run(*(v.detach().contiguous().requires_grad_() for v in views))
    for a, b_ in zip((ours[0], ours[1], *ours[2]), (dense[0], dense[1], *dense[2])):
        assert torch.equal(a, b_)
    ref = scan_and_grads(lambda xs, dts, zs, Bs, Cs: naive_scan(xs, dts, A.double(), Bs, Cs, D.double(), zs,
                                                                h0.double(), reset),
                         [v.detach().double().requires_grad_() for v in (xv, dtv, zv, Bv, Cv)])
    torch.testing.assert_close(ours[0].double(), ref[0], **BF16)
    torch.testing.assert_close(ours[1].double(), ref[1], **BF16_STATE)
    for a, b_ in zip(ours[2], ref[2]):
        torch.testing.assert_close(a.double(), b_, **BF16)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bad_cu_seqlens_raise(backend):
    (x, dt, A, B, C, D, z, h0), cu = packed_inputs(torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens"):
        selective_scan(x, dt, A, B, C, D, h0, cu_seqlens=cu[:-1], backend=backend)  # does not reach T
    with pytest.raises(ValueError, match="cu_seqlens"):
        selective_scan(x.expand(2, -1, -1), dt.expand(2, -1, -1), A, B.expand(2, -1, -1), C.expand(2, -1, -1), D,
                       cu_seqlens=cu, backend=backend)  # B != 1
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan(x, dt, A, B, C, D, h0[:2], cu_seqlens=cu, backend=backend)  # one per sequence
    with pytest.raises(ValueError, match="not both"):
        selective_scan(x, dt, A, B, C, D, cu_seqlens=cu, reset=torch.zeros(1, x.shape[1], dtype=torch.bool),
                       backend=backend)
