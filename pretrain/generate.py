"""Cached decoding: one forward over the prompt, then one token at a time through the cache."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids ``[...]`` from ``logits [..., V]``.

    temperature <= 0 is greedy (argmax). Otherwise the logits are divided by the temperature,
    cut to the ``top_k`` largest (0: all), then to the smallest set of most likely tokens whose
    probability mass reaches ``top_p`` (nucleus; 1.0: all), and sampled with ``generator``.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the first never is)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)  # [N, 1]
    return flat.view(probs.shape[:-1])


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: list[int] | Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Continue one prompt; returns the new token ids (ending with ``eos_id`` if it was drawn).

    ``model`` needs ``new_cache(batch_size)`` and ``forward(ids, cache=...)`` (HybridLM).
    ``greedy`` or ``temperature == 0`` takes the argmax at every step.
    """
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
    if ids.numel() == 0:
        raise ValueError("generate: the prompt is empty")
    device = next(model.parameters()).device
    temperature = 0.0 if greedy else temperature
    cache = model.new_cache(1)
    logits = model(ids.to(device).view(1, -1), cache=cache)[0, -1]  # [V]
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        out.append(int(token))
        if eos_id is not None and out[-1] == eos_id:
            break
        logits = model(token.view(1, 1), cache=cache)[0, -1]
    return out
