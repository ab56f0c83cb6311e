"""Whole tiny Mamba, Mamba-2 and Titans (MAC) models with their short conv on the Triton kernels
(model.kernels='triton', under the interpreter) against the same models on the PyTorch path:
packed documents, logits and every parameter gradient, and decoding token by token (Mamba and
Mamba-2 through the Triton update kernel) against one forward. The recurrences (selective scan,
SSD, Titans memory) are pinned to PyTorch here, so a difference can only come from the conv; the
whole-model runs with every kernel are test_mamba2_triton.py, test_selective_scan_recurrent.py and
test_titans_model_triton.py. Spies on the conv's Triton entry points fail a silent fallback."""

from __future__ import annotations

import pytest
import torch

import kernels.selective_scan
import kernels.short_conv.chunk as conv_chunk
import kernels.short_conv.recurrent as conv_recurrent
import kernels.rmsnorm
import kernels.ssd
import kernels.swiglu
import kernels.titans
from kernels.dispatch import ENV_VAR
from pretrain.config import Mamba2Config, load_config
from pretrain.models import build_model
from tests.models.conftest import _make_cfg
from tests.models.util import decode

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend


@pytest.fixture
def calls(monkeypatch):
    """Every other op (recurrences, norms, gating) on PyTorch; counts of the conv's Triton calls,
    its outputs NaN-poisoned."""
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for mod in (kernels.selective_scan, kernels.ssd, kernels.titans, kernels.rmsnorm, kernels.swiglu):
        monkeypatch.setattr(mod, "select", lambda *a: "torch")
    monkeypatch.setattr(conv_chunk, "POISON_OUTPUTS", True)
    monkeypatch.setattr(conv_chunk, "BLOCK_T", 8)
    monkeypatch.setattr(conv_chunk, "BLOCK_C", 16)
    counts = {"chunk": 0, "update": 0}
    chunk, update = conv_chunk.causal_conv1d_triton, conv_recurrent.causal_conv1d_update_triton

    def spy_chunk(*a):
        counts["chunk"] += 1
        return chunk(*a)

    def spy_update(*a):
        counts["update"] += 1
        return update(*a)

    monkeypatch.setattr(conv_chunk, "causal_conv1d_triton", spy_chunk)
    monkeypatch.setattr(conv_recurrent, "causal_conv1d_update_triton", spy_update)
    return counts


def _model(family: str, kernels: str):
    if family == "mamba":  # d_conv 4, 64 inner channels
        cfg = _make_cfg("mamba mamba", kernels=kernels, init_std=0.2)
    elif family == "mamba2":  # d_conv 3, conv over 64 + 2 x 2 x 8 = 96 channels
        mamba2 = Mamba2Config(d_state=8, head_dim=16, n_groups=2, chunk_size=4, d_conv=3)
        cfg = _make_cfg("mamba2 mamba2", kernels=kernels, mamba2=mamba2)
    else:
        cfg = load_config("configs/titans_mac_tiny.toml", [
            "model.vocab_size=97", "model.d_model=32", "model.n_layers=2", "model.layer_pattern='mac mal'",
            "model.attention.n_heads=2", "model.attention.window=6", "model.titans.n_heads=2",
            "model.titans.memory_depth=1", "model.titans.chunk_size=4", "model.titans.segment_size=6",
            "model.titans.n_persistent=2", "model.titans.conv_size=2", f"model.kernels='{kernels}'",
        ]).model
    torch.manual_seed(0)
    return build_model(cfg)


@pytest.mark.parametrize("family", ["mamba", "mamba2", "titans"])
def test_model_with_triton_conv_equals_the_torch_path(family, calls):
    ids = torch.randint(0, 61, (2, 13), generator=torch.Generator().manual_seed(1))
    # row 0: documents of 5 + 1 + 7 tokens (a one-token document), row 1 one of 13
    pos = torch.stack([torch.cat([torch.arange(5), torch.arange(1), torch.arange(7)]), torch.arange(13)])
    out = {}
    for backend in ("torch", "triton"):
        model = _model(family, backend)
        logits = model(ids, position_ids=pos)
        logits.square().mean().backward()
        out[backend] = logits.detach(), {k: p.grad for k, p in model.named_parameters()}
    assert calls["chunk"] > 0
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-6)
    assert out["torch"][1].keys() == out["triton"][1].keys()
    for k, g in out["torch"][1].items():
        assert g is not None, k
        torch.testing.assert_close(out["triton"][1][k], g, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("family", ["mamba", "mamba2", "titans"])
def test_decoding_with_triton_conv_equals_one_forward(family, calls):
    """A prefill of 3 by the chunk kernel, then one token at a time (the update kernel for
    Mamba and Mamba-2), with a document starting during decoding in row 0."""
    ids = torch.randint(0, 61, (2, 8), generator=torch.Generator().manual_seed(2))
    pos = torch.stack([torch.cat([torch.arange(4), torch.arange(4)]), torch.arange(8)])
    with torch.no_grad():
        whole = _model(family, "torch")(ids, pos)
        stepped = decode(_model(family, "triton"), ids, [3] + [1] * 5, pos)
    assert calls["chunk"] > 0 and (calls["update"] > 0) == (family != "titans")
    torch.testing.assert_close(stepped, whole, rtol=1e-4, atol=1e-5)
