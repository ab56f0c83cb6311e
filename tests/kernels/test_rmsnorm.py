"""The Triton RMSNorm (kernels/rmsnorm/fused.py) against the fp64 row loop of naive.py: outputs
and every gradient (x, residual, z, weight) of the plain norm, the norm with the residual add
fused, and the gated norm (gate before and after the norm, per group), with widths that are not
powers of two (masked lanes), tiles shrunk so that a few rows make several row blocks and each
backward program loops over several of them, NaN-poisoned fresh outputs, fp32 and bf16 inputs,
a bitwise-deterministic backward, and offsets past 2^31. The PyTorch path is checked against the
same loop. Runs under TRITON_INTERPRET=1 (tests/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch

import kernels.rmsnorm.fused as fused
from kernels.rmsnorm import gated_rms_norm, naive, rms_norm

pytestmark = pytest.mark.usefixtures("one_thread")
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
EPS = 1e-5
# fp32 kernel vs fp64 loop, values and gradients of size ~1-10: measured max abs error 1.9e-6
# (gated norm), 7.2e-7 (fused residual)
FP32 = dict(atol=1e-5, rtol=1e-5)
# bf16 inputs (outputs and gradients rounded to bf16, h too before it is normalised) vs the loop
# on the rounded inputs: measured max abs error 0.061 (gated norm, values up to ~8), 0.027 (fused
# residual); rtol 2^-7 is one bf16 rounding of each stored value, atol for the small ones
BF16 = dict(atol=4e-2, rtol=2**-7)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    if not INTERPRET and not torch.cuda.is_available():
        pytest.fail("TRITON_INTERPRET=0 needs CUDA; the kernel tests run under the interpreter on CPU")
    monkeypatch.setattr(fused, "POISON_OUTPUTS", True)
    # D = 24 -> 2 rows per block
    monkeypatch.setattr(fused, "INTERPRETER_TILE_ELEMENTS" if INTERPRET else "TILE_ELEMENTS", 64)
    monkeypatch.setattr(fused, "INTERPRETER_PROGRAMS", 2)


def _randn(shape, seed, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(DEVICE, dtype).requires_grad_()


def _weight(d, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (1 + 0.3 * torch.randn(d, generator=gen)).to(DEVICE).requires_grad_()


def check(op, reference, inputs: dict, tol, seed=7):
    """``op(**inputs)`` vs ``reference`` on fp64 copies of the (rounded) inputs: every output
    (dtype: the first input's, or residual's) and the gradient of every input for fixed random
    cotangents. Returns the max abs errors, by name."""
    got = op(**inputs)
    ref_inputs = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    ref = reference(**ref_inputs)
    got, ref = (got, ref) if isinstance(got, tuple) else ((got,), (ref,))
    gen = torch.Generator().manual_seed(seed)
    cots = [torch.randn(o.shape, generator=gen) for o in got]
    grads = torch.autograd.grad(got, list(inputs.values()), [c.to(o) for c, o in zip(cots, got)])
    ref_grads = torch.autograd.grad(ref, list(ref_inputs.values()), [c.to(o) for c, o in zip(cots, ref)])
    errors = {}
    names = [f"out{i}" for i in range(len(got))] + [f"d{k}" for k in inputs]
    for name, g, f, src in zip(names, [*got, *grads], [*ref, *ref_grads], [None] * len(got) + list(inputs.values())):
        if src is not None:
            assert g.dtype == src.dtype, name
        torch.testing.assert_close(g.double(), f, **tol, msg=lambda m, name=name: f"{name}: {m}")
        errors[name] = (g.double() - f).abs().max().item()
    return errors


def _rms(backend):
    return lambda x, weight, residual=None: rms_norm(x, weight, EPS, residual=residual, backend=backend)


def _ref_rms(x, weight, residual=None):
    return naive.rms_norm(x, weight, EPS, residual)


@pytest.mark.parametrize("shape", [(3, 5, 24), (7, 1)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rms_norm_matches_loop(shape, with_residual, backend):
    inputs = dict(x=_randn(shape, 0), weight=_weight(shape[-1]))
    if with_residual:
        inputs["residual"] = _randn(shape, 2, scale=2.0)
    check(_rms(backend), _ref_rms, inputs, FP32)


@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gated_rms_norm_matches_loop(group_size, norm_before_gate, backend):
    def op(x, z, weight, gate=norm_before_gate, gs=group_size):
        return gated_rms_norm(x, z, weight, EPS, group_size=gs, norm_before_gate=gate, backend=backend)

    def ref(x, z, weight, gate=norm_before_gate, gs=group_size):
        return naive.gated_rms_norm(x, z, weight, EPS, gs, gate)

    check(op, ref, dict(x=_randn((2, 5, 24), 0), z=_randn((2, 5, 24), 3, scale=2.0), weight=_weight(24)), FP32)


def test_bf16_inputs():
    """bf16 in, bf16 out (h in residual's dtype), each within the stated tolerance of the loop."""
    shape = (3, 5, 24)
    bf = torch.bfloat16
    weight = _weight(24)
    rms = dict(x=_randn(shape, 0, bf), weight=weight, residual=_randn(shape, 2, bf, scale=2.0))
    check(_rms("triton"), _ref_rms, rms, BF16)
    for gate in (False, True):
        def op(x, z, weight, gate=gate):
            return gated_rms_norm(x, z, weight, EPS, group_size=8, norm_before_gate=gate, backend="triton")

        def ref(x, z, weight, gate=gate):
            return naive.gated_rms_norm(x, z, weight, EPS, 8, gate)

        check(op, ref, dict(x=_randn(shape, 0, bf), z=_randn(shape, 3, bf, scale=2.0), weight=weight), BF16)


def test_mixed_dtypes_follow_the_residual():
    """A bf16 branch output added to an fp32 residual stream: h and y in fp32, dx in bf16."""
    x, r, w = _randn((4, 24), 0, torch.bfloat16), _randn((4, 24), 2), _weight(24)
    y, h = rms_norm(x, w, EPS, residual=r, backend="triton")
    assert y.dtype == h.dtype == torch.float32
    y_ref, h_ref = naive.rms_norm(x.detach(), w.detach(), EPS, r.detach())
    torch.testing.assert_close(h.double(), h_ref, **FP32)
    torch.testing.assert_close(y.double(), y_ref, **FP32)
    (dx,) = torch.autograd.grad(y.sum(), x)
    assert dx.dtype == torch.bfloat16


def test_backward_is_bitwise_deterministic():
    """Twice the same gradients, bit for bit, with several programs each summing several row
    blocks into their partial weight-gradient rows."""
    x, r, z, w = _randn((13, 24), 0), _randn((13, 24), 2), _randn((13, 24), 3), _weight(24)
    runs = []
    for _ in range(2):
        y, h = rms_norm(x, w, EPS, residual=r, backend="triton")
        g = gated_rms_norm(x, z, w, EPS, group_size=8, backend="triton")
        runs.append(torch.autograd.grad((y * h).sum() + g.square().sum(), (x, r, z, w)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_offsets_past_2_31_are_64_bit():
    """x, residual and z are views with a row stride of 2^31 - 2^20 elements into one lazily
    allocated bf16 buffer (only touched pages become resident): row 2 lies 2^32 - 2^21 elements
    in, where 32-bit row * stride wraps to a wrong, still mapped, place. Forward and gradients
    vs the loop, and vs the same inputs made dense."""
    b, d, stride, start = 3, 24, 2**31 - 2**20, 2**21
    assert stride < 2**31 < 2 * stride
    buf = torch.empty(start + 2 * stride + 3 * d, dtype=torch.bfloat16, device=DEVICE)
    views = []
    for i, seed in enumerate((0, 2, 3)):
        view = buf.as_strided((b, d), (stride, 1), start + i * d)
        view.copy_(_randn((b, d), seed, torch.bfloat16).detach())
        views.append(view.requires_grad_())
    x, r, z = views
    w = _weight(d)
    check(_rms("triton"), _ref_rms, dict(x=x, weight=w, residual=r), BF16)

    def op(x, z, weight):
        return gated_rms_norm(x, z, weight, EPS, group_size=8, backend="triton")

    def ref(x, z, weight):
        return naive.gated_rms_norm(x, z, weight, EPS, 8)

    check(op, ref, dict(x=x, z=z, weight=w), BF16)
    dense = rms_norm(x.detach().contiguous(), w, EPS, residual=r.detach().contiguous(), backend="triton")
    assert all(torch.equal(a, c) for a, c in zip(rms_norm(x, w, EPS, residual=r, backend="triton"), dense))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x, w: rms_norm(x, w[:5], EPS), "weight"),
        (lambda x, w: rms_norm(x, w, EPS, residual=x[:1]), "residual"),
        (lambda x, w: rms_norm(x.long(), w, EPS), "floating point"),
        (lambda x, w: gated_rms_norm(x, x[:, :5], w, EPS), "z"),
        (lambda x, w: gated_rms_norm(x, x, w, EPS, group_size=7), "group_size"),
    ],
)
def test_bad_inputs_raise(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.ones(2, 24), torch.ones(24))
