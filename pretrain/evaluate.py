"""Perplexity of a checkpoint on the validation split of its data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from pretrain.data import read_meta, validation_batches
from pretrain.train.checkpoint import load_for_inference
from pretrain.train.trainer import lm_loss


@torch.no_grad()
def perplexity(checkpoint: Path, samples: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Token-weighted mean validation cross-entropy (nats/token) and its exponent."""
    cfg, model, _ = load_for_inference(checkpoint, device)
    n = samples or cfg.train.eval_samples
    batches = validation_batches(cfg.data.dir, cfg.data.seq_len, n, cfg.train.micro_batch_size, 0, 1)
    total, tokens = 0.0, 0
    for batch in batches:
        logits = model(batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device))
        count = batch["labels"].numel()
        total += lm_loss(logits, batch["labels"].to(device)).item() * count
        tokens += count
    loss = total / max(tokens, 1)
    return {
        "val_loss": loss,
        "val_ppl": math.exp(min(loss, 50.0)),
        "tokens": tokens,
        "unigram_entropy": read_meta(cfg.data.dir).get("unigram_entropy", float("nan")),
    }
