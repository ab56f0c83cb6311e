"""Whole tiny models on the fused norm and element-wise kernels (model.kernels='triton', under
the interpreter) against the same models on the PyTorch path: logits and every parameter
gradient, for a Llama-style model (RMSNorm with the residual add fused into norm2, SwiGLU), a
Mamba-2 model (its gated RMSNorm) and SambaY over a Mamba memory (the GMU's gating) and over a
Mamba-2 memory (the GMU's gated norm). A spy on the ops' dispatch checks that each ran on Triton.
The fused block also equals its two halves run apart (the pipeline's path)."""

from __future__ import annotations

import pytest
import torch

import kernels.rmsnorm
import kernels.rmsnorm.fused as rms_fused
import kernels.swiglu
import kernels.swiglu.elementwise as elementwise
from kernels import dispatch
from pretrain.config import Mamba2Config
from pretrain.models import build_model
from tests.models.conftest import _make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")
# fp32: the kernels and the PyTorch path differ by summation order only
RTOL, ATOL = 1e-4, 1e-5
SELECT = dispatch.select  # the real one, before any spy replaces it

MAMBA2 = dict(mamba2=Mamba2Config(d_state=8, head_dim=16, n_groups=2, chunk_size=4))
FAMILIES = {
    "llama": ("attn attn", {}, {"rms_norm", "swiglu"}),
    "mamba2": ("mamba2 mamba2", MAMBA2, {"rms_norm", "swiglu", "gated_rms_norm", "ssd"}),
    # SambaY's memory layer and GMU (sambay_pattern's 'mamba_mem ... gmu'), without the attention
    "sambay": ("mamba_mem gmu", {}, {"rms_norm", "swiglu", "gated_memory", "selective_scan"}),
    "sambay_mamba2": ("mamba2_mem gmu", MAMBA2, {"rms_norm", "swiglu", "gated_rms_norm", "ssd"}),
}


@pytest.fixture(autouse=True)
def interpreted(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(rms_fused, "POISON_OUTPUTS", True)
    monkeypatch.setattr(elementwise, "POISON_OUTPUTS", True)


def _run(pattern, overrides, backend, monkeypatch):
    """Logits and parameter gradients of a seeded model, and the ops that ran on Triton."""
    ran = set()
    real = SELECT

    def spy(op, backend, device, module):
        chosen = real(op, backend, device, module)
        if chosen == "triton":
            ran.add(op)
        return chosen

    import kernels.selective_scan
    import kernels.ssd

    for mod in (dispatch, kernels.rmsnorm, kernels.swiglu, kernels.ssd, kernels.selective_scan):
        monkeypatch.setattr(mod, "select", spy)
    cfg = _make_cfg(pattern, kernels=backend, ffn="mlp", **overrides)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    logits = model(ids)
    logits.square().mean().backward()
    return logits.detach(), {k: p.grad for k, p in model.named_parameters()}, ran


@pytest.mark.parametrize("family", list(FAMILIES))
def test_model_on_fused_kernels_equals_torch_path(family, monkeypatch):
    pattern, overrides, ops = FAMILIES[family]
    ref_logits, ref_grads, ran_ref = _run(pattern, overrides, "torch", monkeypatch)
    logits, grads, ran = _run(pattern, overrides, "triton", monkeypatch)
    assert ran_ref == set() and ran == ops
    torch.testing.assert_close(logits, ref_logits, rtol=RTOL, atol=ATOL)
    assert grads.keys() == ref_grads.keys()
    for k, g in ref_grads.items():
        assert g is not None, k
        torch.testing.assert_close(grads[k], g, rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")


def test_fused_block_equals_its_halves():
    """Block.forward (the residual add fused into norm2) against forward_mixer then forward_ffn
    (a separate add, then norm2), both on Triton: the block output and the input gradient."""
    cfg = _make_cfg("attn", kernels="triton", ffn="mlp")
    torch.manual_seed(0)
    model = build_model(cfg)
    block = model.blocks["0"]
    h = torch.randn(2, 7, cfg.d_model, requires_grad=True)
    ctx = model._context(h, None, None)
    fused_out, _ = block(h, ctx, {})
    mid, carry = block.forward_mixer(h, ctx, {})
    split_out, _ = block.forward_ffn(mid, ctx, carry)
    torch.testing.assert_close(fused_out, split_out, rtol=1e-6, atol=1e-6)
    (g_fused,) = torch.autograd.grad(fused_out.square().sum(), h)
    (g_split,) = torch.autograd.grad(split_out.square().sum(), h)
    torch.testing.assert_close(g_fused, g_split, rtol=1e-5, atol=1e-6)
