"""Cached decoding: one forward over the prompt, then one token at a time through the cache.

Both entry points run under ``torch.inference_mode()`` (no view or version tracking: 7-10 %
less time per token than ``no_grad`` at batch 1 on the CPU, bench/decode.py's shapes). What a
decoding step caches on the modules (the fused decode weights, RoPE's frequencies) is then made
of inference tensors; they are only read outside it, never saved for backward, so training the
same model afterwards works (tests/models/test_models_generate.py trains between two calls)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class SamplingError(ValueError):
    """A sampling parameter out of range, or logits nothing can be sampled from; ``param`` names
    the parameter (``temperature``, ``top_k``, ``top_p``) or ``logits``."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise :class:`SamplingError` unless ``temperature`` is in [0, inf], ``top_k >= 0`` and
    ``top_p`` in [0, 1] (NaN is never valid)."""
    if not temperature >= 0:  # also catches NaN
        raise SamplingError("temperature", f"must be >= 0 (0: greedy; inf: uniform), got {temperature}")
    if top_k < 0:
        raise SamplingError("top_k", f"must be >= 0 (0: no cut), got {top_k}")
    if not 0 <= top_p <= 1:
        raise SamplingError("top_p", f"must be in [0, 1] (0: the most likely token; 1: no cut), got {top_p}")


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids ``[...]`` (int64) from ``logits [..., V]`` (any float dtype; ``-inf`` marks
    a token that can never be drawn).

    The distribution is ``softmax(logits / temperature)`` restricted to the ``top_k`` tokens of
    largest logit (0 or >= V: all; ties at the k-th value are kept), then to the nucleus: the
    smallest set of most likely tokens whose probability reaches ``top_p`` (Holtzman et al.
    2020; the most likely token is always kept). Every edge is the limit of its neighbourhood:

    - ``temperature == 0`` takes the argmax, and any tiny positive temperature gives the same
      (the scaled logits never overflow into NaN: they are shifted to a maximum of 0 and
      scaled in float64); ``temperature == inf`` is uniform over the tokens that survive the
      cuts;
    - ``top_p == 0`` keeps only the most likely token; ``top_p == 1`` keeps all;
    - ``top_k == 1`` is the argmax; the top-k set ranks the raw logits, which orders tokens as
      every positive temperature does, and so does the nucleus ranking.

    Raises :class:`SamplingError` for a parameter out of range (see :func:`check_sampling`) and
    for logits holding NaN or +inf, or a row that is all -inf (a diverged model): nothing is
    ever sampled from NaN.
    """
    check_sampling(temperature, top_k, top_p)
    logits = logits.double()
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise SamplingError("logits", "contain NaN or +inf (a diverged model or checkpoint?)")
    if torch.isneginf(logits).all(dim=-1).any():
        raise SamplingError("logits", "every logit of a row is -inf: no token can be drawn")
    if temperature == 0:
        return logits.argmax(dim=-1)
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    shifted = logits - logits.amax(dim=-1, keepdim=True)  # max 0: finite / T never overflows to NaN
    if math.isinf(temperature):
        scaled = shifted.masked_fill(shifted.isfinite(), 0.0)  # the T -> inf limit: uniform
    else:
        scaled = shifted / temperature  # float64: 0 / 1e-320 is still 0
    if top_p < 1:
        # rank by the raw logits (stable): at T = inf every probability ties, the order must not
        order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
        probs = scaled.gather(-1, order).softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; never the first,
        # which top_p == 0 (0 >= 0) would otherwise drop too
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    probs = scaled.softmax(dim=-1)
    flat = torch.multinomial(probs.reshape(-1, vocab), 1, generator=generator)  # [N, 1]
    return flat.view(probs.shape[:-1])


RESERVE_NEW_TOKENS = 8192
"""New tokens the K/V buffers hold from the start (static: no step reallocates them). A longer
``max_new_tokens`` grows them by doubling as the text reaches them, so a generous limit that
``eos_id`` cuts short does not allocate its whole cache up front."""


@torch.inference_mode()
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

    ``model`` needs ``new_cache(batch_size, max_tokens)`` and ``forward(ids, cache=...)`` (HybridLM).
    ``greedy`` or ``temperature == 0`` takes the argmax at every step; the sampling parameters
    are those of :func:`sample_next`, checked before the model runs. ``max_new_tokens == 0``
    returns ``[]``. Raises ``ValueError`` for an empty prompt, a negative ``max_new_tokens`` or a
    token id outside the model's vocabulary, and :class:`SamplingError` as sample_next does.
    """
    ids = torch.as_tensor(prompt_ids, dtype=torch.long).flatten()
    if ids.numel() == 0:
        raise ValueError("generate: the prompt is empty")
    if max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be >= 0, got {max_new_tokens}")
    temperature = 0.0 if greedy else temperature
    check_sampling(temperature, top_k, top_p)
    vocab = model.cfg.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"generate: prompt token ids must be in [0, {vocab}), got {int(ids.min())}..{int(ids.max())}")
    if max_new_tokens == 0:
        return []
    device = next(model.parameters()).device
    cache = model.new_cache(1, ids.numel() + min(max_new_tokens, RESERVE_NEW_TOKENS))
    logits = model(ids.to(device).view(1, -1), cache=cache)[0, -1]  # [V]
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator)
        out.append(int(token))
        if eos_id is not None and out[-1] == eos_id:
            break
        logits = model(token.view(1, 1), cache=cache)[0, -1]
    return out


@torch.inference_mode()
def generate_batch(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue several prompts of different lengths together; returns each one's new token
    ids (ending with ``eos_id`` if it was drawn), as :func:`generate` would one by one.

    The prompts are left-padded to the longest and the padding is made its own document: each
    prompt's first token gets position 0, so with ``model.doc_masking`` the attention layers
    never see the padding and the recurrent layers reset their state there, exactly as at a
    document start in training. Every step then decodes one token per row with per-row
    positions (RoPE continues each prompt's own count). A row that drew ``eos_id`` stops
    growing; the others go on. Raises ``ValueError`` when the prompts differ in length and the
    model has no document masking (padding would leak into the state), and as :func:`generate`.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate_batch: every prompt needs at least one token")
    if max_new_tokens < 0:
        raise ValueError(f"generate_batch: max_new_tokens must be >= 0, got {max_new_tokens}")
    lengths = [len(p) for p in prompts]
    longest = max(lengths)
    if len(set(lengths)) > 1 and not model.cfg.doc_masking:
        raise ValueError("generate_batch: prompts of different lengths need model.doc_masking = true "
                         "(left padding is cut off as its own document)")
    temperature = 0.0 if greedy else temperature
    check_sampling(temperature, top_k, top_p)
    vocab = model.cfg.vocab_size
    flat = [t for p in prompts for t in p]
    if min(flat) < 0 or max(flat) >= vocab:
        raise ValueError(f"generate_batch: prompt token ids must be in [0, {vocab}), got {min(flat)}..{max(flat)}")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    device = next(model.parameters()).device
    pads = torch.tensor([longest - n for n in lengths], device=device)  # [B]
    ids = torch.tensor([[p[0]] * (longest - len(p)) + list(p) for p in prompts], device=device)  # [B, L]
    t = torch.arange(longest, device=device)
    positions = torch.where(t >= pads[:, None], t - pads[:, None], t)  # the padding: a document of its own
    cache = model.new_cache(len(prompts), longest + min(max_new_tokens, RESERVE_NEW_TOKENS))
    logits = model(ids, positions, cache=cache)[:, -1]  # [B, V]
    lengths_t = torch.tensor(lengths, device=device)
    out: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        tokens = sample_next(logits, temperature, top_k, top_p, generator)  # [B]
        for i, tok in enumerate(tokens.tolist()):
            if not done[i]:
                out[i].append(tok)
                done[i] = eos_id is not None and tok == eos_id
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(tokens.view(-1, 1), (lengths_t + step).view(-1, 1), cache=cache)[:, -1]
    return out
