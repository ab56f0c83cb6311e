"""The Triton SSD kernels (kernels/ssd/chunk.py, recurrent.py) against the token loop
kernels/ssd/naive.py in fp64 and the PyTorch chunked path: outputs, final states and every
gradient (x, dt, A, B, C, D, initial state), with groups, odd head and state sizes, T = 1 and T not
a multiple of the chunk, strong and weak decays, documents starting at t = 0, mid-chunk and on a
chunk boundary, packed sequences (cu_seqlens), an x whose offsets pass 2^31, and the decoding
step chained after the chunked op. Chunks and channel blocks are shrunk to 16 so a few tokens
cross chunk and block boundaries. Fresh outputs are NaN-poisoned so an element a kernel forgets
to write fails. Runs under TRITON_INTERPRET=1 (tests/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import kernels.ssd.chunk as ssd_chunk
import kernels.ssd.recurrent as ssd_recurrent
from kernels.ssd import ssd_chunked, ssd_step
from kernels.ssd.chunk import ssd_chunked_triton
from kernels.ssd.naive import naive_ssd
from kernels.ssd.recurrent import ssd_step_triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
# fp32 kernel vs fp64 loop, values of size ~10-200: measured max abs error 5.7e-5 (dt's and A's
# gradients, sums over P, N and time), <= 5e-5 elsewhere (strong decays: dB 5.2e-5)
ATOL, RTOL = 2e-4, 1e-4
NAMES = "x dt A B C D h0".split()


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    if not INTERPRET and not torch.cuda.is_available():
        pytest.fail("TRITON_INTERPRET=0 needs CUDA; the kernel tests run under the interpreter on CPU")
    for module in (ssd_chunk, ssd_recurrent):
        monkeypatch.setattr(module, "POISON_OUTPUTS", True)
        monkeypatch.setattr(module, "BLOCK_P", 16)
    monkeypatch.setattr(ssd_chunk, "CHUNK", 16)


def make_inputs(b, t, h, p, g, n, decay, with_h0, with_reset, seed=0):
    """x, dt, A, B, C, D, h0 (fp32) and reset. ``decay``: 'strong' (dt * A from -5 to about -60
    per token), 'weak' (above -0.01) or 'mixed' (the Mamba-2 initialisation's range)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, p, generator=gen)
    dt = F.softplus(torch.randn(b, t, h, generator=gen) - 1)
    if decay == "strong":
        dt, A = dt + 1.0, -(torch.rand(h, generator=gen) * 15 + 5)
    elif decay == "weak":
        A = -torch.rand(h, generator=gen) * 0.01
    else:
        A = -torch.exp(torch.randn(h, generator=gen))
    B, C = torch.randn(b, t, g, n, generator=gen), torch.randn(b, t, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    h0 = torch.randn(b, h, p, n, generator=gen) if with_h0 else None
    reset = None
    if with_reset:
        reset = torch.rand(b, t, generator=gen) < 0.1
        reset[0, 0] = True  # drops the initial state of row 0
        if t > 16:
            reset[0, 5] = True  # mid-chunk
            reset[-1, 16] = True  # exactly on a chunk boundary
    move = lambda z: None if z is None else z.to(DEVICE)  # noqa: E731
    return [move(z) for z in (x, dt, A, B, C, D, h0)], move(reset)


def grads_of(fn, leaves, reset, seed=1, cotangent_dtype=torch.float32, **kw):
    """Outputs, final state and the gradients of a random linear loss of both, for the given
    leaves; the loss's weights are rounded to ``cotangent_dtype``."""
    ins = [z.detach().clone().requires_grad_() if z is not None else None for z in leaves]
    y, ht = fn(*ins, reset=reset, **kw)
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=gen).to(cotangent_dtype).to(y.device, y.dtype)
    gh = torch.randn(ht.shape, generator=gen).to(cotangent_dtype).to(ht.device, ht.dtype)
    loss = (y * gy).sum() + (ht * gh).sum()
    return y, ht, torch.autograd.grad(loss, [z for z in ins if z is not None])


def triton_fn(x, dt, A, B, C, D, h0, reset=None, **kw):
    return ssd_chunked_triton(x, dt, A, B, C, D, h0, reset=reset, **kw)


def naive_fn(x, dt, A, B, C, D, h0, reset=None):
    return naive_ssd(x, dt, A, B, C, D, h0, reset)


def assert_close(a, b, what, atol=ATOL, rtol=RTOL):
    assert torch.isfinite(a).all(), what
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


CASES = [
    # (B, T, H, P, G, N, decay, h0, reset, D)
    (2, 37, 4, 20, 2, 12, "mixed", True, True, True),  # groups, odd P/N (2 channel blocks), 3 chunks
    (1, 1, 2, 8, 1, 4, "mixed", True, False, True),  # a single token
    (1, 33, 2, 16, 2, 16, "weak", False, True, False),  # weak decays carry far; one head per group
    (2, 32, 2, 5, 1, 3, "strong", True, True, True),  # down to exp(-60) per token: finite, no NaN
]


@pytest.mark.parametrize("case", CASES)
def test_matches_naive_loop_outputs_states_and_every_gradient(case):
    b, t, h, p, g, n, decay, with_h0, with_reset, with_D = case
    leaves, reset = make_inputs(b, t, h, p, g, n, decay, with_h0, with_reset)
    if not with_D:
        leaves[5] = None
    y, ht, grads = grads_of(triton_fn, leaves, reset)
    y_ref, h_ref, grads_ref = grads_of(naive_fn, [z.double() if z is not None else None for z in leaves], reset)
    assert y.dtype == torch.float32 and ht.dtype == torch.float32
    assert_close(y, y_ref, "y")
    assert_close(ht, h_ref, "final state")
    names = [k for k, z in zip(NAMES, leaves) if z is not None]
    assert len(grads) == len(names)
    for name, got, ref in zip(names, grads, grads_ref):
        assert got.dtype == torch.float32, name
        assert_close(got, ref, f"d{name}")


def test_matches_pytorch_chunked_path():
    """The public function on both backends: same outputs, states and gradients."""
    leaves, reset = make_inputs(2, 21, 4, 12, 2, 8, "mixed", True, True, seed=3)
    ours = grads_of(lambda *a, **kw: ssd_chunked(*a, backend="triton", **kw), leaves, reset)
    ref = grads_of(lambda *a, **kw: ssd_chunked(*a, backend="torch", chunk_size=8, **kw), leaves, reset)
    assert_close(ours[0], ref[0], "y")
    assert_close(ours[1], ref[1], "final state")
    for name, got, want in zip(NAMES, ours[2], ref[2]):
        assert_close(got, want, f"d{name}")


def test_only_output_gradient_and_no_initial_state():
    """The final state unused (no dS_T) and no h0: the kernels must not read what was not given."""
    leaves, reset = make_inputs(1, 19, 2, 8, 1, 4, "mixed", False, True, seed=4)
    x = leaves[0].clone().requires_grad_()
    y, _ = ssd_chunked_triton(x, *leaves[1:6], reset=reset)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    x_ref = leaves[0].double().requires_grad_()
    y_ref, _ = naive_ssd(x_ref, *(z.double() for z in leaves[1:6]), reset=reset)
    (gx_ref,) = torch.autograd.grad(y_ref.square().sum(), x_ref)
    assert_close(y, y_ref, "y")
    assert_close(gx, gx_ref, "dx")


def test_backward_is_bitwise_deterministic():
    leaves, reset = make_inputs(2, 20, 2, 20, 1, 12, "mixed", True, True, seed=5)  # 2 blocks, 2 heads a group
    first = grads_of(triton_fn, leaves, reset)[2]
    second = grads_of(triton_fn, leaves, reset)[2]
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_bf16_inputs_against_the_loop_on_the_rounded_inputs():
    """bf16 x, dt, B, C (A, D, h0 fp32, as in the model), computed in fp32: only the final bf16
    rounding of y, dx, ddt, dB, dC remains, at most one bf16 ulp (2^-7 relative; the interpreter
    truncates where a GPU rounds to nearest). Measured: y 6.0e-2 on |y| <= 13, dx 6.1e-2, ddt
    7.5e-2 on <= 37, dB 5.9e-2, dC 3.1e-2; the fp32 state 1.6e-7, dA 8.3e-6, dD 8.3e-7."""
    leaves, reset = make_inputs(1, 20, 2, 16, 1, 16, "mixed", True, True, seed=7)
    low = [z.bfloat16() if i in (0, 1, 3, 4) else z for i, z in enumerate(leaves)]
    y, ht, grads = grads_of(triton_fn, low, reset, cotangent_dtype=torch.bfloat16)
    y_ref, h_ref, grads_ref = grads_of(naive_fn, [z.double() for z in low], reset, cotangent_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16 and ht.dtype == torch.float32
    one_ulp = dict(atol=1e-2, rtol=1e-2)
    assert_close(y, y_ref, "y", **one_ulp)
    assert_close(ht, h_ref, "final state")
    for name, got, ref in zip(NAMES, grads, grads_ref):
        low_precision = name in ("x", "dt", "B", "C")
        assert got.dtype == (torch.bfloat16 if low_precision else torch.float32), name
        assert_close(got, ref, f"d{name}", **(one_ulp if low_precision else {}))


def test_offsets_past_2_31_are_64_bit(tmp_path):
    """x a view with a token stride of 2^30 + 8 elements over a sparse file: offsets reach about
    2^32, which 32-bit pointer arithmetic would wrap (mamba#1015). The view starts 2^31 elements
    into the file, so wrapped offsets still land in mapped memory and give wrong values rather
    than a crash. Outputs, final state and dx vs the loop."""
    b, t, h, p, g, n = 1, 5, 2, 4, 1, 4
    stride, start = 2**30 + 8, 2**31
    numel = start + (t - 1) * stride + h * p
    path = tmp_path / "x.bin"
    with open(path, "wb") as f:
        f.truncate(numel * 4)  # sparse: only the pages touched take space
    storage = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32)
    leaves, _ = make_inputs(b, t, h, p, g, n, "mixed", True, False, seed=9)
    x = storage.as_strided((b, t, h, p), (t * stride, stride, p, 1), start)
    x.copy_(leaves[0])
    assert x.stride(1) * (t - 1) > 2**31
    x.requires_grad_()  # in place: a clone would be contiguous and small
    y, ht = ssd_chunked_triton(x, *leaves[1:])
    (dx,) = torch.autograd.grad(y.square().sum() + ht.square().sum(), x)
    x_ref = leaves[0].double().requires_grad_()
    y_ref, h_ref = naive_ssd(x_ref, *(z.double() for z in leaves[1:]))
    (dx_ref,) = torch.autograd.grad(y_ref.square().sum() + h_ref.square().sum(), x_ref)
    assert_close(y, y_ref, "y")
    assert_close(ht, h_ref, "final state")
    assert_close(dx, dx_ref, "dx")


def test_packed_sequences_equal_a_loop_over_single_sequences():
    """cu_seqlens with per-sequence initial and final states (and a document reset inside one
    sequence), on the Triton and the PyTorch path: outputs, final states and every gradient equal
    the fp64 loop run on each sequence alone."""
    lengths = [7, 18, 1, 11]  # one shorter than a chunk, one crossing a chunk, one single token
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=DEVICE)
    h, p, g, n = 2, 12, 1, 8
    leaves, _ = make_inputs(1, sum(lengths), h, p, g, n, "mixed", False, False, seed=11)
    leaves[6] = torch.randn(len(lengths), h, p, n, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    reset = torch.zeros(1, sum(lengths), dtype=torch.bool, device=DEVICE)
    reset[0, 16] = True  # token 9 of the second sequence
    packed = {be: grads_of(lambda *a, **kw: ssd_chunked(*a, backend=be, cu_seqlens=cu, chunk_size=8, **kw),
                           leaves, reset) for be in ("triton", "torch")}
    # the same random loss as on the packed output, restricted to each sequence
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(packed["triton"][0].shape, generator=gen).double().to(DEVICE)
    gh = torch.randn(packed["triton"][1].shape, generator=gen).double().to(DEVICE)
    ys, hs, grads = [], [], []
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        x, dt, A, B, C, D, h0 = (z.double().requires_grad_() for z in leaves)
        part = [x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], D, h0[i : i + 1]]
        y, ht = naive_ssd(*part, reset=reset[:, s:e])
        gr = torch.autograd.grad((y * gy[:, s:e]).sum() + (ht * gh[i : i + 1]).sum(), [x, dt, A, B, C, D, h0])
        ys.append(y), hs.append(ht), grads.append(gr)
    loop_y, loop_h = torch.cat(ys, 1), torch.cat(hs, 0)
    loop_grads = [sum(gr[k] for gr in grads) for k in range(7)]  # each sequence fills its own slice
    for be, (y, ht, gr) in packed.items():
        assert_close(y, loop_y, f"{be} y")
        assert_close(ht, loop_h, f"{be} final states")
        for name, got, want in zip(NAMES, gr, loop_grads):
            assert_close(got, want, f"{be} d{name}")


def test_step_chains_with_the_chunked_op():
    """Triton chunk over T tokens, then one Triton step, equals the Triton chunk over T + 1
    tokens; the step equals the PyTorch step, and both the loop (a reset on the stepped token for
    row 0)."""
    leaves, _ = make_inputs(2, 18, 4, 20, 2, 12, "mixed", True, False, seed=13)
    x, dt, A, B, C, D, h0 = leaves
    reset = torch.zeros(2, 18, dtype=torch.bool, device=DEVICE)
    reset[0, -1] = True
    y_full, h_full = ssd_chunked_triton(x, dt, A, B, C, D, h0, reset=reset)
    _, h_prefix = ssd_chunked_triton(x[:, :-1], dt[:, :-1], A, B[:, :-1], C[:, :-1], D, h0)
    step_in = (x[:, -1], dt[:, -1], A, B[:, -1], C[:, -1], D)
    y_step, h_step = ssd_step_triton(h_prefix, *step_in, reset=reset[:, -1])
    assert y_step.dtype == x.dtype and h_step.dtype == torch.float32
    assert_close(y_step, y_full[:, -1], "step y vs chunk")
    assert_close(h_step, h_full, "step state vs chunk")
    y_torch, h_torch = ssd_step(h_prefix, *step_in, reset=reset[:, -1], backend="torch")
    assert_close(y_step, y_torch, "step y vs torch")
    assert_close(h_step, h_torch, "step state vs torch")
    y_ref, h_ref = naive_ssd(*(z.double() for z in leaves), reset)
    assert_close(y_step, y_ref[:, -1], "step y vs loop")
    assert_close(h_step, h_ref, "step state vs loop")
    y_pub, h_pub = ssd_step(h_prefix, *step_in, reset=reset[:, -1], backend="triton")
    assert torch.equal(y_pub, y_step) and torch.equal(h_pub, h_step)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "dt": a["dt"][:, :-1]}, "dt"),
        (lambda a: {**a, "A": a["A"][:-1]}, "A"),
        (lambda a: {**a, "C": a["C"][:, :, :, :-1]}, "C"),
        (lambda a: {**a, "initial_state": a["initial_state"][:, :-1]}, "initial_state"),
        (lambda a: {**a, "reset": a["reset"][:, :-1]}, "reset"),
        (lambda a: {k: (v[:, :0] if k in ("x", "dt", "B", "C", "reset") else v) for k, v in a.items()}, "empty"),
        (lambda a: {**a, "cu_seqlens": torch.tensor([0, 3])}, "cu_seqlens"),  # B = 2
    ],
)
def test_bad_shapes_raise(change, message):
    leaves, reset = make_inputs(2, 3, 2, 4, 1, 4, "mixed", True, True)
    args = dict(zip(["x", "dt", "A", "B", "C", "D", "initial_state"], leaves), reset=reset)
    with pytest.raises(ValueError, match=message):
        ssd_chunked_triton(**change(args))
    with pytest.raises(ValueError, match="state"):
        ssd_step_triton(leaves[6][:, :1], leaves[0][:, 0], leaves[1][:, 0], leaves[2], leaves[3][:, 0],
                        leaves[4][:, 0])
