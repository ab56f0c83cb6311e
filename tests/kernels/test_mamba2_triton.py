"""A whole tiny Mamba-2 model on the Triton SSD kernels (model.kernels='triton', under the
interpreter) against the same model on the PyTorch path: packed documents (resets from the
position ids), logits and every parameter gradient, and token-by-token decoding through the
Triton step kernel."""

from __future__ import annotations

import pytest
import torch

import kernels.ssd.chunk as ssd_chunk
from kernels.dispatch import ENV_VAR
from pretrain.config import Mamba2Config
from pretrain.models import build_model
from tests.models.conftest import _make_cfg
from tests.models.util import decode


@pytest.fixture(autouse=True)
def interpreted(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ssd_chunk, "POISON_OUTPUTS", True)
    monkeypatch.setattr(ssd_chunk, "CHUNK", 16)


def _model(kernels: str):
    """Two Mamba-2 blocks, 4 heads of 16 channels in 2 groups, N = 8; the PyTorch path's chunk
    (4) differs from the kernel's (16), so the two paths share no chunking."""
    mamba2 = Mamba2Config(d_state=8, head_dim=16, n_groups=2, chunk_size=4)
    cfg = _make_cfg("mamba2 mamba2", kernels=kernels, mamba2=mamba2)
    torch.manual_seed(0)
    return build_model(cfg), cfg


def test_mamba2_on_triton_kernels_equals_the_torch_path():
    ids = torch.randint(0, 61, (2, 19), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(6), torch.arange(13)]).expand(2, 19)  # two documents per row
    out = {}
    for kernels in ("torch", "triton"):
        model, _ = _model(kernels)
        logits = model(ids, position_ids=pos)
        logits.square().mean().backward()
        out[kernels] = logits.detach(), {k: p.grad for k, p in model.named_parameters()}
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-4, atol=1e-5)
    assert out["torch"][1].keys() == out["triton"][1].keys()
    for k, g in out["torch"][1].items():
        assert g is not None, k
        torch.testing.assert_close(out["triton"][1][k], g, rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_mamba2_decoding_on_triton_kernels():
    """Prefill through the Triton chunk kernel, then single tokens through the Triton step
    kernel: the logits of the whole sequence on the PyTorch path."""
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model, _ = _model("triton")
        stepped = decode(model, ids, [4, 1, 1, 1])
        reference, _ = _model("torch")
        whole = reference(ids)
    torch.testing.assert_close(stepped, whole, rtol=1e-4, atol=1e-5)
