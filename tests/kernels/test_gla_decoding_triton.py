"""The GLA model decodes on the Triton kernels: with ``model.kernels = "triton"`` a cached
decode (one token at a time through the fused recurrent kernel, prefills of several tokens
through the chunk kernel, documents restarting mid-row) gives the logits of one full forward on
the PyTorch path, as tests/models/test_gla.py's decoding-parity test does for PyTorch. Runs
under TRITON_INTERPRET=1 (tests/conftest.py)."""

from __future__ import annotations

import os

import pytest
import torch

import kernels.gla.chunk as gla_chunk
import kernels.gla.fused_recurrent as gla_recurrent
from pretrain.config import GLAConfig
from pretrain.models import build_model
from tests.models.conftest import _make_cfg, _rel_err
from tests.models.util import decode

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
T = 9
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    if not INTERPRET and not torch.cuda.is_available():
        pytest.fail("TRITON_INTERPRET=0 needs CUDA; the kernel tests run under the interpreter on CPU")
    monkeypatch.setattr(gla_chunk, "POISON_OUTPUTS", True)


def test_triton_decoding_equals_torch_full_forward(monkeypatch):
    calls = []
    kernel = gla_recurrent.fused_recurrent_gla
    monkeypatch.setattr(gla_recurrent, "fused_recurrent_gla", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    cfg = _make_cfg("gla", gla=GLAConfig(n_heads=2, chunk_size=4, gate_normalizer=4.0), init_std=0.2, kernels="triton")
    torch.manual_seed(0)
    model = build_model(cfg).to(DEVICE)
    ids = torch.randint(0, cfg.vocab_size, (2, T), device=DEVICE)
    positions = torch.stack([torch.cat([torch.arange(4), torch.arange(5)]), torch.arange(T)]).to(DEVICE)
    with torch.no_grad():
        model.blocks["0"].mixer.kernels = "torch"
        full = {pos is None: model(ids, pos) for pos in (None, positions)}
        model.blocks["0"].mixer.kernels = "triton"
        for pos in (None, positions):
            for chunks in ([1] * T, [3, 1, 4, 1]):
                got = decode(model, ids, chunks, pos)
                assert _rel_err(got, full[pos is None]) <= 1e-4, (pos is None, chunks)
    assert len(calls) == 2 * (T + 2)  # every single-token step ran the Triton recurrent kernel
