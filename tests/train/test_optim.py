"""Schedules against closed forms written independently; decay groups by parameter kind."""

import math

import pytest
from torch import nn

from pretrain.config import OptimConfig
from pretrain.train.optim import lr_at, param_groups


def test_cosine_warmup_and_floor():
    cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    # 111 steps: warmup 0..9, cosine over steps 10..110 (the last)
    assert lr_at(0, cfg, 111) == pytest.approx(0.1)
    assert lr_at(9, cfg, 111) == pytest.approx(1.0)
    assert lr_at(10, cfg, 111) == pytest.approx(1.0)
    assert lr_at(60, cfg, 111) == pytest.approx(0.55)  # halfway: midpoint of 1.0 and 0.1
    assert lr_at(110, cfg, 111) == pytest.approx(0.1)
    for s in range(10, 111):
        expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 100))
        assert lr_at(s, cfg, 111) == pytest.approx(expected)


def test_wsd_is_flat_then_decays():
    cfg = OptimConfig(lr=2.0, min_lr_ratio=0.0, warmup_steps=0, schedule="wsd", decay_fraction=0.2)
    lrs = [lr_at(s, cfg, 100) for s in range(100)]  # 20 decay steps, 80..99, each 0.1 lower
    assert all(lr == 2.0 for lr in lrs[:80])
    assert lrs[80:] == pytest.approx([2.0 - 0.1 * (s - 79) for s in range(80, 100)])
    assert lrs[89] == pytest.approx(1.0) and lrs[99] == 0.0


def test_linear_to_zero():
    cfg = OptimConfig(lr=1.0, warmup_steps=0, schedule="linear")
    assert [lr_at(s, cfg, 5) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "linear"])
@pytest.mark.parametrize(("warmup", "max_steps"), [(0, 1), (0, 2), (4, 5), (4, 6), (4, 12), (30, 250)])
def test_every_schedule_ends_on_its_floor(schedule, warmup, max_steps):
    """Step 0 trains at lr / warmup, the rate never rises after warmup and the last step is at
    the floor; cosine and linear start at lr on the first post-warmup step (unless it is the
    last), wsd keeps lr until its min(n, post-warmup) decay steps, each of them lower."""
    cfg = OptimConfig(lr=3.0, min_lr_ratio=0.1, warmup_steps=warmup, schedule=schedule, decay_fraction=0.25)
    floor = 0.0 if schedule == "linear" else 0.3
    lrs = [lr_at(s, cfg, max_steps) for s in range(max_steps)]
    assert lrs[-1] == pytest.approx(floor, abs=1e-12)
    assert lr_at(max_steps + 3, cfg, max_steps) == pytest.approx(floor, abs=1e-12)  # past the end
    if warmup:
        assert lrs[:warmup] == pytest.approx([3.0 * (s + 1) / warmup for s in range(warmup)])
    post = lrs[warmup:]
    assert all(a >= b for a, b in zip(post, post[1:]))
    if schedule == "wsd":
        n = min(max(1, round(0.25 * max_steps)), len(post))
        assert post[: len(post) - n] == [3.0] * (len(post) - n) and all(lr < 3.0 for lr in post[-n:])
    elif len(post) > 1:
        assert post[0] == 3.0


def test_issue_example_cosine_12_steps_warmup_4_ends_at_floor():
    # was 0.134 x peak at the last step (and WSD 0.4)
    for schedule in ("cosine", "wsd"):
        cfg = OptimConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=4, schedule=schedule)
        assert lr_at(11, cfg, 12) == pytest.approx(0.1)


def test_warmup_not_shorter_than_the_run_is_refused():
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"^optim\.warmup_steps: 30 must be < train\.max_steps=30"):
        load_config(None, ["train.max_steps=30", "optim.warmup_steps=30"])
    with pytest.raises(ValueError, match="warmup_steps"):
        lr_at(0, OptimConfig(warmup_steps=5), 5)


def test_no_decay_on_norms_biases_embeddings():
    model = nn.ModuleDict(
        {"emb": nn.Embedding(10, 4), "lin": nn.Linear(4, 4), "norm": nn.LayerNorm(4)}
    )
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model["lin"].weight)}
    expected = {id(model["emb"].weight), id(model["lin"].bias), id(model["norm"].weight), id(model["norm"].bias)}
    assert {id(p) for p in no_decay["params"]} == expected
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )


def test_mamba_a_log_is_exempt_from_decay():
    from pretrain.config import load_config
    from pretrain.models import build_model

    model = build_model(load_config(None, ["model.vocab_size=32", "model.d_model=16", "model.n_layers=2"]).model)
    decay, _ = param_groups(model, 0.1)
    decayed = {id(p) for p in decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert not any(n.endswith("A_log") for n in names)
    mamba = {"blocks.0.mixer.in_proj_x.weight", "blocks.0.mixer.in_proj_z.weight"}
    assert mamba | {"blocks.0.ffn.w1.weight", "blocks.1.mixer.wq.weight"} <= names
