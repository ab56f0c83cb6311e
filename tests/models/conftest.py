"""Shared fixtures of the model tests: tiny configs and fp32-relative comparisons."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import AttentionConfig, MambaConfig, ModelConfig


def _make_cfg(pattern: str = "mamba swa attn", **overrides) -> ModelConfig:
    """A tiny model: d_model 32, 4 heads of 8 (2 KV heads), window 4, Mamba N=4."""
    attention = AttentionConfig(**{"n_heads": 4, "n_kv_heads": 2, "window": 4, **overrides.pop("attention", {})})
    mamba = MambaConfig(**{"d_state": 4, "d_conv": 4, "expand": 2, **overrides.pop("mamba", {})})
    n_layers = overrides.pop("n_layers", len(pattern.split()))
    fields = dict(vocab_size=61, d_model=32, n_layers=n_layers, layer_pattern=pattern, ffn_hidden=48)
    fields.update(overrides)
    return ModelConfig(attention=attention, mamba=mamba, **fields)


@pytest.fixture
def make_cfg():
    return _make_cfg


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def rel_err():
    return _rel_err
