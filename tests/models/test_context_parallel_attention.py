"""Attention under context parallelism: the per-segment masks against :func:`attention_mask` at
the segment's global offset, the block-banded path with a halo against the dense masked SDPA,
the exchanges each layer makes (SambaY's cross layers gather nothing), and attention-only
SambaY-like models on :class:`LocalSplit` rows against whole sequences."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pretrain.models.context as context
from pretrain.models import build_model
from pretrain.models.context import BandedMask, attention_mask, band_blocks, halo_mask
from pretrain.models.layers.attention import banded_sdpa
from pretrain.models.sequence_split import LocalSplit
from tests.models.cp_reference import loss_and_grads, packed_positions
from tests.models.test_context_parallel_models import T, _cfg, _check

pytestmark = pytest.mark.usefixtures("one_thread")

ATTENTION_ONLY = ["swa attn_kv xattn", "diff_swa diff_attn_kv diff_xattn", "swa attn", "diff_attn diff_swa"]


def _global_positions(split: LocalSplit, doc_masking: bool, starts: list[int]) -> torch.Tensor:
    """Rows ``[2 * slots, T / n_segments]`` of the positions build_context gives under CP."""
    pos = packed_positions(2, T, starts) if doc_masking else torch.arange(T).expand(2, T)
    return split.shard(pos)


@pytest.mark.parametrize("doc_masking", [True, False])
@pytest.mark.parametrize("window", [1, 4, 14])
def test_halo_mask_is_attention_mask_at_the_segment_offset(doc_masking, window):
    """Slot j's halo mask = attention_mask(offset = its first token), left-padded with False
    where fewer than window - 1 tokens precede the segment (segments of 6: a window of 14
    reaches three segments back)."""
    split = LocalSplit.like(4, True)
    pos = _global_positions(split, doc_masking, [6, 20])
    got = halo_mask(pos, window)  # [B * slots, 1, 6, window - 1 + 6]
    for j, s in enumerate(split.starts(6).tolist()):
        want = attention_mask(split.slot(pos, j), s, window, doc_masking)
        have = split.slot(got, j)
        cut = have.shape[-1] - want.shape[-1]
        assert not have[..., :cut].any()
        assert torch.equal(have[..., cut:], want)


@pytest.mark.parametrize("window", [3, 4])
def test_banded_with_halo_equals_dense_masked_sdpa(window, rel_err):
    """Rows of 13 queries (not a multiple of the window) with their window - 1 halo keys: the
    block-banded path equals SDPA with the dense halo mask, outputs and every gradient. Row 0
    starts the sequence (its halo lies before it), row 1 continues a document from its halo,
    row 2 starts a document at its third token."""
    torch.manual_seed(0)
    b, t, h, h_kv, d = 3, 13, 4, 2, 8
    pos = torch.stack([
        torch.arange(t),  # global index 0..12
        torch.arange(t) + 20,  # a document begun 20 tokens earlier
        torch.cat([torch.arange(40, 42), torch.arange(t - 2)]),
    ])
    q = torch.randn(b, t, h, d, requires_grad=True)
    k = torch.randn(b, window - 1 + t, h_kv, d, requires_grad=True)
    v = torch.randn(b, window - 1 + t, h_kv, d, requires_grad=True)
    band = BandedMask(window, band_blocks(pos, window, True, halo=True), halo=True)
    got = banded_sdpa(q, k, v, band)
    want = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=halo_mask(pos, window), enable_gqa=True
    ).transpose(1, 2)
    assert rel_err(got, want) <= 1e-6
    g = torch.randn_like(want)
    for a, w in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        assert rel_err(a, w) <= 1e-6
    n_blocks = -(-t // window)
    assert band.blocks.shape == (b, n_blocks, window, 2 * window - 1)  # O(t * window), never t x t


def test_banded_sdpa_rejects_keys_that_do_not_fit_the_mask():
    pos = torch.arange(9)[None]
    q = k = torch.zeros(1, 9, 2, 4)
    with pytest.raises(ValueError, match="keys for 9 queries"):
        banded_sdpa(q, k, k, BandedMask(3, band_blocks(pos, 3, True, halo=True), halo=True))


class _CountingSplit(LocalSplit):
    """LocalSplit counting whole-sequence gathers and halo exchanges."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.calls = {"gather": 0, "tails": 0}

    def gather(self, x):
        self.calls["gather"] += 1
        return super().gather(x)

    def tails(self, x, n):
        self.calls["tails"] += 1
        return super().tails(x, n)


@pytest.mark.parametrize(
    "pattern, gathers, tails",
    [("swa attn_kv xattn xattn", 1, 1), ("attn attn swa", 2, 1), ("diff_swa diff_attn_kv diff_xattn", 1, 1)],
)
def test_exchanges_per_forward(monkeypatch, pattern, gathers, tails):
    """One gather per full-attention layer (the cross layers reuse the shared one), one halo
    per window layer, and the masks built once per forward: one attention_mask per slot, not
    per layer."""
    built = []
    monkeypatch.setattr(context, "attention_mask", lambda *a: built.append(a[1]) or attention_mask(*a))
    split = _CountingSplit(4, (0, 3, 1, 2))
    model = build_model(_cfg(pattern, True, 5))
    ids = torch.randint(0, 61, (2, T))
    loss_and_grads(model, ids, ids, packed_positions(2, T, [5, 12, 30]), split)
    assert split.calls == {"gather": gathers, "tails": tails}
    assert sorted(built) == [0, 12, 24, 36]


@pytest.mark.parametrize("pattern", ATTENTION_ONLY)
@pytest.mark.parametrize(
    "split, doc_masking, window",
    [
        (LocalSplit.like(2, True), True, 5),  # segments of 12 > 2 x 5: block-banded with a halo
        (LocalSplit.like(2, False), False, 5),  # one causal stream, contiguous segments
        (LocalSplit.like(4, True), True, 14),  # segments of 6: a halo over three segments, dense
        (LocalSplit.like(2, False), True, 3),  # banded, doc masking, contiguous segments
    ],
    ids=["cp2_lb_banded", "cp2_contiguous", "cp4_wide_window", "cp2_contiguous_banded"],
)
def test_attention_models_equal_one_sequence(pattern, split, doc_masking, window):
    """Loss and every gradient on LocalSplit rows == whole sequences (rel <= 1e-5)."""
    _check(pattern, split, doc_masking=doc_masking, window=window, starts=(5, 12, 30))


@pytest.mark.parametrize("window", [1, 2])
def test_windows_of_one_and_two_tokens(window):
    """No halo (a window of one) and a one-token halo, block-banded over segments of 6 (the
    differential layers are left out: with one or two visible keys their lambda gradient is
    nearly zero, as the per-head RMSNorm cancels lambda's scale, and so its relative error is
    noise)."""
    _check("swa attn_kv xattn", LocalSplit.like(4, True), window=window, starts=(6, 20))
