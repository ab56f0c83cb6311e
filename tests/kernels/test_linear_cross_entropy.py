"""The chunked linear + cross-entropy against the unfused specification (F.linear then
F.cross_entropy, autograd for the gradients): the loss and the gradients of the hidden states
and the weight, with ignored labels, the z-loss, every chunking (one token per block, blocks that
do not divide the tokens, one block), and a vocabulary split over ranks (simulated by threads
that meet in the all-reduce) equal to the whole vocabulary on one rank."""

from __future__ import annotations

import threading

import pytest
import torch

from kernels.linear_cross_entropy import linear_cross_entropy
from kernels.linear_cross_entropy.chunk_torch import auto_chunk_size
from kernels.linear_cross_entropy.naive import naive_linear_cross_entropy


def _inputs(n=29, d=12, v=40, dtype=torch.float64, seed=0, ignored=(3, 17)):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, d, generator=gen) * 2).to(dtype).requires_grad_()
    weight = torch.randn(v, d, generator=gen).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[list(ignored)] = -100
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight, labels, **kw):
    loss = fn(hidden, weight, labels, **kw)
    grads = torch.autograd.grad(loss * 1.7, (hidden, weight))  # a non-unit incoming gradient
    return loss.detach(), grads


@pytest.mark.parametrize("chunk_size", [1, 5, 29, 64, None])
@pytest.mark.parametrize("z_loss_coef", [0.0, 1e-2])
def test_matches_unfused_fp64(chunk_size, z_loss_coef):
    args = _inputs()
    want, want_g = _loss_and_grads(naive_linear_cross_entropy, *args, z_loss_coef=z_loss_coef)
    got, got_g = _loss_and_grads(linear_cross_entropy, *args, z_loss_coef=z_loss_coef, chunk_size=chunk_size)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_low_precision_matches_unfused(dtype, tol):
    """Measured: fp32 loss 1e-6 relative, gradients 1e-7; bf16 gradients one bf16 ulp (the
    weight's are accumulated over blocks in fp32 instead of one bf16 matmul)."""
    args = _inputs(n=64, d=32, v=96, dtype=dtype)
    want, want_g = _loss_and_grads(naive_linear_cross_entropy, *args, z_loss_coef=1e-3)
    got, got_g = _loss_and_grads(linear_cross_entropy, *args, z_loss_coef=1e-3, chunk_size=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for a, b in zip(got_g, want_g):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * b.abs().max().item())


def test_extreme_logits_stay_finite():
    """Token 0's label logit 1000 below its row's max, in fp32: exp(-1000) underflows to 0, the
    loss must stay finite (it is read from the logit, not from the log of its exponential)."""
    hidden, weight, labels = _inputs(ignored=(), dtype=torch.float32)
    with torch.no_grad():
        u = hidden[0] / hidden[0].norm().square()  # hidden[0] . u = 1
        weight[labels[0]] = -500 * u
        weight[(labels[0] + 1) % weight.shape[0]] = 500 * u
    want, want_g = _loss_and_grads(naive_linear_cross_entropy, hidden, weight, labels)
    got, got_g = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, chunk_size=4)
    assert torch.isfinite(got) and want > 1000 / len(labels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_every_label_ignored_is_nan_like_cross_entropy():
    hidden, weight, labels = _inputs()
    labels[:] = -100
    assert torch.isnan(linear_cross_entropy(hidden, weight, labels))
    assert torch.isnan(naive_linear_cross_entropy(hidden, weight, labels))


def test_batch_shaped_inputs_and_frozen_weight():
    hidden, weight, labels = _inputs(n=24)
    weight.requires_grad_(False)
    want = naive_linear_cross_entropy(hidden, weight, labels)
    (want_dh,) = torch.autograd.grad(want, hidden)
    got = linear_cross_entropy(hidden.view(4, 6, -1), weight, labels.view(4, 6), chunk_size=5)
    (got_dh,) = torch.autograd.grad(got, hidden)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_dh, want_dh)


class _ThreadGroup:
    """An all-reduce among threads: each contributes, waits for all, and reads the reduction."""

    def __init__(self, size: int) -> None:
        self.size, self.barrier, self.slots = size, threading.Barrier(size), [None] * size

    def member(self, rank: int):
        def all_reduce(x: torch.Tensor, op: str) -> torch.Tensor:
            self.slots[rank] = x.clone()
            self.barrier.wait()
            stacked = torch.stack(self.slots)
            out = stacked.amax(0) if op == "max" else stacked.sum(0)
            self.barrier.wait()  # nobody overwrites a slot before every rank has read them
            return out

        return all_reduce


@pytest.mark.parametrize("z_loss_coef", [0.0, 1e-2])
def test_vocabulary_parallel_equals_one_rank(z_loss_coef):
    """Three ranks with uneven vocabulary rows (14 + 13 + 13): the replicated loss, each rank's
    weight rows' gradient, and the sum of the hidden-state partial gradients equal one rank."""
    hidden, weight, labels = _inputs()
    want, (want_dh, want_dw) = _loss_and_grads(naive_linear_cross_entropy, hidden, weight, labels, z_loss_coef=z_loss_coef)
    bounds = [0, 14, 27, 40]
    group, results = _ThreadGroup(3), [None] * 3

    def run(rank: int) -> None:
        rows = slice(bounds[rank], bounds[rank + 1])
        w = weight.detach()[rows].clone().requires_grad_()
        h = hidden.detach().clone().requires_grad_()
        kw = dict(z_loss_coef=z_loss_coef, chunk_size=7, vocab_start=bounds[rank], all_reduce=group.member(rank))
        results[rank] = _loss_and_grads(linear_cross_entropy, h, w, labels, **kw)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for loss, _ in results:
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(g[0] for _, g in results), want_dh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([g[1] for _, g in results]), want_dw, rtol=1e-10, atol=1e-12)


def test_auto_chunk_keeps_the_logits_block_small():
    # 16k tokens of width 1024 against a 32k vocabulary: blocks of 512 tokens, 1/32 of the logits
    assert auto_chunk_size(16384, 1024, 32768) == 512
    assert auto_chunk_size(10, 8, 50) == 10  # tiny inputs: one block


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda h, w, y: (h, w[:, :-1], y), "weight"),
        (lambda h, w, y: (h, w, y.float()), "labels"),
        (lambda h, w, y: (h, w, y[:-1]), "labels"),
        (lambda h, w, y: (h.long(), w, y), "hidden must be floating point"),
    ],
)
def test_bad_inputs_raise(change, match):
    with pytest.raises(ValueError, match=match):
        linear_cross_entropy(*change(*_inputs()))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(*_inputs(), chunk_size=0)
