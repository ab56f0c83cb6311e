"""Context parallelism on the Triton path (model.kernels='triton', under the interpreter): each
segment runs the same Triton scans from a zero state with their final states, the state-passing
correction is PyTorch, and the model on LocalSplit rows equals the model on whole sequences
(Triton both). Spies fail a silent fallback to the PyTorch scans."""

from __future__ import annotations

import pytest

import kernels.gla.chunk as gla_chunk
import kernels.selective_scan.chunk as scan_chunk
import kernels.ssd.chunk as ssd_chunk
from kernels.dispatch import ENV_VAR
from pretrain.models.sequence_split import LocalSplit
from tests.models.test_context_parallel_recurrent import max_rel_errors

pytestmark = pytest.mark.usefixtures("one_thread")

ENTRY = {
    "mamba": (scan_chunk, "selective_scan_triton"),
    "mamba2": (ssd_chunk, "ssd_chunked_triton"),
    "gla": (gla_chunk, "chunk_gla_triton"),
}
# fp32 Triton backward sums reorder differently per split: A_log's gradient (a sum over every
# token and head) differs by ~1e-5 relative between the two runs while each is ~5e-6 from an fp64
# reference; without state passing the errors are ~1
TOL = 5e-5


@pytest.mark.parametrize("pattern", sorted(ENTRY))
def test_triton_scans_under_cp_equal_one_sequence(pattern, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    module, name = ENTRY[pattern]
    calls = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    loss_err, grad_errs = max_rel_errors(pattern, LocalSplit.like(2, True), True, kernels="triton")
    assert len(calls) == 2  # the whole-sequence run and the split run
    assert loss_err <= 1e-5, f"loss: relative error {loss_err:.2e}"
    bad = {n: f"{e:.2e}" for n, e in grad_errs.items() if e > TOL}
    assert not bad, f"relative gradient errors: {bad}"
