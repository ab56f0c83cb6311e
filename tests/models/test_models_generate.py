"""Sampling filters and cached generation."""

from __future__ import annotations

import pytest
import torch

from pretrain.generate import generate, sample_next
from pretrain.models import build_model


def naive_nucleus(probs, p):
    """Indices of the smallest set of most likely tokens whose mass reaches p."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += probs[i]
        if mass >= p:
            break
    return set(kept)


def _support(logits, n=400, **kw):
    g = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(n, -1), generator=g, **kw)
    return set(draws.tolist())


def test_greedy_and_top1_are_argmax():
    logits = torch.randn(5, 50)
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, temperature=1.3, top_k=1, generator=g), logits.argmax(-1))


def test_top_k_support():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, -1.0, 2.0])
    assert _support(logits, top_k=3) == {1, 3, 5}


@pytest.mark.parametrize("p", [0.3, 0.5, 0.8, 0.95])
def test_top_p_keeps_smallest_set_reaching_p(p):
    logits = torch.tensor([1.0, 0.2, 2.0, -0.5, 1.5, 0.0, 0.9])
    expected = naive_nucleus(logits.softmax(-1).tolist(), p)
    assert _support(logits, n=2000, top_p=p) == expected


def test_sampling_is_reproducible_with_a_generator():
    logits = torch.randn(3, 40)
    a = sample_next(logits, 0.8, 10, 0.9, torch.Generator().manual_seed(5))
    b = sample_next(logits, 0.8, 10, 0.9, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_generate_greedy_matches_uncached_argmax(make_cfg):
    cfg = make_cfg(init_std=0.2)
    torch.manual_seed(0)
    model = build_model(cfg)
    prompt = [3, 14, 15, 9, 2, 6, 5]
    out = generate(model, prompt, 6, greedy=True)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt) :]


def test_generate_stops_at_eos_and_is_reproducible(make_cfg):
    model = build_model(make_cfg())
    a = generate(model, torch.tensor([1, 2, 3]), 8, top_k=5, generator=torch.Generator().manual_seed(1))
    b = generate(model, torch.tensor([1, 2, 3]), 8, top_k=5, generator=torch.Generator().manual_seed(1))
    assert a == b and len(a) == 8
    stop = generate(model, [1, 2, 3], 8, top_k=5, eos_id=a[2], generator=torch.Generator().manual_seed(1))
    assert stop == a[: a.index(a[2]) + 1]
