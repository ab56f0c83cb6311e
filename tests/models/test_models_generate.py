"""Sampling filters and cached generation."""

from __future__ import annotations

import pytest
import torch

from pretrain.generate import SamplingError, generate, sample_next
from pretrain.models import build_model
from tests.models.util import uncached_greedy


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
    assert out == uncached_greedy(model, prompt, 6)


def test_generate_stops_at_eos_and_is_reproducible(make_cfg):
    model = build_model(make_cfg())
    a = generate(model, torch.tensor([1, 2, 3]), 8, top_k=5, generator=torch.Generator().manual_seed(1))
    b = generate(model, torch.tensor([1, 2, 3]), 8, top_k=5, generator=torch.Generator().manual_seed(1))
    assert a == b and len(a) == 8
    stop = generate(model, [1, 2, 3], 8, top_k=5, eos_id=a[2], generator=torch.Generator().manual_seed(1))
    assert stop == a[: a.index(a[2]) + 1]


# ------------------------------------------------------------------ the edges of every parameter


def _counts(logits, n, **kw):
    draws = sample_next(logits.expand(n, -1), generator=torch.Generator().manual_seed(1), **kw)
    return torch.bincount(draws, minlength=logits.shape[-1]).double() / n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1e-3, 1e-30, 1e-300, 5e-324])
def test_temperature_to_zero_is_greedy(temperature, dtype):
    logits = (torch.randn(6, 50) * 5).to(dtype)
    g = torch.Generator().manual_seed(0)
    for top_k, top_p in ((0, 1.0), (7, 0.9)):
        got = sample_next(logits, temperature, top_k, top_p, generator=g)
        assert torch.equal(got, logits.float().argmax(-1))


@pytest.mark.parametrize("temperature", [1e6, 1e300, float("inf")])
def test_temperature_to_infinity_is_uniform_over_the_kept_tokens(temperature):
    logits = torch.tensor([4.0, -3.0, 2.0, float("-inf"), 0.5, 9.0, -1.0, 1.0])
    finite = torch.isfinite(logits)
    freq = _counts(logits, 16000, temperature=temperature)
    assert freq[3] == 0 and (freq[finite] - 1 / 7).abs().max() < 0.02
    # top-k keeps the k largest raw logits at every temperature: uniform over {5, 0, 2}
    freq = _counts(logits, 12000, temperature=temperature, top_k=3)
    assert set(torch.nonzero(freq).flatten().tolist()) == {0, 2, 5} and (freq[[0, 2, 5]] - 1 / 3).abs().max() < 0.03
    # the nucleus of a uniform distribution: the ceil(p * 7) best-ranked tokens by raw logit
    freq = _counts(logits, 12000, temperature=temperature, top_p=0.4)
    assert set(torch.nonzero(freq).flatten().tolist()) == {5, 0, 2}


def test_large_finite_temperature_matches_the_softmax():
    logits = torch.tensor([3.0, 1.0, 0.0, -2.0])
    expected = torch.tensor([3.0, 1.0, 0.0, -2.0], dtype=torch.float64).div(4.0).softmax(-1)
    assert (_counts(logits, 20000, temperature=4.0) - expected).abs().max() < 0.015


def test_top_p_zero_and_top_k_one_are_greedy_top_p_one_and_huge_top_k_are_no_cut():
    logits = torch.randn(4, 30)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, 1.0, 0, 0.0, generator=g), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 5.0, 1, 1.0, generator=g), logits.argmax(-1))
    for kw in ({"top_k": 30}, {"top_k": 10**9}, {"top_p": 1.0}):
        a = sample_next(logits, 1.3, generator=torch.Generator().manual_seed(3), **kw)
        b = sample_next(logits, 1.3, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)
    assert _support(torch.zeros(12), n=3000, top_p=1.0) == set(range(12))


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": -0.1}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
    ],
)
def test_out_of_range_parameters_are_refused(kw, param):
    with pytest.raises(SamplingError, match=f"^{param}: ") as info:
        sample_next(torch.randn(2, 10), **kw)
    assert info.value.param == param


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_logits_are_never_sampled(bad):
    logits = torch.randn(3, 10)
    logits[1, 4] = bad
    for temperature in (0.0, 1.0):
        with pytest.raises(SamplingError, match="^logits: contain NaN or \\+inf"):
            sample_next(logits, temperature)
    with pytest.raises(SamplingError, match="all -inf|every logit"):
        sample_next(torch.full((2, 5), float("-inf")), 1.0)


def test_generate_edges(make_cfg):
    model = build_model(make_cfg())
    assert generate(model, [1, 2, 3], 0) == []
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [1, 2, 3], -1)
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [1, model.cfg.vocab_size], 3)
    with pytest.raises(SamplingError, match="top_p"):
        generate(model, [1, 2], 3, top_p=2.0)
    # a prompt far longer than anything seen in training still decodes, greedily as uncached
    prompt = torch.randint(0, model.cfg.vocab_size, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    out = generate(model, prompt, 3, temperature=1e-40)
    assert out == uncached_greedy(model, prompt, 3)


@pytest.mark.parametrize("pattern", ["mamba swa attn", "gla mamba2", "swa mamba_mem attn_kv gmu xattn"])
def test_batched_generation_of_ragged_prompts_equals_one_by_one(make_cfg, pattern):
    """Prompts of 5, 9 and 2 tokens decoded together (left-padded, the padding cut off as its own
    document) draw exactly the greedy tokens each draws alone, and a row that hits eos stops."""
    from pretrain.generate import generate_batch

    cfg = make_cfg(pattern, init_std=0.3)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 2)]
    with torch.no_grad():
        alone = [generate(model, p, 7, greedy=True) for p in prompts]
    assert generate_batch(model, prompts, 7, greedy=True) == alone
    eos = alone[1][2]  # row 1 stops after its third token; the other rows may stop too
    want = [a[: a.index(eos) + 1] if eos in a else a for a in alone]
    assert generate_batch(model, prompts, 7, greedy=True, eos_id=eos) == want
    cfg.doc_masking = False
    with pytest.raises(ValueError, match="doc_masking"):
        generate_batch(build_model(cfg), prompts, 3)


@pytest.mark.parametrize("pattern", ["mamba swa attn", "gla mamba2 mag", "swa mamba_mem attn_kv gmu xattn"])
def test_training_between_generations(make_cfg, pattern):
    """generate() runs under inference_mode, so what it caches on the modules (fused decode
    weights, derived constants, RoPE frequencies) is inference tensors. Training the same model
    afterwards must work (nothing cached is saved for backward), the next generation must see the
    trained weights (the caches are rebuilt), and it must equal the uncached argmax."""
    cfg = make_cfg(pattern, init_std=0.3, attention={"pos_encoding": "rope"})
    torch.manual_seed(0)
    model = build_model(cfg)
    prompt = [3, 14, 15, 9, 2, 6, 5]
    before = generate(model, prompt, 5, greedy=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        model(ids[:, :-1], labels=ids[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    after = generate(model, prompt, 5, greedy=True)
    assert after == uncached_greedy(model, prompt, 5)
    assert after != before  # the steps changed the model's choices: the rebuilt caches were used


def test_a_generous_limit_does_not_reserve_its_whole_cache(make_cfg, monkeypatch):
    """max_new_tokens far beyond what eos lets through reserves at most RESERVE_NEW_TOKENS new
    tokens up front (10**12 would be terabytes); decoding past the reservation grows the cache
    and draws the same tokens as a full reservation."""
    from pretrain import generate as gen

    torch.manual_seed(0)
    model = build_model(make_cfg("swa attn", init_std=0.3))
    asked = []
    real = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda b, n=None: asked.append(n) or real(b, n))
    prompt = [3, 1, 4]
    first = generate(model, prompt, 12, greedy=True)
    eos = first[1]
    assert generate(model, prompt, 10**12, greedy=True, eos_id=eos) == first[: first.index(eos) + 1]
    assert asked == [len(prompt) + 12, len(prompt) + gen.RESERVE_NEW_TOKENS]
    monkeypatch.setattr(gen, "RESERVE_NEW_TOKENS", 2)  # the buffers grow during the generation
    assert generate(model, prompt, 12, greedy=True) == first == uncached_greedy(model, prompt, 12)
