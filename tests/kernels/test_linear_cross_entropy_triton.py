"""The Triton block kernel of the fused linear + cross-entropy (kernels/linear_cross_entropy/
chunk.py, through the public function with backend='triton') against the unfused fp64
specification (F.linear, F.cross_entropy, autograd): the loss and the gradients of the hidden
states and the weight, with ignored labels (and another ignore_index), the z-loss, vocabularies
that are not a multiple of the tile (masks) over several tiles, logits 1000 apart, bf16 inputs,
a vocabulary split over ranks (threads meeting in the all-reduce), a block whose row offsets pass
2^31, and the backward run twice. Fresh outputs are NaN-poisoned. Runs under TRITON_INTERPRET=1
(tests/kernels/conftest.py)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

import kernels.linear_cross_entropy.chunk as lce_chunk
from kernels.linear_cross_entropy import linear_cross_entropy
from kernels.linear_cross_entropy.chunk import loss_block_triton
from kernels.linear_cross_entropy.chunk_torch import loss_block_torch
from kernels.linear_cross_entropy.naive import naive_linear_cross_entropy
from tests.kernels.test_linear_cross_entropy import _ThreadGroup

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
# max |error| relative to the reference's largest value, per input dtype, vs the fp64 spec on the
# same (rounded) inputs. Measured: fp32 loss 4.2e-8, dh 4.4e-7, dW 4.3e-7; bf16 loss 1.4e-4, dh
# 1.3e-2, dW 8.4e-3 (the logits' gradient rounded to bf16 before the bf16 matmuls, and the
# gradients rounded to bf16: a few bf16 ulps; the PyTorch block measures 1.0e-2 and 6.1e-3).
TOL = {torch.float32: 2e-6, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    if not INTERPRET and not torch.cuda.is_available():
        pytest.fail("TRITON_INTERPRET=0 needs CUDA; the kernel tests run under the interpreter on CPU")
    monkeypatch.setattr(lce_chunk, "POISON_OUTPUTS", True)
    monkeypatch.setattr(lce_chunk, "MAX_BLOCK_V", 16)  # several vocabulary tiles at test sizes


def _inputs(n=29, d=12, v=37, dtype=torch.float32, seed=0, ignored=(3, 17), ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=gen) * 2).to(DEVICE, dtype).requires_grad_()
    weight = torch.randn(v, d, generator=gen).to(DEVICE, dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    labels[list(ignored)] = ignore_index
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight, labels, **kw):
    loss = fn(hidden, weight, labels, **kw)
    grads = torch.autograd.grad(loss * 1.7, (hidden, weight))  # a non-unit incoming gradient
    return loss.detach(), grads


def _reference(hidden, weight, labels, **kw):
    """The fp64 spec on the same (rounded) inputs; gradients of the original leaves' shapes."""
    h, w = (z.detach().double().requires_grad_() for z in (hidden, weight))
    return _loss_and_grads(naive_linear_cross_entropy, h, w, labels, **kw)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def _check(got, want, dtype):
    (loss, grads), (ref, ref_grads) = got, want
    errs = [_rel_err(loss, ref)] + [_rel_err(a, b) for a, b in zip(grads, ref_grads)]
    assert all(e <= TOL[dtype] for e in errs), errs
    assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads)


@pytest.mark.parametrize("v", [37, 16, 5])  # three tiles with a masked tail; one full tile; V < one tile
@pytest.mark.parametrize("chunk_size", [7, None])
@pytest.mark.parametrize("z_loss_coef", [0.0, 1e-2])
def test_matches_unfused_fp32(v, chunk_size, z_loss_coef):
    args = _inputs(v=v)
    want = _reference(*args, z_loss_coef=z_loss_coef)
    got = _loss_and_grads(linear_cross_entropy, *args, z_loss_coef=z_loss_coef, chunk_size=chunk_size,
                          backend="triton")
    _check(got, want, torch.float32)


def test_other_ignore_index():
    args = _inputs(ignored=(0, 5, 28), ignore_index=-1)
    want = _reference(*args, ignore_index=-1, z_loss_coef=1e-3)
    got = _loss_and_grads(linear_cross_entropy, *args, ignore_index=-1, z_loss_coef=1e-3, chunk_size=8,
                          backend="triton")
    _check(got, want, torch.float32)
    for g in got[1]:  # the ignored tokens' hidden states get no gradient
        assert torch.isfinite(g).all()
    assert (got[1][0][[0, 5, 28]] == 0).all()


def test_bf16_matches_unfused_on_rounded_inputs():
    args = _inputs(n=40, d=24, v=45, dtype=torch.bfloat16)
    want = _reference(*args, z_loss_coef=1e-3)
    got = _loss_and_grads(linear_cross_entropy, *args, z_loss_coef=1e-3, chunk_size=16, backend="triton")
    _check(got, want, torch.bfloat16)


def test_extreme_logits_stay_finite():
    """Token 0's label logit 1000 below its row's max (in another tile): exp underflows to 0, the
    loss is read from the logit, so it stays finite and equals the fp64 spec."""
    hidden, weight, labels = _inputs(ignored=())
    with torch.no_grad():
        u = hidden[0] / hidden[0].norm().square()  # hidden[0] . u = 1
        weight[labels[0]] = -500 * u
        weight[(labels[0] + 20) % weight.shape[0]] = 500 * u
    want = _reference(hidden, weight, labels)
    got = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_size=4, backend="triton")
    assert torch.isfinite(got[0]) and want[0] > 1000 / len(labels)
    assert all(torch.isfinite(g).all() for g in got[1])
    _check(got, want, torch.float32)


@pytest.mark.parametrize("z_loss_coef", [0.0, 1e-2])
def test_vocabulary_parallel_equals_one_rank(z_loss_coef, monkeypatch):
    """Three ranks with uneven vocabulary rows (14 + 13 + 10): statistics from the first launch,
    reduced by the threads, the gradient from the second; the replicated loss, each rank's rows'
    gradient and the sum of the hidden-state partial gradients equal the fp64 spec. Launches are
    serialised by a lock: Triton's interpreter is not thread-safe (it patches triton.language
    while a kernel runs)."""
    lock, launch = threading.Lock(), lce_chunk._launch

    def serialised(*a, **kw):
        with lock:
            return launch(*a, **kw)

    monkeypatch.setattr(lce_chunk, "_launch", serialised)
    hidden, weight, labels = _inputs()
    want_loss, (want_dh, want_dw) = _reference(hidden, weight, labels, z_loss_coef=z_loss_coef)
    bounds = [0, 14, 27, 37]
    group, results, errors = _ThreadGroup(3), [None] * 3, []

    def run(rank: int) -> None:
        try:
            rows = slice(bounds[rank], bounds[rank + 1])
            w = weight.detach()[rows].clone().requires_grad_()
            h = hidden.detach().clone().requires_grad_()
            kw = dict(z_loss_coef=z_loss_coef, chunk_size=7, vocab_start=bounds[rank], all_reduce=group.member(rank),
                      backend="triton")
            results[rank] = _loss_and_grads(linear_cross_entropy, h, w, labels, **kw)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(exc)
            group.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for loss, _ in results:
        assert _rel_err(loss, want_loss) <= TOL[torch.float32]
    assert _rel_err(sum(g[0] for _, g in results), want_dh) <= TOL[torch.float32]
    assert _rel_err(torch.cat([g[1] for _, g in results]), want_dw) <= TOL[torch.float32]


def test_row_offsets_past_2_31_are_64_bit(tmp_path):
    """The block a view with a row stride of 2^30 + 8 fp32 over a sparse file, starting 2^31
    elements in: row offsets reach about 2^32.4, which 32-bit arithmetic would wrap into mapped
    memory (wrong values, not a crash). Statistics and the in-place gradient vs the PyTorch block
    on a dense copy."""
    c, v, stride, start = 4, 37, 2**30 + 8, 2**31
    numel = start + (c - 1) * stride + v
    path = tmp_path / "z.bin"
    with open(path, "wb") as f:
        f.truncate(numel * 4)  # sparse: only the pages touched take space
    storage = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    dense = torch.randn(c, v, generator=gen) * 3
    labels = torch.tensor([2, 36, -100, 17])
    w = torch.tensor([0.25, 0.25, 0.0, 0.25])
    z = storage.as_strided((c, v), (stride, 1), start)
    z.copy_(dense)
    assert z.stride(0) * (c - 1) + start > 2**32
    nll, lse, dz = loss_block_triton(z, labels, 0, w, 1e-2, None, torch.float32)
    want_nll, want_lse, want_dz = loss_block_torch(dense.double(), labels, 0, w.double(), 1e-2, None, torch.float64)
    assert dz.data_ptr() == z.data_ptr()  # in place
    kept = labels != -100  # an ignored row's nll is arbitrary (weighted by 0)
    torch.testing.assert_close(nll[kept].double(), want_nll[kept], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z.double(), want_dz, rtol=1e-6, atol=1e-7)


def test_block_writes_a_bf16_gradient_and_leaves_z_for_stats():
    """bf16 weights: the gradient goes to a fresh (poisoned) bf16 block, every element written."""
    gen = torch.Generator().manual_seed(4)
    z = (torch.randn(5, 21, generator=gen) * 4).to(DEVICE)
    labels = torch.tensor([0, 20, 7, -100, 3], device=DEVICE)
    w = torch.full((5,), 0.25, device=DEVICE)
    w[3] = 0
    _, _, want = loss_block_torch(z.double(), labels, 0, w.double(), 0.0, None, torch.float64)
    _, _, got = loss_block_triton(z, labels, 0, w, 0.0, None, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-3)


def test_backward_is_deterministic():
    args = _inputs(n=33, v=37, seed=5)
    first = _loss_and_grads(linear_cross_entropy, *args, z_loss_coef=1e-2, chunk_size=8, backend="triton")
    second = _loss_and_grads(linear_cross_entropy, *args, z_loss_coef=1e-2, chunk_size=8, backend="triton")
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_triton_backend_runs_the_kernel_and_torch_does_not(monkeypatch):
    calls = []
    real = lce_chunk._launch
    monkeypatch.setattr(lce_chunk, "_launch", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    args = _inputs(n=10, ignored=(3,))
    linear_cross_entropy(*args, chunk_size=4, backend="torch")
    assert calls == []
    linear_cross_entropy(*args, chunk_size=4, backend="triton")
    assert len(calls) == 3  # one launch per block of 4 tokens
    with pytest.raises(ValueError, match="fp32 block"):
        loss_block_triton(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long), 0,
                          torch.ones(2), 0.0, None, None)


@pytest.mark.parametrize("tie_embeddings", [False, True])
def test_model_loss_on_the_triton_head_equals_the_torch_path(tie_embeddings, monkeypatch):
    """A whole attention model with model.kernels='triton' (its only kernel: the fused head,
    untied or tied to the embedding, with the z-loss): the loss with its z-loss term and every
    parameter gradient equal model.kernels='torch' (fp32 tolerance)."""
    from pretrain.models import build_model
    from tests.models.conftest import _make_cfg

    calls = []
    launch = lce_chunk._launch
    monkeypatch.setattr(lce_chunk, "_launch", lambda *a, **kw: calls.append(1) or launch(*a, **kw))
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    out = {}
    for kernels in ("torch", "triton"):
        cfg = _make_cfg("attn", kernels=kernels, tie_embeddings=tie_embeddings, z_loss_coef=1e-2)
        torch.manual_seed(0)
        model = build_model(cfg)
        loss, aux = model(ids, labels=labels, return_aux=True)
        (loss + aux["aux_loss"]).backward()
        out[kernels] = loss.detach(), aux["metric/z_loss"], {k: p.grad for k, p in model.named_parameters()}
    assert calls  # the triton model ran the kernel
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["triton"][1], out["torch"][1], rtol=1e-5, atol=1e-7)
    for k, g in out["torch"][2].items():
        torch.testing.assert_close(out["triton"][2][k], g, rtol=1e-4, atol=1e-6, msg=k)
