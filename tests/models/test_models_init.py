"""Construction, initialisation, gradients, the registry and pipeline-stage skipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pretrain.models import build_model
from pretrain.models.layers.mamba import DT_MAX, DT_MIN
from pretrain.models.registry import FFNS, MIXERS, register_mixer


def test_registry_has_the_builtin_layers():
    assert {"attn", "swa", "mamba"} <= set(MIXERS)
    assert {"mlp", "none"} <= set(FFNS)
    with pytest.raises(ValueError, match="twice"):
        register_mixer("attn")(lambda cfg, i: nn.Identity())


def test_vocab_size_must_be_set(make_cfg):
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(make_cfg(vocab_size=0))


def test_block_names_and_ffn_none(make_cfg):
    model = build_model(make_cfg("mamba:none swa attn"))
    assert list(model.blocks) == ["0", "1", "2"]
    assert model.blocks["0"].ffn is None and model.blocks["0"].norm2 is None
    assert model.blocks["1"].ffn is not None
    assert model.head is None  # tied


@pytest.mark.parametrize("tie", [True, False])
def test_meta_build_then_init_reproduces_seeded_build(make_cfg, tie):
    cfg = make_cfg(tie_embeddings=tie)
    torch.manual_seed(7)
    ref = build_model(cfg)
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(7)
    model.init_weights()
    ref_state = ref.state_dict()
    assert ref_state.keys() == model.state_dict().keys()
    for name, p in model.state_dict().items():
        torch.testing.assert_close(p, ref_state[name], rtol=0, atol=0, msg=name)


def test_init_values(make_cfg):
    cfg = make_cfg("mamba swa", n_layers=8, d_model=64, init_std=0.05)
    model = build_model(cfg)
    out_std = 0.05 / math.sqrt(2 * 8)
    assert model.embed.weight.std().item() == pytest.approx(0.05, rel=0.05)
    mamba, attn = model.blocks["0"].mixer, model.blocks["1"].mixer
    assert attn.wq.weight.std().item() == pytest.approx(0.05, rel=0.1)
    assert attn.wo.weight.std().item() == pytest.approx(out_std, rel=0.1)
    assert mamba.out_proj.weight.std().item() == pytest.approx(out_std, rel=0.1)
    assert model.blocks["1"].ffn.w2.weight.std().item() == pytest.approx(out_std, rel=0.1)
    assert torch.equal(model.blocks["0"].norm1.weight, torch.ones(64))
    n = torch.arange(1, cfg.mamba.d_state + 1, dtype=torch.float32)
    torch.testing.assert_close(mamba.A_log, torch.log(n).expand_as(mamba.A_log))
    assert torch.equal(mamba.D, torch.ones_like(mamba.D))
    dt = torch.nn.functional.softplus(mamba.dt_proj.bias)
    assert dt.min() >= DT_MIN * 0.999 and dt.max() <= DT_MAX * 1.001


@pytest.mark.parametrize("tie", [True, False])
def test_every_parameter_gets_a_gradient(make_cfg, tie):
    cfg = make_cfg("mamba attn", tie_embeddings=tie, init_std=0.1)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4], list(range(9))])
    logits = model(ids, positions)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_pipeline_stages_compose(make_cfg):
    """A stage without embed takes hidden states; one without norm/head returns them."""
    cfg = make_cfg("mamba swa attn", tie_embeddings=False)

    def seeded():
        torch.manual_seed(0)
        return build_model(cfg)

    full, first, second = seeded(), seeded(), seeded()
    first.norm = first.head = None
    del first.blocks["2"]
    second.embed = None
    del second.blocks["0"], second.blocks["1"]
    ids = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        hidden = first(ids)
        assert hidden.shape == (2, 10, cfg.d_model)
        torch.testing.assert_close(second(hidden), full(ids))


def test_init_weights_sets_every_parameter(make_cfg, nan_poison):
    """The build materialises uninitialised memory (poisoned here): init_weights must cover it."""
    model = build_model(make_cfg("mamba:none swa attn", tie_embeddings=False))
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
