"""The trainer's validation loss is the mean cross-entropy over the counted tokens of the fixed
validation set, checked against an fp64 per-token mean from materialised logits (the same with
several ranks: tests/distributed/test_fsdp.py)."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import load_config
from pretrain.train.trainer import Trainer
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


def naive_token_mean(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """sum of -log p(label) over every label != -100, in fp64, / their number."""
    nats, tokens = 0.0, 0
    with torch.no_grad():
        for b in batches:
            for x, pos, y in zip(b["input_ids"], b["position_ids"], b["labels"]):
                keep = y != -100
                if not keep.any():
                    continue
                logits = model(x[None], position_ids=pos[None])[0].double()  # [T, V]
                logp = torch.log_softmax(logits, dim=-1)[keep]
                nats -= logp.gather(-1, y[keep, None]).sum().item()
                tokens += int(keep.sum())
    return nats / tokens


@pytest.mark.parametrize("micro_batch_size", [2, 3])
def test_val_loss_is_the_mean_over_counted_tokens(small_corpus, prepared_dir, tmp_path, micro_batch_size):
    values = {"train.eval_samples": 5, "train.micro_batch_size": micro_batch_size,
              "train.global_batch_size": 2 * micro_batch_size, "train.eval_interval": 0}
    cfg = load_config(None, tiny_overrides(small_corpus, prepared_dir, tmp_path, **values))
    trainer = Trainer(cfg, resume="none", log=lambda *_: None)
    first = trainer.evaluate()
    batches = trainer._val_batches
    padding = sum(int((b["labels"] == -100).all(-1).sum()) for b in batches)
    assert sum(len(b["labels"]) for b in batches) - padding == 5  # the last micro-batch is padded
    assert padding == len(batches) * micro_batch_size - 5 > 0
    assert first["val_loss"] == pytest.approx(naive_token_mean(trainer.model, batches), rel=1e-6)

    # Unequal token counts per micro-batch (labels -100 after every document end, half of one
    # row) and a micro-batch of padding only: a mean of the micro-batches' means would differ.
    eos = trainer.meta["eos_id"]
    for b in batches:
        b["labels"][b["input_ids"] == eos] = -100
    batches[0]["labels"][0, : cfg.data.seq_len // 2] = -100
    batches.append({k: v.clone() for k, v in batches[0].items()})
    batches[-1]["labels"][:] = -100
    got = trainer.evaluate()
    want = naive_token_mean(trainer.model, batches)
    assert math.isfinite(got["val_loss"])
    assert got["val_loss"] == pytest.approx(want, rel=1e-6)
    assert got["val_ppl"] == pytest.approx(math.exp(want), rel=1e-6)
