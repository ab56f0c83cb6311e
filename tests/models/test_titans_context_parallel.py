"""Titans (MAC, MAG, MAL) under context parallelism, one mixer at a time: a model whose rows are
the segments of a :class:`~pretrain.models.sequence_split.LocalSplit` gives the loss and every
gradient of the same model on whole sequences (float32, rel <= 1e-5). The memory is relayed
segment to segment, MAG/MAL's windows take a halo, and MAC carries its unfinished segment
across the split, so memory chunks, MAC segments and windows that straddle the split's
segments, and documents that start inside one or exactly at one, must all come out exact."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import AttentionConfig, ModelConfig, MoEConfig, TitansConfig
from pretrain.models import build_model
from pretrain.models.sequence_split import LocalSplit
from tests.models.cp_reference import loss_and_grads, packed_positions

pytestmark = pytest.mark.usefixtures("one_thread")

T = 48  # 2 segments of 24 (cp 2), 4 of 12 (cp 2 load-balanced), 8 of 6 (cp 4 load-balanced)


def _check(pattern, split, doc_masking, window=5, starts=(5, 12, 30), moe=None, dtype=torch.float32, tol=1e-5,
           seq=T, **titans):
    titans = dict(n_heads=2, memory_depth=2, memory_expand=2, chunk_size=3, segment_size=6, n_persistent=3) | titans
    cfg = ModelConfig(
        vocab_size=61, d_model=32, n_layers=len(pattern.split()), layer_pattern=pattern, ffn_hidden=48,
        init_std=0.2, doc_masking=doc_masking, attention=AttentionConfig(n_heads=4, window=window),
        titans=TitansConfig(**titans), moe=moe or MoEConfig(n_experts=4, top_k=2, aux_loss_coef=0.1),
    )
    torch.manual_seed(0)
    model = build_model(cfg).to(dtype)
    ids = torch.randint(0, 61, (2, seq))
    labels = torch.randint(0, 61, (2, seq))
    pos = packed_positions(2, seq, list(starts)) if doc_masking else None
    ref_loss, ref = loss_and_grads(model, ids, labels, pos)
    loss, grads = loss_and_grads(model, ids, labels, pos, split)
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=0)
    assert grads.keys() == ref.keys()
    for name, g in grads.items():
        err = ((g - ref[name]).abs().max() / ref[name].abs().max().clamp_min(1e-30)).item()
        assert err <= tol, f"{name}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("doc_masking", [True, False])
@pytest.mark.parametrize("cp,load_balance", [(2, True), (2, False), (4, True)])
@pytest.mark.parametrize("mixer", ["mac", "mag", "mal"])
def test_titans_mixer_equals_one_sequence(mixer, cp, load_balance, doc_masking):
    """Documents start at 5, 12, 30 (+1 in row 1): inside segments and at a segment start."""
    _check(f"{mixer} {mixer}", LocalSplit.like(cp, load_balance), doc_masking)


@pytest.mark.parametrize("mixer", ["mac", "mag", "mal"])
def test_chunks_segments_and_windows_that_do_not_divide_the_split(mixer):
    """Segments of 6 tokens (cp 4) against a MAC segment of 5, memory chunks of 7 and a window
    of 14 whose halo spans three segments: nothing needs to divide anything."""
    _check(mixer, LocalSplit.like(4, True), True, window=14, starts=(6, 20), chunk_size=7, segment_size=5)


@pytest.mark.parametrize("mixer", ["mac", "mag", "mal"])
def test_segments_shorter_than_the_conv_history_and_the_window(mixer):
    """cp 4 over 16 tokens: segments of 2 tokens, a conv of 5 taps and a window of 7 take their
    halos from several segments back; a window of 1 takes none."""
    split = LocalSplit.like(4, True)
    _check(mixer, split, True, window=7, starts=(3, 8), seq=16, conv_size=5, chunk_size=3, segment_size=4)
    _check(mixer, split, False, window=1, seq=16, conv_size=5, chunk_size=3, segment_size=4)


@pytest.mark.parametrize("doc_masking", [True, False])
def test_mac_without_output_gate_and_linear_memory(doc_masking):
    """MAC 'none' (write gates from x) with a depth-1 memory, and MAG with it, in float64: the
    forgetting gate's gradient of a linear memory is ill-conditioned in float32 (one process in
    float32 is already 5e-5 off float64 in ``alpha_proj.bias``), so fp32 could not tell a
    split's rounding from an error."""
    _check("mac mag", LocalSplit.like(2, True), doc_masking, dtype=torch.float64, tol=1e-10, mac_output="none",
           memory_depth=1)


@pytest.mark.parametrize("balance", ["per_layer", "global"])
def test_moe_and_rmoe_after_titans_mixers(balance):
    """The 'rmoe' FFNs (GRU router across layers, balance loss and router z-loss) behind mixers
    that are exact under the split: the MoE statistics are those of the whole sequences."""
    moe = MoEConfig(n_experts=4, top_k=2, aux_loss_coef=0.1, z_loss_coef=0.01, balance=balance)
    _check("mag:moe_gru mal:moe mac:moe_gru", LocalSplit.like(2, True), True, moe=moe)
