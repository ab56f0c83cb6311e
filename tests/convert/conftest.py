"""Tiny models of every native family saved as real checkpoints, and their exports."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # progress bars and notices, not warnings

FAMILY_MODELS = {
    "llama": {"layer_pattern": "attn", "ffn": "mlp", "tie_embeddings": False,
              "attention": {"n_heads": 4, "n_kv_heads": 2, "rope_theta": 500.0}},
    "mistral": {"layer_pattern": "swa", "ffn": "mlp", "attention": {"n_heads": 4, "n_kv_heads": 2, "window": 5}},
    "mixtral": {"layer_pattern": "attn", "ffn": "moe", "tie_embeddings": False,
                "moe": {"n_experts": 4, "top_k": 2, "expert_hidden": 24}},
    "diffllama": {"layer_pattern": "diff_attn", "ffn": "mlp", "attention": {"n_heads": 4, "n_kv_heads": 2}},
    "mamba": {"layer_pattern": "mamba", "ffn": "none", "mamba": {"d_state": 4}},
    "mamba2": {"layer_pattern": "mamba2", "ffn": "none",
               "mamba2": {"d_state": 8, "head_dim": 8, "n_groups": 2, "chunk_size": 4}},
}
"""Our layer patterns for each native family (GQA, untied heads, a window shorter than the
inputs, grouped B/C: the features whose layouts differ)."""


def model_config(family: str, vocab_size: int):
    from pretrain.config import config_from_dict

    model = {"vocab_size": vocab_size, "d_model": 32, "n_layers": 2, "norm_eps": 1e-5, "init_std": 0.2,
             **FAMILY_MODELS[family]}
    return config_from_dict({"model": model, "data": {"seq_len": 32}, "run": {"dir": "unused"}})


def tiny_model(family: str, seed: int = 0):
    """A randomly initialised fp32 model of ``family`` with every vector parameter moved away
    from its constant init (norm gains 1, D 1, ...) and random lambdas, which a wrong map would
    get wrong."""
    from pretrain.models import build_model

    cfg = model_config(family, 256)
    torch.manual_seed(seed)
    return perturb_(build_model(cfg.model))


def perturb_(model):
    """``model`` with its norm gains, biases and differential-attention lambdas moved off their
    initial values (ones, zeros), so a conversion that drops or swaps one shows in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda" in name:
                p.normal_(std=0.3)
            elif p.ndim == 1:
                p.add_(torch.rand_like(p) * 0.5)
    return model


def save_tiny_checkpoint(family: str, root: Path, tokenizer: Path | None, seed: int = 0) -> tuple[object, Path]:
    """:func:`tiny_model` saved by the trainer's checkpoint writer; (model in eval mode, run folder)."""
    from pretrain.train.checkpoint import save_checkpoint
    from pretrain.train.optim import build_optimizer

    model = tiny_model(family, seed)
    cfg = model_config(family, 256)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    save_checkpoint(root / "checkpoints", 3, model, optimizer, {"data": {"consumed_samples": 0}},
                    cfg.to_toml(), tokenizer, keep_last=1)
    return model.eval(), root


@pytest.fixture(scope="session")
def tokenizer_path(prepared_dir) -> Path:
    return prepared_dir / "tokenizer.model"


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|: the error relative to the logits' scale."""
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
