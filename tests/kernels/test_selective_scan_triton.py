"""The Triton selective scan against a naive token loop (fp64) and the PyTorch chunked scan of
the PyTorch path (chunk_torch): outputs, final states and every gradient, with documents packed by resets, an initial
state, strong and weak decays, the z gate, lengths that are not a multiple of the chunk and channel
and state sizes that are not powers of two (several channel blocks, masked lanes). Chunks and
channel blocks are shrunk to 4 so a few tokens cross chunk boundaries. Fresh outputs are
NaN-poisoned so an element the kernel forgets to write fails the comparison. Runs under
TRITON_INTERPRET=1 (tests/kernels/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import kernels.selective_scan.chunk as scan_chunk
from kernels.selective_scan.chunk import selective_scan_triton
from kernels.selective_scan.chunk_torch import selective_scan

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
# fp32 kernel vs fp64 loop; measured max abs error <= 1.5e-6 on outputs and gradients of size ~10
ATOL, RTOL = 1e-5, 1e-5


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    if not INTERPRET and not torch.cuda.is_available():
        pytest.fail("TRITON_INTERPRET=0 needs CUDA; the kernel tests run under the interpreter on CPU")
    monkeypatch.setattr(scan_chunk, "POISON_OUTPUTS", True)
    monkeypatch.setattr(scan_chunk, "CHUNK", 4)
    monkeypatch.setattr(scan_chunk, "BLOCK_D", 4)


def naive_scan(x, dt, A, B, C, D=None, z=None, h0=None, reset=None):
    """The recurrence token by token in fp64 (Gu & Dao 2023, eq. 2a-2b with ZOH on A and Euler on B)."""
    b, t, d = x.shape
    h = x.new_zeros(b, d, A.shape[-1]) if h0 is None else h0
    out = []
    for i in range(t):
        a = torch.exp(dt[:, i, :, None] * A)
        if reset is not None:
            a = a * (~reset[:, i]).to(a.dtype)[:, None, None]
        h = a * h + (dt[:, i] * x[:, i])[:, :, None] * B[:, i, None, :]
        y = (h * C[:, i, None, :]).sum(-1)
        if D is not None:
            y = y + D * x[:, i]
        if z is not None:
            y = y * F.silu(z[:, i])
        out.append(y)
    return torch.stack(out, 1), h


def make_inputs(b, t, d, n, strong, with_h0, with_reset, seed=0):
    """x, dt, A, B, C, D, z, h0 (fp32) and reset. Strong decays reach exp(-8) per token, weak ones
    stay above exp(-0.01)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=gen)
    dt = torch.rand(b, t, d, generator=gen) * 0.9 + 0.1
    A = -(torch.rand(d, n, generator=gen) * 7 + 1) if strong else -torch.rand(d, n, generator=gen) * 0.01
    B, C = torch.randn(b, t, n, generator=gen), torch.randn(b, t, n, generator=gen)
    D = torch.randn(d, generator=gen)
    z = torch.randn(b, t, d, generator=gen)
    h0 = torch.randn(b, d, n, generator=gen) if with_h0 else None
    reset = None
    if with_reset:
        reset = torch.rand(b, t, generator=gen) < 0.2
        reset[0, 0] = True  # a document starting at the first token drops h0
        if t > 4:
            reset[-1, 4] = True  # one starting exactly on a chunk boundary
    move = lambda v: None if v is None else v.to(DEVICE)  # noqa: E731
    return [move(v) for v in (x, dt, A, B, C, D, z, h0, reset)]


def run_both(inputs, with_D, with_z, grad_seed=1):
    """Kernel (fp32) and naive loop (fp64) on the same inputs: outputs, final states and the
    gradients of a random linear loss of both, in the order x, dt, A, B, C, D, z, h0."""
    x, dt, A, B, C, D, z, h0, reset = inputs
    D, z = (D if with_D else None), (z if with_z else None)
    leaves = [v for v in (x, dt, A, B, C, D, z, h0) if v is not None]
    ours = [v.clone().requires_grad_() for v in leaves]
    ref = [v.double().requires_grad_() for v in leaves]

    def call(fn, vs, **kw):
        it = iter(vs)
        args = [next(it) if v is not None else None for v in (x, dt, A, B, C, D, z, h0)]
        return fn(*args, reset=reset, **kw)

    y, ht = call(lambda *a, **kw: selective_scan_triton(*a[:6], z=a[6], initial_state=a[7], output_final_state=True, **kw), ours)
    y_ref, h_ref = call(naive_scan, ref)
    gen = torch.Generator().manual_seed(grad_seed)
    gy, gh = torch.randn(y.shape, generator=gen).to(DEVICE), torch.randn(ht.shape, generator=gen).to(DEVICE)
    grads = torch.autograd.grad((y * gy).sum() + (ht * gh).sum(), ours)
    grads_ref = torch.autograd.grad((y_ref * gy.double()).sum() + (h_ref * gh.double()).sum(), ref)
    return (y, ht, grads), (y_ref, h_ref, grads_ref)


def assert_close(a, b, what):
    torch.testing.assert_close(a.double(), b.double(), atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize(
    "t, d, n, strong, with_h0, with_reset, with_D, with_z",
    [
        (9, 5, 3, True, True, True, True, True),  # everything at once, 3 chunks, 2 channel blocks
        (7, 7, 5, False, False, True, True, False),  # weak decays: the state carries over many tokens
        (6, 4, 2, True, True, False, False, True),  # no skip, gate only
        (1, 3, 3, False, True, False, True, False),  # a single token
    ],
)
def test_matches_naive_loop_outputs_states_and_gradients(t, d, n, strong, with_h0, with_reset, with_D, with_z):
    inputs = make_inputs(2, t, d, n, strong, with_h0, with_reset)
    (y, ht, grads), (y_ref, h_ref, grads_ref) = run_both(inputs, with_D, with_z)
    assert y.dtype == torch.float32 and ht.dtype == torch.float32
    assert_close(y, y_ref, "y")
    assert_close(ht, h_ref, "final state")
    names = [k for k, v in zip("x dt A B C D z h0".split(), inputs[:8])
             if v is not None and (k != "D" or with_D) and (k != "z" or with_z)]
    assert len(grads) == len(names)
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert_close(g, g_ref, f"d{name}")


def test_matches_pytorch_chunked_scan():
    """Same outputs and final state as chunk_torch.selective_scan, the gate applied outside as the
    Mamba layer does."""
    x, dt, A, B, C, D, z, h0, reset = make_inputs(2, 11, 6, 4, True, True, True, seed=3)
    y, ht = selective_scan_triton(x, dt, A, B, C, D, z, initial_state=h0, output_final_state=True, reset=reset)
    y_ref, h_ref = selective_scan(x.double(), dt.double(), A.double(), B.double(), C.double(), D.double(),
                                  h0=h0.double(), reset=reset)
    assert_close(y, y_ref * F.silu(z.double()), "y")
    assert_close(ht, h_ref, "final state")


def test_no_final_state_and_no_initial_state_gradient():
    x, dt, A, B, C, D, z, _, _ = make_inputs(1, 5, 3, 2, False, False, False)
    x.requires_grad_()
    y, ht = selective_scan_triton(x, dt, A, B, C, D)
    assert ht is None
    (gx,) = torch.autograd.grad(y.sum(), x)
    x_ref = x.detach().double().requires_grad_()
    y_ref, _ = naive_scan(x_ref, dt.double(), A.double(), B.double(), C.double(), D.double())
    (gx_ref,) = torch.autograd.grad(y_ref.sum(), x_ref)
    assert_close(y, y_ref, "y")
    assert_close(gx, gx_ref, "dx")


def test_backward_is_bitwise_deterministic():
    inputs = make_inputs(2, 9, 5, 3, True, True, True, seed=5)
    (_, _, first), _ = run_both(inputs, True, True)
    (_, _, second), _ = run_both(inputs, True, True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_bf16_inputs_keep_their_dtype_and_compute_in_fp32():
    x, dt, A, B, C, D, z, h0, reset = make_inputs(1, 6, 3, 2, False, True, True, seed=7)
    low = [v.bfloat16() for v in (x, dt, B, C, z)]
    y, ht = selective_scan_triton(low[0], low[1], A, low[2], low[3], D, low[4], initial_state=h0,
                                  output_final_state=True, reset=reset)
    assert y.dtype == torch.bfloat16 and ht.dtype == torch.float32
    y_ref, h_ref = naive_scan(*(v.double() for v in low[:2]), A.double(), *(v.double() for v in low[2:4]),
                              D.double(), low[4].double(), h0.double(), reset)
    torch.testing.assert_close(y.double(), y_ref, atol=2e-2, rtol=1e-2)  # one bf16 rounding of y
    assert_close(ht, h_ref, "final state")


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "dt": a["dt"][:, :-1]}, "dt"),
        (lambda a: {**a, "A": a["A"][:-1]}, "A"),
        (lambda a: {**a, "C": a["C"][:, :, :-1]}, "C"),
        (lambda a: {**a, "z": a["z"][..., :-1]}, "z"),
        (lambda a: {**a, "initial_state": a["initial_state"][:, :-1]}, "initial_state"),
        (lambda a: {**a, "reset": a["reset"][:, :-1]}, "reset"),
        (lambda a: {k: (v[:, :0] if k in ("x", "dt", "B", "C", "z", "reset") else v) for k, v in a.items()}, "empty"),
    ],
)
def test_bad_shapes_raise(change, message):
    x, dt, A, B, C, D, z, h0, reset = make_inputs(1, 3, 2, 2, False, True, True)
    args = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, initial_state=h0, reset=reset)
    with pytest.raises(ValueError, match=message):
        selective_scan_triton(**change(args))
