"""Helpers shared by the model tests."""

from __future__ import annotations

import torch


def uncached_greedy(model, prompt: list[int], n: int) -> list[int]:
    """The ``n`` argmax continuations of ``prompt``, each from a full forward without a cache
    (autograd on: no one-token decoding path, no decode-time weight copy)."""
    ids = list(prompt)
    with torch.enable_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


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


def assert_packed_equals_separate(model, vocab_size: int, lengths=(5, 3, 8), tol: float = 1e-5) -> None:
    """Documents of ``lengths`` packed into one row with restarting position ids give, token for
    token, the logits of each document run alone."""
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, vocab_size, (n,), generator=g) for n in lengths]
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(len(d)) for d in docs])[None]
    with torch.no_grad():
        packed = model(ids, positions)[0]
        start = 0
        for doc in docs:
            alone = model(doc[None])[0]
            assert (packed[start : start + len(doc)] - alone).abs().max() <= tol * max(1.0, alone.abs().max().item())
            start += len(doc)
