"""A tiny Titans model (configs/titans_mac_tiny.toml, shrunk) on the Triton memory kernel
(model.kernels='triton', under the interpreter) equals the PyTorch path: logits and every
parameter gradient with packed documents, and decoding token by token (the kernel at T = 1,
starting mid-chunk) equals one forward."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import load_config
from pretrain.models import build_model
from tests.models.util import decode

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only contend


def _model(pattern: str, kernels: str, depth: int):
    cfg = load_config("configs/titans_mac_tiny.toml", [
        "model.vocab_size=97", "model.d_model=32", "model.n_layers=2", f"model.layer_pattern='{pattern}'",
        "model.attention.n_heads=2", "model.attention.window=6", "model.titans.n_heads=2",
        f"model.titans.memory_depth={depth}", "model.titans.chunk_size=4", "model.titans.segment_size=6",
        "model.titans.n_persistent=2", f"model.kernels='{kernels}'",
    ]).model
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # livelier write gates than the initial ones, so the memory matters
        for name, p in model.named_parameters():
            if name.endswith(("theta_proj.bias", "eta_proj.bias", "alpha_proj.bias")):
                p.fill_(0.0)
    return model


@pytest.mark.parametrize("depth", [1, 2])
def test_model_on_the_triton_kernel_equals_the_torch_path(depth):
    """MAC ('per_token' reads, segments of 6 over chunks of 4) then MAL ('chunk_start' reads),
    with the linear (depth 1) and the config's 2-layer MLP memory (depth 2)."""
    pattern = "mac mal"
    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))
    # packed documents: row 0 of 7 + 10 tokens (a start inside a chunk), row 1 of 3 + 14
    pos = torch.stack([torch.cat([torch.arange(7), torch.arange(10)]), torch.cat([torch.arange(3), torch.arange(14)])])
    out = {}
    for kernels in ("torch", "triton"):
        model = _model(pattern, kernels, depth)
        logits = model(ids, position_ids=pos)
        logits.square().mean().backward()
        out[kernels] = logits.detach(), {k: p.grad for k, p in model.named_parameters()}
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-4, atol=1e-5)
    for k, g in out["torch"][1].items():
        torch.testing.assert_close(out["triton"][1][k], g, rtol=1e-3, atol=1e-5, msg=k)


def test_decoding_on_the_triton_kernel_equals_one_forward():
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = _model("mac mag", "torch", depth=2)(ids)
        steps = decode(_model("mac mag", "triton", depth=2), ids, [1] * 9)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)
