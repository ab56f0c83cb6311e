"""The recurrent mixers (Mamba, Mamba-2, GLA and their SambaY memory variants read by a GMU)
under context parallelism: loss and every gradient of a model whose rows are the segments of a
:class:`~pretrain.models.sequence_split.LocalSplit` equal those of the same model on whole
sequences (float32, rel <= 1e-5). Documents start exactly at a segment boundary, one token
after one, inside the conv halo before one (the last d_conv - 1 tokens of a segment) and
mid-segment; without doc masking the sample is one stream that crosses every boundary."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import GLAConfig, Mamba2Config, MambaConfig, ModelConfig
from pretrain.models import build_model
from pretrain.models.sequence_split import LocalSplit
from tests.models.cp_reference import loss_and_grads, packed_positions

pytestmark = pytest.mark.usefixtures("one_thread")

T = 48
STARTS = [5, 12, 22, 37]  # row 1: 6, 13, 23, 38 (packed_positions shifts by the row)
PATTERNS = ["mamba", "mamba2", "gla", "mamba_mem gmu", "mamba2_mem gmu", "gla_mem gmu"]
SPLITS = {"cp2_balanced": (2, True), "cp2_contiguous": (2, False), "cp4_balanced": (4, True)}


def _model(pattern: str, doc_masking: bool, kernels: str = "auto"):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=61, d_model=32, n_layers=len(pattern.split()), layer_pattern=pattern, ffn_hidden=48,
        init_std=0.2, doc_masking=doc_masking, kernels=kernels,
        mamba=MambaConfig(d_state=4, d_conv=4, expand=2),
        # 4 heads in 2 groups; chunks of 8 do not divide the segments of 12 or 6
        mamba2=Mamba2Config(d_state=4, d_conv=4, expand=2, head_dim=16, n_groups=2, chunk_size=8),
        gla=GLAConfig(n_heads=2, chunk_size=8),
    )
    return build_model(cfg)


def max_rel_errors(
    pattern: str, split: LocalSplit, doc_masking: bool, kernels: str = "auto", dtype: torch.dtype = torch.float32
) -> tuple[float, dict[str, float]]:
    """Relative errors of the loss and of each parameter's gradient (max |diff| / max |ref|) of
    the model on ``split``'s rows against the model on whole sequences."""
    model = _model(pattern, doc_masking, kernels).to(dtype)
    gen = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, 61, (2, T), generator=gen), torch.randint(0, 61, (2, T), generator=gen)
    pos = packed_positions(2, T, STARTS) if doc_masking else None
    ref_loss, ref = loss_and_grads(model, ids, labels, pos)
    loss, grads = loss_and_grads(model, ids, labels, pos, split)
    assert grads.keys() == ref.keys()
    errs = {n: ((g - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30)).item() for n, g in grads.items()}
    return abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()), errs


@pytest.mark.parametrize("doc_masking", [True, False], ids=["docs", "stream"])
@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize("pattern", PATTERNS)
def test_recurrent_mixers_under_cp_equal_one_sequence(pattern, split, doc_masking):
    loss_err, grad_errs = max_rel_errors(pattern, LocalSplit.like(*SPLITS[split]), doc_masking)
    assert loss_err <= 1e-5, f"loss: relative error {loss_err:.2e}"
    bad = {n: f"{e:.2e}" for n, e in grad_errs.items() if e > 1e-5}
    assert not bad, f"relative gradient errors: {bad}"


@pytest.mark.parametrize(
    ("pattern", "exchange"),
    [(p, "pass_states") for p in ("mamba", "mamba2", "gla")] + [(p, "tails") for p in ("mamba", "mamba2")],
)
def test_without_an_exchange_the_split_differs(pattern, exchange, monkeypatch):
    """The checks above can fail: with no incoming states (every segment scanned from zero) or
    no conv halo (zeros before every segment) the results move well beyond the tolerance."""
    cut = {
        "pass_states": lambda self, decay, state: torch.zeros_like(state),
        "tails": lambda self, x, n: x.new_zeros(x.shape[0], n, *x.shape[2:]),
    }
    monkeypatch.setattr(LocalSplit, exchange, cut[exchange])
    loss_err, grad_errs = max_rel_errors(pattern, LocalSplit.like(2, True), True)
    assert max(loss_err, *grad_errs.values()) > 1e-3

@pytest.mark.parametrize("split", ["cp2_contiguous", "cp4_balanced"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_recurrent_mixers_under_cp_are_exact_in_float64(pattern, split):
    """The split is exact, not merely close: in float64 it agrees to 1e-10. (In float32 a
    gradient that is a cancelling sum, such as D's of a one-head Mamba-2, can differ by ~1e-5
    relative from rounding alone, in either run.)"""
    loss_err, grad_errs = max_rel_errors(pattern, LocalSplit.like(*SPLITS[split]), True, dtype=torch.float64)
    assert max(loss_err, *grad_errs.values()) <= 1e-10
