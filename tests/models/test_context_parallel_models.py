"""Every mixer under context parallelism, in one process: a model whose rows are the segments of
a :class:`~pretrain.models.sequence_split.LocalSplit` gives the loss and every gradient of the
same model on whole sequences (float32, rel <= 1e-5), with packed documents that straddle the
segment boundaries and one that starts exactly at one. The distributed split is compared with
this reference in tests/distributed/test_context_parallel.py."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import AttentionConfig, GLAConfig, MambaConfig, ModelConfig, MoEConfig, TitansConfig
from pretrain.models import build_model
from pretrain.models.sambay import sambay_pattern
from pretrain.models.sequence_split import LocalSplit
from tests.models.cp_reference import loss_and_grads, packed_positions

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 64  # even: the vocabulary-parallel head splits it over tp 2
T = 48  # 4 segments of 12 at cp 2 with load balancing, 8 of 6 at cp 4
FAMILIES = {
    "llama": "attn",
    "swa": "swa attn",
    "mamba": "mamba swa",
    "mamba2": "mamba2",
    "gla": "gla",
    "sambay": " ".join(sambay_pattern(6)),
    "sambay_gla": " ".join(sambay_pattern(6, "sambay", "gla")),
    "sambay_da_mamba2": " ".join(sambay_pattern(6, "sambay_da", "mamba2")),
    "yoco_gla": " ".join(sambay_pattern(6, "yoco", "gla")),
    "diff": "diff_attn diff_swa",
    "titans": "mac mag mal",
    "rmoe": "attn:moe_gru mamba:moe_gru swa:moe",
}


def _cfg(pattern: str, doc_masking: bool, window: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=VOCAB, d_model=32, n_layers=len(pattern.split()), layer_pattern=pattern, ffn_hidden=48,
        init_std=0.2, doc_masking=doc_masking,
        attention=AttentionConfig(n_heads=4, n_kv_heads=2, window=window),
        mamba=MambaConfig(d_state=4, d_conv=4, expand=2),
        gla=GLAConfig(n_heads=2, chunk_size=8),
        titans=TitansConfig(n_heads=2, memory_depth=2, memory_expand=2, chunk_size=3, segment_size=6, n_persistent=3),
        moe=MoEConfig(n_experts=4, top_k=2, aux_loss_coef=0.1),
    )


def model_and_batch(family: str, doc_masking: bool = True, window: int = 5, starts=(5, 12, 30)):
    """The model of ``family`` (a name of :data:`FAMILIES`, or a layer pattern; seeded) and a
    batch of 2 rows of T tokens: ids, labels and the position ids of packed documents starting
    at ``starts`` (None without doc masking)."""
    torch.manual_seed(0)
    model = build_model(_cfg(FAMILIES.get(family, family), doc_masking, window))
    ids = torch.randint(0, VOCAB, (2, T))
    labels = torch.randint(0, VOCAB, (2, T))
    pos = packed_positions(2, T, list(starts)) if doc_masking else None
    return model, ids, labels, pos


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def assert_grads_match(grads: dict, ref: dict, exact: dict, exact_split: dict, what: str = "") -> None:
    """Every gradient within rel 1e-5 of the one-process ``ref``. A gradient that is a sum
    which mostly cancels (Mamba-2's D of one head: its float32 rounding follows the order of
    the terms, which the split changes) may differ more from ``ref``, if the split computes it
    exactly (float64: ``exact_split`` within 1e-9 of the one-process ``exact``) and its float32
    error is within 1e-5 of its block's largest gradient (the scale of the terms it sums)."""
    assert grads.keys() == ref.keys()
    for name, g in grads.items():
        err = _rel(g, ref[name])
        if err <= 1e-5:
            continue
        block = name.split(".mixer.")[0].split(".ffn.")[0]
        scale = max(v.abs().max().item() for k, v in exact.items() if k.startswith(block + "."))
        assert _rel(exact_split[name], exact[name]) <= 1e-9, f"{what}{name}: float64 error"
        absolute = (g.double() - exact[name]).abs().max().item()
        assert absolute <= 1e-5 * scale, f"{what}{name}: error {err:.2e}, {absolute / scale:.2e} of its block's scale"


def _check(family, split, **kw):
    model, ids, labels, pos = model_and_batch(family, **kw)
    ref_loss, ref = loss_and_grads(model, ids, labels, pos)
    loss, grads = loss_and_grads(model, ids, labels, pos, split)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    model.double()
    assert_grads_match(grads, ref, loss_and_grads(model, ids, labels, pos)[1],
                       loss_and_grads(model, ids, labels, pos, split)[1])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cp2_load_balanced_equals_one_sequence(family):
    """cp 2 with the head-tail split (4 segments of 12, rows 0, 3, 1, 2); documents start at
    5, 12 (a segment boundary), 30 (and shifted by one in the second row)."""
    _check(family, LocalSplit.like(2, True))


@pytest.mark.parametrize("family", ["sambay", "gla", "titans", "mamba2"])
def test_cp2_contiguous_without_doc_masking(family):
    """cp 2 without load balancing and one causal stream per row (global positions)."""
    _check(family, LocalSplit.like(2, False), doc_masking=False)


@pytest.mark.parametrize("family", ["sambay", "mamba"])
def test_cp4_window_longer_than_a_segment(family):
    """cp 4 (8 segments of 6 tokens) with a window of 14: a halo spans three segments."""
    _check(family, LocalSplit.like(4, True), window=14, starts=(6, 20))
