"""Schedules against closed forms written independently; decay groups by parameter kind."""

import math

import pytest
from torch import nn

from pretrain.config import OptimConfig
from pretrain.train.optim import lr_at, param_groups


def test_cosine_warmup_and_floor():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(10, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)  # halfway: midpoint of 1.0 and 0.1
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)
    for s in range(10, 110):
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 100))
        assert lr_at(s, cfg, 110) == pytest.approx(expected)


def test_wsd_is_flat_then_decays():
    cfg = OptimConfig(lr=2.0, min_lr_ratio=0.0, warmup_steps=0, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, cfg, 100) for s in range(101)]
    assert all(lr == 2.0 for lr in lrs[:80])
    assert lrs[90] == pytest.approx(1.0) and lrs[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(lrs[80:], lrs[81:]))


def test_linear_to_zero():
    cfg = OptimConfig(lr=1.0, warmup_steps=0, schedule="linear")
    assert [lr_at(s, cfg, 4) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_no_decay_on_norms_biases_embeddings():
    model = nn.ModuleDict(
        {"emb": nn.Embedding(10, 4), "lin": nn.Linear(4, 4), "norm": nn.LayerNorm(4)}
    )
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model["lin"].weight)}
    expected = {id(model["emb"].weight), id(model["lin"].bias), id(model["norm"].weight), id(model["norm"].bias)}
    assert {id(p) for p in no_decay["params"]} == expected
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )


def test_mamba_a_log_is_exempt_from_decay():
    from pretrain.config import load_config
    from pretrain.models import build_model

    model = build_model(load_config(None, ["model.vocab_size=32", "model.d_model=16", "model.n_layers=2"]).model)
    decay, _ = param_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert not any(n.endswith("A_log") for n in names)
    assert {"blocks.0.mixer.in_proj.weight", "blocks.0.ffn.w1.weight", "blocks.1.mixer.wq.weight"} <= names
