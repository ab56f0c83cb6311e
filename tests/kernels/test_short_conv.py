"""The short causal depthwise conv's Triton kernels (kernels/short_conv/chunk.py, recurrent.py)
and PyTorch path against the fp64 token loop (naive.py): outputs and every gradient (x, weight,
bias, initial state) for widths 2-4, odd channel counts in masked channel blocks, document starts
at t = 0, mid-sequence and in runs of one-token documents, an initial state, continuation
(chunk pieces and update steps after a prefix equal one call), bf16 inputs, offsets past 2^31
elements, and a bitwise-deterministic backward. Fresh outputs are NaN-poisoned. Runs under
TRITON_INTERPRET=1 (tests/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch

import kernels.short_conv.chunk as conv_chunk
import kernels.short_conv.recurrent as conv_recurrent
from kernels.short_conv import causal_conv1d, causal_conv1d_update, final_conv_state, naive

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
ATOL, RTOL = 1e-5, 1e-5  # fp32 kernel vs fp64 loop; measured max abs: y 4.1e-7, dx 5.9e-7, dweight 1.2e-6,
# dbias 3.9e-7, d initial state 5.2e-7 (widths 2-4, |values| up to ~10)
# bf16 inputs (fp32 accumulation) vs fp64 on the same bf16 values: y and dx are rounded to bf16
# once (relative 2^-8 of |y| up to ~8); dweight, dbias are summed in fp32 from fp32 partials and
# rounded to the bf16 weight once.
# Measured max abs: y 1.5e-2, dx 3.0e-2, dweight 1.5e-2, dbias 1.0e-2, d initial state 1.6e-2.
BF16 = dict(atol=5e-2, rtol=2e-2)


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 4 tokens x 4 channels, so a tiny input spans several programs in both axes."""
    if not INTERPRET and not torch.cuda.is_available():
        pytest.fail("TRITON_INTERPRET=0 needs CUDA; the kernel tests run under the interpreter on CPU")
    monkeypatch.delenv("PRETRAIN_KERNELS", raising=False)
    monkeypatch.setattr(conv_chunk, "POISON_OUTPUTS", True)
    monkeypatch.setattr(conv_chunk, "BLOCK_T", 4)
    monkeypatch.setattr(conv_chunk, "BLOCK_C", 4)
    monkeypatch.setattr(conv_recurrent, "BLOCK_C", 4)


def make_inputs(b, t, c, w, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x, weight, bias, state = (torch.randn(*s, generator=g) for s in ((b, t, c), (c, w), (c,), (b, c, w - 1)))
    return [v.to(DEVICE, dtype).requires_grad_() for v in (x, weight, bias, state)]


def doc_positions(b, t):
    """Row 0: one document starting mid-way through a previous one (position 3 at t = 0), a start
    at t = 5 and a run of one-token documents; row 1: a start at t = 0, one at t = 1, then long."""
    pos = torch.zeros(b, t, dtype=torch.long)
    for i in range(b):
        starts, p = ([5, 7, 8, 9], 2) if i % 2 == 0 else ([0, 1], 0)
        for j in range(t):
            p = 0 if j in starts else p + 1
            pos[i, j] = p
    return pos.to(DEVICE)


def run(fn, x, weight, bias, state, dy, **kw):
    """Output and the gradients of <y, dy> with respect to x, weight, bias, state."""
    for v in (x, weight, bias, state):
        v.grad = None
    y = fn(x, weight, bias, state, **kw)
    (y * dy).sum().backward()
    return [y.detach()] + [v.grad.detach().clone() for v in (x, weight, bias, state)]


def reference(x, weight, bias, state, positions=None, activation="silu"):
    d = [v.detach().double().requires_grad_() for v in (x, weight, bias, state)]
    return naive.causal_conv1d(*d[:3], positions, d[3], activation)[0], d


def naive_run(x, weight, bias, state, dy, positions=None, activation="silu"):
    y, d = reference(x, weight, bias, state, positions, activation)
    (y * dy.double()).sum().backward()
    return [y.detach()] + [v.grad for v in d]


def kernel(backend):
    def fn(x, weight, bias, state, positions=None, activation="silu"):
        return causal_conv1d(x, weight, bias, positions=positions, initial_state=state, activation=activation,
                             backend=backend)
    return fn


NAMES = ("y", "dx", "dweight", "dbias", "dstate")


def assert_all_close(got, ref, **tol):
    for name, a, r in zip(NAMES, got, ref):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a.double(), r.double(), **(tol or dict(atol=ATOL, rtol=RTOL)),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("w, c, activation", [(2, 5, "silu"), (3, 7, None), (4, 6, "silu"), (4, 3, None)])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_matches_the_naive_loop(w, c, activation, backend):
    """11 tokens in blocks of 4 (a masked time block), c channels in blocks of 4, documents."""
    x, weight, bias, state = make_inputs(2, 11, c, w, seed=w)
    pos = doc_positions(2, 11)
    dy = torch.randn(2, 11, c, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    got = run(kernel(backend), x, weight, bias, state, dy, positions=pos, activation=activation)
    assert_all_close(got, naive_run(x, weight, bias, state, dy, pos, activation))


def test_without_positions_bias_or_state():
    """No mask, no bias, zeros before t = 0 (initial_state None) at T = 1 and T = 6."""
    for t in (1, 6):
        x, weight, _, _ = make_inputs(3, t, 5, 4, seed=t)
        dy = torch.randn(3, t, 5, generator=torch.Generator().manual_seed(t)).to(DEVICE)
        y = causal_conv1d(x, weight, backend="triton")
        (y * dy).sum().backward()
        d = [v.detach().double().requires_grad_() for v in (x, weight)]
        y_ref, _ = naive.causal_conv1d(d[0], d[1])
        (y_ref * dy.double()).sum().backward()
        torch.testing.assert_close(y.double(), y_ref, atol=ATOL, rtol=RTOL)
        for v, r in zip((x, weight), d):
            torch.testing.assert_close(v.grad.double(), r.grad, atol=ATOL, rtol=RTOL)


def test_continuation_equals_one_call():
    """A prefix by the chunk kernel, then update steps, then another chunk piece, each starting
    from the previous final state (a document starting during the steps): the outputs and final
    state of one call over the whole sequence, on both backends."""
    x, weight, bias, _ = make_inputs(2, 12, 5, 4, seed=3)
    x, weight, bias = x.detach(), weight.detach(), bias.detach()
    pos = doc_positions(2, 12)
    y_ref, final_ref = naive.causal_conv1d(x.double(), weight.double(), bias.double(), pos, None, "silu")
    for backend in ("triton", "torch"):
        kw = dict(activation="silu", backend=backend)
        ys = [causal_conv1d(x[:, :5], weight, bias, positions=pos[:, :5], **kw)]
        state = final_conv_state(x[:, :5], None, 4)
        for i in range(5, 9):
            y_i, state = causal_conv1d_update(x[:, i], state, weight, bias, positions=pos[:, i], **kw)
            ys.append(y_i[:, None])
        ys.append(causal_conv1d(x[:, 9:], weight, bias, positions=pos[:, 9:], initial_state=state, **kw))
        state = final_conv_state(x[:, 9:], state, 4)
        torch.testing.assert_close(torch.cat(ys, 1).double(), y_ref, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(state.double(), final_ref)


@pytest.mark.parametrize("w", [1, 2, 3, 4])
def test_update_is_one_token_of_the_naive_loop(w):
    """7 channels in blocks of 4; positions 0, 1, 5: the state read by no tap, by one, by all
    (w = 1: no state; the Triton backend falls back to the PyTorch path)."""
    x, weight, bias, state = (v.detach() for v in make_inputs(3, 1, 7, w, seed=w))
    pos = torch.tensor([0, 1, 5], device=DEVICE)
    before = state.clone()
    y, new = causal_conv1d_update(x[:, 0], state, weight, bias, positions=pos, activation="silu", backend="triton")
    assert torch.equal(state, before) and (new.numel() == 0 or new.data_ptr() != state.data_ptr())
    y_ref, new_ref = naive.causal_conv1d(x.double(), weight.double(), bias.double(), pos[:, None], state.double(),
                                         "silu")
    torch.testing.assert_close(y.double(), y_ref[:, 0], atol=ATOL, rtol=RTOL)
    assert torch.equal(new.double(), new_ref)


def test_backward_is_deterministic():
    x, weight, bias, state = make_inputs(2, 13, 6, 4, seed=7)
    dy = torch.randn(2, 13, 6, generator=torch.Generator().manual_seed(8))
    pos = doc_positions(2, 13)
    first = run(kernel("triton"), x, weight, bias, state, dy, positions=pos)
    second = run(kernel("triton"), x, weight, bias, state, dy, positions=pos)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_bf16_inputs():
    """bf16 x, weight, bias and state vs the fp64 loop on the same bf16 values."""
    x, weight, bias, state = make_inputs(2, 9, 5, 4, seed=9, dtype=torch.bfloat16)
    dy = torch.randn(2, 9, 5, generator=torch.Generator().manual_seed(10)).bfloat16()
    pos = doc_positions(2, 9)
    got = run(kernel("triton"), x, weight, bias, state, dy, positions=pos)
    assert all(g.dtype == torch.bfloat16 for g in got)
    ref = naive_run(x, weight, bias, state, dy, pos)
    for name, a, r in zip(NAMES, got, ref):
        torch.testing.assert_close(a.double(), r, **BF16,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_64bit_offsets():
    """x of batch row 2 starts 2^32 - 2^21 elements into a bf16 buffer (a strided view: each
    stride fits int32, row * stride does not), the initial state likewise as a transposed view:
    a kernel multiplying in 32 bits reads the buffer's first elements instead. Forward,
    backward and update against the loop; only touched pages are ever resident."""
    b, t, c, w = 3, 5, 6, 3
    stride, start = 2**31 - 2**20, 2**21
    buf = torch.empty(start + 2 * stride + t * c + c * (w - 1), dtype=torch.bfloat16, device=DEVICE)
    x0, weight, bias, s0 = (v.detach() for v in make_inputs(b, t, c, w, seed=11, dtype=torch.bfloat16))
    x = buf.as_strided((b, t, c), (stride, c, 1), start)
    state = buf.as_strided((b, c, w - 1), (stride, 1, c), start + t * c)  # [B, W-1, C] storage, transposed
    x.copy_(x0)
    state.copy_(s0)
    pos = doc_positions(b, t)
    xg, sg = x.requires_grad_(), state.requires_grad_()
    dy = torch.randn(b, t, c, generator=torch.Generator().manual_seed(12)).bfloat16()
    got = run(kernel("triton"), xg, weight.requires_grad_(), bias.requires_grad_(), sg, dy, positions=pos)
    ref = naive_run(x0, weight, bias, s0, dy, pos)
    for name, a, r in zip(NAMES, got, ref):
        torch.testing.assert_close(a.double(), r, **BF16,
                                   msg=lambda m, name=name: f"{name}: {m}")
    with torch.no_grad():
        y, new = causal_conv1d_update(x[:, 0], state, weight, bias, positions=pos[:, 0], activation="silu",
                                      backend="triton")
        y_ref, new_ref = naive.causal_conv1d(x0[:, :1].double(), weight.double(), bias.double(), pos[:, :1],
                                             s0.double(), "silu")
    torch.testing.assert_close(y.double(), y_ref[:, 0], **BF16)
    assert torch.equal(new.double(), new_ref)


def test_bad_inputs_raise():
    x, weight, bias, state = (v.detach() for v in make_inputs(2, 3, 5, 4))
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, weight[:4], backend="torch")
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, weight, initial_state=state[..., :2], backend="torch")
    with pytest.raises(ValueError, match="positions"):
        causal_conv1d(x, weight, positions=torch.zeros(2, 4, dtype=torch.long), backend="torch")
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, activation="gelu", backend="torch")
    with pytest.raises(ValueError, match="conv_state"):
        causal_conv1d_update(x[:, 0], state[..., :1], weight, backend="torch")
