"""Helpers shared by the model tests."""

from __future__ import annotations

import torch


def decode_with_cache(model, ids: torch.Tensor, chunks: list[int], positions: torch.Tensor | None = None):
    """``(logits, cache)`` of ``ids [B, T]`` fed through one decoding cache in pieces of
    ``chunks`` tokens."""
    cache = model.new_cache(ids.shape[0])
    outs, start = [], 0
    for n in chunks:
        pos = None if positions is None else positions[:, start : start + n]
        outs.append(model(ids[:, start : start + n], pos, cache=cache))
        start += n
    assert cache.offset == ids.shape[1] == start
    return torch.cat(outs, dim=1), cache


def decode(model, ids: torch.Tensor, chunks: list[int], positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``ids`` decoded in pieces (see :func:`decode_with_cache`)."""
    return decode_with_cache(model, ids, chunks, positions)[0]
