"""The exchanges of a sequence split (pretrain/models/sequence_split.py) against direct
computations on the whole sequence."""

from __future__ import annotations

import pytest
import torch

from pretrain.models.sequence_split import LocalSplit, load_balanced_segments


@pytest.mark.parametrize("cp,lb", [(2, False), (2, True), (4, True)])
def test_shard_and_gather_restore_the_sequence(cp, lb):
    split = LocalSplit.like(cp, lb)
    x = torch.randn(3, 16, 5)
    rows = split.shard(x)
    assert rows.shape == (3 * split.slots, 16 // split.n_segments, 5)
    torch.testing.assert_close(split.gather(rows), x, rtol=0, atol=0)
    pos = split.positions(rows.shape[0], rows.shape[1], x.device)
    torch.testing.assert_close(split.gather(pos[..., None])[..., 0], torch.arange(16).expand(3, 16))


def test_load_balanced_segments_pair_head_and_tail():
    assert [load_balanced_segments(4, r, True) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert load_balanced_segments(4, 2, False) == (2,)
    with pytest.raises(ValueError, match="rank 4"):
        load_balanced_segments(4, 4, True)


@pytest.mark.parametrize("n", [1, 3, 4, 7, 9])
def test_tails_are_the_tokens_before_each_segment(n):
    split = LocalSplit.like(2, True)  # 4 segments of 4 tokens, rows in order 0, 3, 1, 2
    x = torch.randn(2, 16, 3, requires_grad=True)
    tails = split.tails(split.shard(x), n)
    padded = torch.cat([x.new_zeros(2, n, 3), x], dim=1)
    expect = torch.stack([padded[:, g * 4 : g * 4 + n] for g in split.local], dim=1).flatten(0, 1)
    torch.testing.assert_close(tails, expect, rtol=0, atol=0)
    w = torch.randn_like(tails)
    (gx,) = torch.autograd.grad((tails * w).sum(), x)
    (ge,) = torch.autograd.grad((expect * w).sum(), x)
    torch.testing.assert_close(gx, ge)


def test_pass_states_equals_the_sequential_recurrence():
    """S_t = a_t * S_{t-1} + u_t over 16 tokens vs per-segment (total decay, final state from 0)
    combined across segments, with a decay of exactly 0 (a document start) in one segment."""
    torch.manual_seed(0)
    split = LocalSplit.like(2, True)
    a = torch.rand(2, 16, 3)
    a[1, 9] = 0.0
    u = torch.randn(2, 16, 3)
    states, s = [], torch.zeros(2, 3)
    for t in range(16):
        states.append(s)
        s = a[:, t] * s + u[:, t]
    ar, ur = split.shard(a), split.shard(u)
    decay, final = ar.prod(dim=1), torch.zeros(ar.shape[0], 3)
    for t in range(ar.shape[1]):
        final = ar[:, t] * final + ur[:, t]
    s_in = split.pass_states(decay, final)
    expect = torch.stack([states[g * 4] for g in split.local], dim=1).flatten(0, 1)
    torch.testing.assert_close(s_in, expect)


def test_relay_runs_segments_in_sequence_order():
    """Each segment's step gets the previous segment's state: here the running sum of the
    segment indices, so segment g sees 0 + 1 + ... + (g - 1)."""
    split = LocalSplit.like(2, True)
    seen = []

    def step(j, state):
        g = split.local[j]
        seen.append(g)
        prev = torch.zeros(2) if state is None else state[0]
        return prev.expand(3, 2).clone(), (prev + g,)

    out = split.relay(step, (torch.zeros(2),))
    assert seen == [0, 1, 2, 3]
    expect = torch.tensor([float(sum(range(g))) for g in split.local]).repeat(3)
    torch.testing.assert_close(out[:, 0], expect)
