"""Ring attention (parallel.cp_attention = 'ring') in one process: the split's blockwise
attention against dense SDPA over whole sequences, and models whose full attention rings
against the all-gather path and against whole sequences (the harness of
tests/models/test_context_parallel_models.py). The distributed ring is compared with this in
tests/distributed/test_context_parallel.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.models.context import attention_mask
from pretrain.models.ring_attention import block_backward, block_forward, block_mask, merge
from pretrain.models.sequence_split import LocalSplit
from tests.models.cp_reference import loss_and_grads, packed_positions
from tests.models.test_context_parallel_models import assert_grads_match, model_and_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def _ring_split(cp: int, load_balance: bool) -> LocalSplit:
    split = LocalSplit.like(cp, load_balance)
    split.ring = True
    return split


@pytest.mark.parametrize("cp, load_balance, doc_masking", [(2, True, True), (3, False, True), (4, True, False)])
def test_ring_attention_equals_dense_attention(cp, load_balance, doc_masking):
    """Outputs and q/k/v gradients of ``ring_attention`` on the split's rows equal SDPA with the
    whole sequences' causal (document) mask, float64: GQA (4 query heads on 2 KV heads) and
    values twice as wide as the keys (differential attention's), documents that start inside
    segments and at a segment's first token (rows whose queries see nothing of a block)."""
    b, t, h, h_kv, d = 2, 48, 4, 2, 8
    split = _ring_split(cp, load_balance)
    s = split.seg_len(t)
    g = torch.Generator().manual_seed(cp)
    q = torch.randn(b, t, h, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, t, h_kv, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, t, h_kv, 2 * d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(b, t, h, 2 * d, generator=g, dtype=torch.float64)
    pos = packed_positions(b, t, [5, s, 30])
    mask = attention_mask(pos, 0, None, doc_masking)  # [B, 1, T, T]
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, enable_gqa=True).transpose(1, 2)
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    index = split.positions(b * split.slots, s, torch.device("cpu"))
    doc_start = index - split.shard(pos) if doc_masking else None
    rows = split.ring_attention(split.shard(q), split.shard(k), split.shard(v), doc_start)
    out = split.gather(rows)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_block_of_unseen_keys_adds_nothing():
    """A block none of whose keys a query may see has a log-sum-exp that weighs it to exactly 0
    in the merge, and finite gradients (no -inf - -inf)."""
    q = torch.randn(1, 3, 2, 4, requires_grad=True)
    k, v = torch.randn(1, 3, 1, 4), torch.randn(1, 3, 1, 4)
    seen, seen_lse = block_forward(q, k, v, None)
    out, lse = block_forward(q, k, v, torch.zeros(1, 1, 1, 3, 3, dtype=torch.bool))
    merged, merged_lse = merge(seen, seen_lse, out, lse)
    assert torch.equal(merged, seen) and torch.equal(merged_lse, seen_lse)
    merged.sum().backward()
    want = torch.autograd.grad(block_forward(q, k, v, None)[0].sum(), q)[0]
    assert torch.isfinite(q.grad).all()
    torch.testing.assert_close(q.grad, want)


def test_block_math_stays_float32_under_autocast():
    """Under bfloat16 autocast (the trainer's on CUDA; the CPU's here) the block's scores,
    output and log-sum-exp are computed in float32 from the bfloat16 inputs: the same as
    without autocast, where a bfloat16 matmul would round them to 8 bits."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, n, 32, generator=g).bfloat16() for n in (4, 2, 2))
    mask = block_mask(0, 0, 16, None, q.device)
    want = block_forward(q, k, v, mask)
    lse = want[1]
    grad_out, delta = torch.randn(want[0].shape, generator=g), torch.randn(lse.shape, generator=g)
    want_grads = block_backward(q, k, v, mask, lse, grad_out, delta)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = block_forward(q, k, v, mask)
        got_grads = block_backward(q, k, v, mask, lse, grad_out, delta)
    for a, b in zip((*got, *got_grads), (*want, *want_grads)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


RING_CASES = {  # name -> (cp, load balance, model keywords)
    "cp2": (2, True, {}),
    "cp2_contiguous": (2, False, {"doc_masking": False}),
    "cp4": (4, True, {"window": 14, "starts": (6, 20)}),
}


@pytest.mark.parametrize("case", sorted(RING_CASES))
@pytest.mark.parametrize("family", ["llama", "swa", "sambay", "diff", "sambay_da_mamba2"])
def test_ring_equals_allgather_and_one_sequence(family, case):
    """A model whose full attention (and SambaY's cross-attention, on the shared local
    keys/values) rings gives the loss and every gradient of the same model on whole sequences
    and of its all-gather run (float32, rel <= 1e-5; the float64 rule of assert_grads_match)."""
    cp, lb, kw = RING_CASES[case]
    model, ids, labels, pos = model_and_batch(family, **kw)
    ref_loss, ref = loss_and_grads(model, ids, labels, pos)
    gathered_loss, gathered = loss_and_grads(model, ids, labels, pos, LocalSplit.like(cp, lb))
    loss, grads = loss_and_grads(model, ids, labels, pos, _ring_split(cp, lb))
    model.double()
    exact = loss_and_grads(model, ids, labels, pos)[1]
    exact_split = loss_and_grads(model, ids, labels, pos, _ring_split(cp, lb))[1]
    for want_loss, want, what in ((ref_loss, ref, "whole sequences"), (gathered_loss, gathered, "all-gather")):
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0, msg=f"loss vs {what}")
        assert_grads_match(grads, want, exact, exact_split, f"vs {what}: ")
