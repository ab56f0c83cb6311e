"""Tiny native-family checkpoints whose config points at the session's prepared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # progress bars and notices, not warnings


def save_checkpoint_on(prepared_dir: Path, root: Path, pattern: dict, seq_len: int = 32, seed: int = 0, **train):
    """A randomly initialised fp32 model (d_model 32, 2 blocks of ``pattern``: model fields)
    saved by the trainer's checkpoint writer at step 3 under ``root/checkpoints``, with the
    prepared data's tokenizer; returns (model in eval mode, config)."""
    from pretrain.config import config_from_dict
    from pretrain.models import build_model
    from pretrain.train.checkpoint import save_checkpoint
    from pretrain.train.optim import build_optimizer

    cfg = config_from_dict({
        "model": {"vocab_size": 256, "d_model": 32, "n_layers": 2, "init_std": 0.2, **pattern},
        "data": {"seq_len": seq_len, "dir": str(prepared_dir)},
        "run": {"dir": str(root)},
        "train": {"micro_batch_size": 4, "global_batch_size": 4, **train},
    })
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    save_checkpoint(root / "checkpoints", 3, model, optimizer, {"data": {"consumed_samples": 0}},
                    cfg.to_toml(), prepared_dir / "tokenizer.model", keep_last=1)
    return model.eval(), cfg


LLAMA = {"layer_pattern": "attn", "ffn": "mlp", "tie_embeddings": False, "attention": {"n_heads": 4, "n_kv_heads": 2}}


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory):
    """The shipped tasks' data built into a fresh cache folder (PRETRAIN_CACHE), not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRETRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="session")
def lm_eval_tasks(eval_cache):
    """One lm-eval TaskManager for the session: indexing its task YAMLs takes seconds per call."""
    from pretrain.eval import harness

    manager = harness.task_manager()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(harness, "task_manager", lambda field="--tasks": manager)
        yield manager
