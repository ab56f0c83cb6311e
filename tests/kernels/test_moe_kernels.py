"""The MoE Triton kernels (kernels/moe: permutation, grouped GEMM, GRU gates) under the
interpreter against the per-expert specification (kernels/moe/naive.py) in fp64: outputs and
every gradient, odd widths (masks), experts without tokens, k = 1 and 2, NaN-poisoned fresh
outputs, a bitwise-deterministic backward, bf16 tolerances, 64-bit offsets; and whole tiny MoE
models (RMoE's GRU router and a plain softmax router) on kernels='triton' vs 'torch'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kernels.moe as moe_ops
from kernels.dispatch import ENV_VAR
from kernels.moe import grouped_gemm, gru, permutation
from kernels.moe.naive import naive_grouped_mm, naive_gru_cell, naive_moe, naive_permute, naive_unpermute

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
# Relative to the reference's max, against the fp64 spec on the same (bf16-rounded) inputs;
# gradients of chained ops get twice this. Measured: fp32 at most 7.3e-7 (the GRU's dx); bf16
# 5.5e-3 (grouped GEMM), 6.4e-3 (permutation), 7.8e-3 (GRU), 1.9e-2 (the whole layer's dx: four
# bf16 roundings). Triton 3.9's interpreter rounds fp32 -> bf16 toward zero (half of the elements
# differ from torch's round-to-nearest), about twice the error a GPU gives; the PyTorch path's
# layer measures 8.5e-3.
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def interpreted(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for mod in (grouped_gemm, gru, permutation):
        monkeypatch.setattr(mod, "POISON_OUTPUTS", True)
    # small tiles: an expert's rows span several row tiles, D and F several K / N blocks
    monkeypatch.setattr(grouped_gemm, "BM", 16)
    monkeypatch.setattr(grouped_gemm, "BN", 16)
    monkeypatch.setattr(grouped_gemm, "BK", 16)
    monkeypatch.setattr(permutation, "BLOCK_D", 16)


MEASURED: dict[str, float] = {}  # dtype -> the largest relative error seen (printed with -s)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in fp64; NaN (an unwritten element) gives inf."""
    err = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
    err = err if err == err else float("inf")
    MEASURED[str(a.dtype)] = max(MEASURED.get(str(a.dtype), 0.0), err)
    return err


def routing(n: int, e: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``expert_idx [n, k]`` distinct per token, expert e-1 never chosen; weights in (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(n)])
    return idx, torch.rand(n, k, generator=g) + 0.1


def leaves(*shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(dtype).requires_grad_() for s in shapes]


def grads(out: torch.Tensor, inputs, dy: torch.Tensor):
    return torch.autograd.grad(out, inputs, dy.to(out.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2])
def test_permute_unpermute_vs_spec(k, dtype):
    n, d, e = 9, 19, 5
    idx, w = routing(n, e, k, seed=k)
    x, ys = leaves((n, d), (n * k, d), dtype=dtype)
    w = w.to(dtype).requires_grad_()
    xs, counts, order = moe_ops.permute(x, idx, e, backend="triton")
    xs_ref, counts_ref, order_ref = naive_permute(x.double(), idx, e)
    assert torch.equal(counts, counts_ref) and counts[-1] == 0 and torch.equal(order, order_ref)
    assert torch.equal(xs.double(), xs_ref)  # a gather is exact
    dxs = torch.randn(n * k, d, generator=torch.Generator().manual_seed(5))
    (dx,) = grads(xs, [x], dxs)
    x64 = x.detach().double().requires_grad_()
    (dx_ref,) = grads(naive_permute(x64, idx, e)[0], [x64], dxs.double())
    assert rel(dx, dx_ref) <= TOL[dtype]
    y = moe_ops.unpermute(ys, order, w, backend="triton")
    ys64, w64 = (t.detach().double().requires_grad_() for t in (ys, w))
    y_ref = naive_unpermute(ys64, order, w64)
    assert y.dtype == dtype and rel(y, y_ref) <= TOL[dtype]
    dy = torch.randn(n, d, generator=torch.Generator().manual_seed(6))
    for name, a, b in zip(("ys", "weight"), grads(y, [ys, w], dy), grads(y_ref, [ys64, w64], dy.double())):
        assert rel(a, b) <= TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_vs_spec(dtype):
    """Experts of 0, 20 (two row tiles of 16), 3, 0 and 17 rows; D = 19, F = 23."""
    counts = torch.tensor([0, 20, 3, 0, 17])
    m, d, f = int(counts.sum()), 19, 23
    xs, w = leaves((m, d), (5, d, f), dtype=dtype, seed=1)
    out = moe_ops.grouped_mm(xs, w, counts, backend="triton")
    xs64, w64 = (t.detach().double().requires_grad_() for t in (xs, w))
    ref = naive_grouped_mm(xs64, w64, counts)
    assert out.dtype == dtype and rel(out, ref) <= TOL[dtype]
    dy = torch.randn(m, f, generator=torch.Generator().manual_seed(2))
    dx, dw = grads(out, [xs, w], dy)
    dx_ref, dw_ref = grads(ref, [xs64, w64], dy.double())
    assert rel(dx, dx_ref) <= TOL[dtype] and rel(dw, dw_ref) <= TOL[dtype]
    assert torch.equal(dw[[0, 3]], torch.zeros_like(dw[[0, 3]]))  # experts without rows


def test_grouped_mm_without_rows_keeps_the_graph():
    """M = 0 (an expert-parallel rank that received nothing): zero weight gradient, and the
    backward still reaches xs."""
    xs, w = leaves((0, 19), (3, 19, 5), dtype=torch.float32)
    out = moe_ops.grouped_mm(xs, w, torch.zeros(3, dtype=torch.long), backend="triton")
    dx, dw = torch.autograd.grad(out.sum(), [xs, w])
    assert out.shape == (0, 5) and dx.shape == (0, 19) and torch.equal(dw, torch.zeros_like(w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2])
def test_moe_experts_vs_spec(k, dtype):
    """The whole layer (permute, SwiGLU experts on grouped GEMMs, gated unpermute) against
    every expert on every token masked by the routing: output and the gradients of x, w1, w3,
    w2 and the routing weights."""
    n, d, h, e = 11, 19, 21, 5
    idx, w = routing(n, e, k, seed=3 + k)
    x, w1, w3, w2 = leaves((n, d), (e, d, h), (e, d, h), (e, h, d), dtype=dtype, seed=k)
    w1.data *= 0.3
    w3.data *= 0.3
    w = w.to(dtype).requires_grad_()
    inputs = [x, w1, w3, w2, w]
    y = moe_ops.moe_experts(x, w1, w3, w2, idx, w, backend="triton")
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = naive_moe(*ref_in[:4], idx, ref_in[4])
    assert rel(y, ref) <= TOL[dtype]
    dy = torch.randn(n, d, generator=torch.Generator().manual_seed(7))
    for name, a, b in zip(("x", "w1", "w3", "w2", "weight"), grads(y, inputs, dy), grads(ref, ref_in, dy.double())):
        assert rel(a, b) <= 2 * TOL[dtype], name


def _gru_inputs(dtype, shape=(3, 5), i=6, hid=20, seed=4):
    return leaves((*shape, i), (*shape, hid), (3 * hid, i), (3 * hid, hid), (3 * hid,), (3 * hid,), dtype=dtype,
                  seed=seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gru_cell_vs_spec_and_torch_grucell(dtype):
    """H = 20 (masked channels); the spec is also checked against torch.nn.GRUCell."""
    inputs = _gru_inputs(dtype)
    out = moe_ops.gru_cell(*inputs, backend="triton")
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref = naive_gru_cell(*ref_in)
    cell = torch.nn.GRUCell(6, 20).double()
    with torch.no_grad():
        for p, t in zip((cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh), ref_in[2:]):
            p.copy_(t)
    torch.testing.assert_close(cell(ref_in[0].reshape(-1, 6), ref_in[1].reshape(-1, 20)).view_as(ref), ref)
    assert out.dtype == dtype and rel(out, ref) <= TOL[dtype]
    dy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(8))
    names = ("x", "h", "w_ih", "w_hh", "b_ih", "b_hh")
    for name, a, b in zip(names, grads(out, inputs, dy), grads(ref, ref_in, dy.double())):
        assert rel(a, b) <= 2 * TOL[dtype], name


def test_backward_is_bitwise_deterministic():
    n, d, h, e, k = 11, 19, 21, 5, 2
    idx, w = routing(n, e, k, seed=9)
    x, w1, w3, w2 = leaves((n, d), (e, d, h), (e, d, h), (e, h, d), dtype=torch.float32, seed=9)
    w.requires_grad_()
    g_in = _gru_inputs(torch.float32)
    runs = []
    for _ in range(2):
        y = moe_ops.moe_experts(x, w1, w3, w2, idx, w, backend="triton")
        hn = moe_ops.gru_cell(*g_in, backend="triton")
        runs.append(torch.autograd.grad(y.square().sum() + hn.square().sum(), [x, w1, w3, w2, w, *g_in]))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _huge_rows(tmp_path: Path, name: str, values: torch.Tensor) -> torch.Tensor:
    """``values [R, C]`` copied into a view whose row stride is 2^30 + 8 elements, starting 2^31
    elements into a sparse file: row offsets pass 2^32, which 32-bit arithmetic would wrap into
    mapped memory (wrong values, not a crash)."""
    r, c = values.shape
    stride, start = 2**30 + 8, 2**31
    numel = start + (r - 1) * stride + c
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(numel * 4)
    view = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32).as_strided((r, c), (stride, 1),
                                                                                               start)
    view.copy_(values)
    assert view.stride(0) * (r - 1) > 2**31
    return view.requires_grad_()


def test_offsets_past_2_31_are_64_bit(tmp_path):
    """Every kernel reads a row-strided input whose offsets pass 2^32: the gather (x), the
    unpermute and its backward (ys), the grouped GEMM and its weight gradient (xs), the GRU
    gates (h)."""
    n, d, e, k = 4, 8, 3, 2
    idx, w = routing(n, e, k, seed=10)
    x0, w0 = leaves((n, d), (e, d, 5), dtype=torch.float32, seed=10)
    x = _huge_rows(tmp_path, "x.bin", x0.detach())
    xs, _, order = moe_ops.permute(x, idx, e, backend="triton")
    xs_ref, counts, _ = naive_permute(x0, idx, e)
    assert torch.equal(xs, xs_ref)
    (dx,) = torch.autograd.grad(xs, [x], xs_ref.detach())
    torch.testing.assert_close(dx, torch.autograd.grad(xs_ref, [x0], xs_ref.detach())[0])
    w = w.requires_grad_()
    ys = _huge_rows(tmp_path, "ys.bin", xs_ref.detach())
    y = moe_ops.unpermute(ys, order, w, backend="triton")
    ys64, w64 = xs_ref.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y_ref = naive_unpermute(ys64, order, w64)
    assert rel(y, y_ref) <= TOL[torch.float32]
    dy = y_ref.detach()
    for a, b in zip(torch.autograd.grad(y, [ys, w], dy.float()), torch.autograd.grad(y_ref, [ys64, w64], dy)):
        assert rel(a, b) <= TOL[torch.float32]
    xs_big = _huge_rows(tmp_path, "xs.bin", xs_ref.detach())
    out = moe_ops.grouped_mm(xs_big, w0, counts, backend="triton")
    ref = naive_grouped_mm(xs_ref.detach().double(), w0.detach().double(), counts)
    assert rel(out, ref) <= TOL[torch.float32]
    (dw,) = torch.autograd.grad(out, [w0], torch.ones_like(out))
    (dw_ref,) = torch.autograd.grad(naive_grouped_mm(xs_ref.detach().double(), w0.double(), counts), [w0],
                                    torch.ones_like(ref))
    assert rel(dw, dw_ref) <= TOL[torch.float32]
    g_in = _gru_inputs(torch.float32, shape=(3,))
    h = _huge_rows(tmp_path, "h.bin", g_in[1].detach())
    out = moe_ops.gru_cell(g_in[0], h, *g_in[2:], backend="triton")
    assert rel(out, naive_gru_cell(*(t.detach().double() for t in g_in))) <= TOL[torch.float32]


def _model(config: str | None, kernels: str):
    from pretrain.config import MoEConfig, load_config
    from pretrain.models import build_model
    from tests.models.conftest import _make_cfg

    if config is None:  # a plain softmax router, k = 1, with a shared expert
        moe = MoEConfig(n_experts=4, top_k=1, expert_hidden=24, shared_expert=True)
        cfg = _make_cfg("attn:moe attn:moe", kernels=kernels, moe=moe)
    else:  # rmoe_tiny cut to two layers of width 32: its GRU router, top-2 of 8 experts
        over = ["model.n_layers=2", "model.d_model=32", "model.moe.expert_hidden=40", "model.moe.router_hidden=20",
                "model.vocab_size=64", f"model.kernels='{kernels}'"]
        cfg = load_config(ROOT / "configs" / config, over).model
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.mark.parametrize("config", ["rmoe_tiny.toml", None], ids=["rmoe_tiny", "moe"])
def test_model_on_triton_kernels_equals_the_torch_path(config, monkeypatch):
    for name, size in (("BM", 64), ("BN", 64), ("BK", 32)):  # the launch sizes: fewer interpreted programs
        monkeypatch.setattr(grouped_gemm, name, size)
    ids = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(11))
    out = {}
    for kernels in ("torch", "triton"):
        model = _model(config, kernels)
        logits = model(ids)
        logits.square().mean().backward()
        out[kernels] = logits.detach(), {k: p.grad for k, p in model.named_parameters()}
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-4, atol=1e-5)
    assert out["torch"][1].keys() == out["triton"][1].keys()
    for k, g in out["torch"][1].items():
        assert g is not None, k
        torch.testing.assert_close(out["triton"][1][k], g, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
