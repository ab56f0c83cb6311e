"""kernels.dispatch: model.kernels and PRETRAIN_KERNELS choose the implementation, and asking
for Triton where it cannot run fails naming the setting."""

from __future__ import annotations

import pytest
import torch

from kernels.dispatch import ENV_VAR, select
from pretrain.config import ConfigError, config_from_dict

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_auto_and_torch_run_torch_off_cuda():
    assert select("gla", "auto", CPU, "kernels.gla.chunk") == "torch"
    assert select("gla", "torch", torch.device("cuda"), "kernels.gla.chunk") == "torch"
    assert select("ssd", "auto", torch.device("cuda"), None) == "torch"  # no Triton kernel yet


@pytest.mark.parametrize("module", [None, "kernels.no_such_op.chunk"])
def test_triton_where_it_cannot_run_names_the_setting(module):
    with pytest.raises(ValueError, match=r"model\.kernels='triton'"):
        select("gla", "triton", CPU, module)


def test_triton_on_cpu_only_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select("gla", "triton", CPU, "kernels.gla.chunk") == "triton"
    assert select("gla", "auto", CPU, "kernels.gla.chunk") == "torch"  # auto never interprets
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"model\.kernels='triton'.*CUDA"):
        select("gla", "triton", CPU, "kernels.gla.chunk")


def test_environment_overrides_the_config(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "torch")
    assert select("gla", "triton", CPU, None) == "torch"
    monkeypatch.setenv(ENV_VAR, "triton")
    with pytest.raises(ValueError, match=f"{ENV_VAR}='triton'"):
        select("gla", "torch", CPU, None)
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=f"{ENV_VAR}='cuda'.*auto, triton, torch"):
        select("gla", "auto", CPU, None)


def test_model_kernels_is_validated():
    with pytest.raises(ConfigError, match="model.kernels"):
        config_from_dict({"model": {"kernels": "cuda"}})
    assert config_from_dict({"model": {"kernels": "torch"}}).model.kernels == "torch"


@pytest.mark.parametrize("pattern", ["mag"])  # mamba2 has Triton kernels: test_mamba2_triton.py
def test_every_mixer_passes_model_kernels_on(pattern, monkeypatch):
    """model.kernels reaches the op: 'triton' fails for an op without a Triton kernel, naming
    it; PRETRAIN_KERNELS=torch overrides it and gives the 'torch' model's logits."""
    from pretrain.models import build_model
    from tests.models.conftest import _make_cfg

    from pretrain.config import TitansConfig

    # Titans' kernels cover memory depths 1 and 2: a depth-3 memory has none
    extra = {"titans": TitansConfig(memory_depth=3)} if pattern == "mag" else {}
    cfg = _make_cfg(pattern, kernels="triton", **extra)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 5))
    with torch.no_grad(), pytest.raises(ValueError, match=r"model\.kernels='triton'"):
        model(ids)
    monkeypatch.setenv(ENV_VAR, "torch")
    with torch.no_grad():
        forced = model(ids)
        monkeypatch.delenv(ENV_VAR)
        cfg.kernels = "torch"
        torch.manual_seed(0)
        reference = build_model(cfg)(ids)
    torch.testing.assert_close(forced, reference, rtol=0, atol=0)


@pytest.mark.parametrize("pattern", ["gla", "mamba"])
def test_models_on_triton_kernels_equal_the_torch_path(pattern, monkeypatch):
    """A whole model with model.kernels='triton' (under the interpreter, packed documents):
    logits and every parameter gradient equal the PyTorch path's (fp32 tolerance)."""
    from pretrain.models import build_model
    from tests.models.conftest import _make_cfg

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    out = {}
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    pos = torch.cat([torch.arange(4), torch.arange(5)]).expand(2, 9)  # two documents per row
    for kernels in ("torch", "triton"):
        cfg = _make_cfg(pattern, kernels=kernels)
        torch.manual_seed(0)
        model = build_model(cfg)
        logits = model(ids % cfg.vocab_size, position_ids=pos)
        logits.square().mean().backward()
        out[kernels] = logits.detach(), {k: p.grad for k, p in model.named_parameters()}
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-4, atol=1e-5)
    for k, g in out["torch"][1].items():
        torch.testing.assert_close(out["triton"][1][k], g, rtol=1e-3, atol=1e-5, msg=k)
