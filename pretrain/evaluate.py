"""Perplexity of a checkpoint on the validation split of its data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from pretrain.data import read_meta, validation_batches
from pretrain.train.checkpoint import load_for_inference


@torch.no_grad()
def perplexity(checkpoint: Path, samples: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Token-weighted mean validation cross-entropy (nats/token) and its exponent."""
    cfg, model, _ = load_for_inference(checkpoint, device)
    n = samples or cfg.train.eval_samples
    batches = validation_batches(cfg.data.dir, cfg.data.seq_len, n, cfg.train.micro_batch_size, 0, 1)
    total, tokens = 0.0, 0
    for batch in batches:
        ids, pos, labels = (batch[k].to(device) for k in ("input_ids", "position_ids", "labels"))
        count = labels.numel()
        total += model(ids, position_ids=pos, labels=labels).item() * count
        tokens += count
    loss = total / max(tokens, 1)
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "tokens": tokens,
        "unigram_entropy": read_meta(cfg.data.dir).get("unigram_entropy", float("nan")),
    }
