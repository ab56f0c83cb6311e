"""The pipeline split against brute force over every contiguous partition (of half-block units),
the plan's per-stage parameters and FLOPs against the built stage modules, the issue's balance
goal on the large configs, and `pretrain plan` under pp."""

from __future__ import annotations

import dataclasses
import itertools
import random
import re

import pytest
import torch

from parallel.pipeline.schedule import stage_ranks
from parallel.pipeline.split import balanced_cuts, plan_split
from parallel.pipeline.stage import build_stage
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.models import build_model, flops_per_token
from pretrain.models.stats import block_flops, head_flops


def _brute_force(costs, n_stages, first, last):
    """Every partition, ranked by (largest stage, sum of squared stages, cut points)."""
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), n_stages - 1):
        bounds = (0, *cuts, n)
        stage = [sum(costs[bounds[i] : bounds[i + 1]]) for i in range(n_stages)]
        stage[0] += first
        stage[-1] += last
        key = (max(stage), sum(c * c for c in stage), list(cuts))
        best = key if best is None or key < best else best
    return best[2]


def test_balanced_cuts_equal_brute_force_on_random_costs():
    rng = random.Random(0)
    for _ in range(400):
        n = rng.randint(1, 9)
        n_stages = rng.randint(1, n)
        costs = [rng.randint(0, 20) for _ in range(n)]
        first, last = rng.randint(0, 10), rng.randint(0, 30)
        assert balanced_cuts(costs, n_stages, first, last) == _brute_force(costs, n_stages, first, last), (
            costs, n_stages, first, last)


def test_balanced_cuts_refuse_more_stages_than_blocks():
    with pytest.raises(ValueError, match="3 blocks into 4"):
        balanced_cuts([1, 2, 3], 4)


@pytest.mark.parametrize("pp", [2, 3, 4])
def test_stage_ranks_match_torch(pp):
    from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

    loop = generate_stage_to_rank_mapping(pp, 2 * pp, style="loop")
    v = generate_stage_to_rank_mapping(pp, 2 * pp, style="v")
    assert stage_ranks("interleaved_1f1b", pp, 2) == [loop[s] for s in range(2 * pp)]
    assert stage_ranks("zbv", pp, 2) == [v[s] for s in range(2 * pp)]


TINY = ["tiny", "sambay_tiny", "rmoe_tiny", "hybrid_mix"]


def _cfg(name, *overrides):
    return load_config(f"configs/{name}.toml", list(overrides)).with_vocab()


def _cut_points(model_cfg):
    """Every cut point in order: before each block, and inside each block with an FFN."""
    points = []
    for layer, (_, ffn) in enumerate(model_cfg.pattern()):
        points += ([layer] if layer else []) + ([f"{layer}.ffn"] if ffn != "none" else [])
    return points


def _explicit(cfg, cuts):
    return dataclasses.replace(cfg.parallel, pp_split=list(cuts))


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("pp", [2, 3])
def test_plan_split_is_the_best_explicit_split(name, pp):
    """The automatic cuts reach the smallest largest-stage FLOPs of all explicit splits at
    half-block granularity (each costed through parallel.pp_split, which bypasses the search),
    and the stages add up to the whole model's FLOPs per token."""
    cfg = _cfg(name, f"parallel.pp={pp}")
    seq = cfg.data.seq_len
    auto = plan_split(cfg.model, cfg.parallel, seq)
    assert auto.automatic and len(auto.stages) == pp
    total = flops_per_token(cfg.model, seq)["total"]
    assert sum(s.flops_per_token for s in auto.stages) == pytest.approx(total, rel=1e-12)
    bottlenecks = {}
    for cuts in itertools.combinations(_cut_points(cfg.model), pp - 1):
        split = plan_split(cfg.model, _explicit(cfg, cuts), seq)
        assert not split.automatic and split.cuts == cuts
        bottlenecks[cuts] = max(s.flops_per_token for s in split.stages)
    assert max(s.flops_per_token for s in auto.stages) == pytest.approx(min(bottlenecks.values()), rel=1e-9)
    assert auto.imbalance == pytest.approx(bottlenecks[auto.cuts] * pp / total)


@pytest.mark.parametrize("name", ["sambay_d16", "hybrid_mix", "rmoe"])
def test_large_configs_balance_at_pp4(name):
    """The issue's goal: at pp=4 the largest stage is at most 1.15 x the mean (from the stages'
    FLOPs, which add up to the model's), with cuts inside blocks; hybrid_mix (8 blocks, MoE FFN
    halves of 43% of a mean stage) reaches 1.159, the optimum of its half-block partitions, below
    the best whole-block split."""
    cfg = _cfg(name, "parallel.pp=4")
    seq = cfg.data.seq_len
    split = plan_split(cfg.model, cfg.parallel, seq)
    flops = [s.flops_per_token for s in split.stages]
    mean = flops_per_token(cfg.model, seq)["total"] / 4
    assert sum(flops) == pytest.approx(4 * mean, rel=1e-12)
    assert split.imbalance == pytest.approx(max(flops) / mean, rel=1e-12)
    assert any(isinstance(c, str) for c in split.cuts)
    with torch.device("meta"):
        blocks = [sum(block_flops(b, seq).values()) for b in build_model(cfg.model).blocks.values()]
    n = len(blocks)
    whole = min(  # the best whole-block split, by brute force
        max(sum(blocks[a:b]) + (head_flops(cfg.model) if b == n else 0) for a, b in zip((0, *c), (*c, n)))
        for c in itertools.combinations(range(1, n), 3)
    )
    assert max(flops) < whole
    if name == "hybrid_mix":
        assert max(flops) <= 1.16 * mean
    else:
        assert max(flops) <= 1.15 * mean


@pytest.mark.parametrize("cuts", [["1.ffn", 3], ["0.ffn", "1.ffn", "3.ffn"]])
def test_stage_costs_equal_the_built_stages(cuts):
    """Each stage's parameters and FLOPs (of its half-blocks, split on a meta build) equal those
    of the stage module build_stage makes, whose blocks cut inside hold only their half."""
    small = ["model.d_model=32", "model.n_layers=4", "model.moe.n_experts=4", "model.moe.router_hidden=8"]
    cfg = _cfg("hybrid_mix", *small, f"parallel.pp={len(cuts) + 1}", f"parallel.pp_split={cuts}")
    seq = cfg.data.seq_len
    split = plan_split(cfg.model, cfg.parallel, seq)
    for s in split.stages:
        module = build_stage(cfg.model, [0, *cuts], s.index, 0, torch.device("cpu"))
        names = {k for k, _ in module.model.named_parameters()}
        replicas = set(module.replicas)
        assert s.params == sum(p.numel() for k, p in module.model.named_parameters() if k not in replicas)
        flops = sum(sum(block_flops(b, seq).values()) for b in module.model.blocks.values())
        flops += head_flops(cfg.model) if module.is_last else 0.0
        assert s.flops_per_token == pytest.approx(flops, rel=1e-12), s
        held = {(int(k.split(".")[1]), k.split(".")[2]) for k in names if k.startswith("blocks.")}
        want = {(u // 2, m) for u in s.units for m in (("norm1", "mixer") if u % 2 == 0 else ("norm2", "ffn"))}
        assert held == want, s


def test_memory_weight_one_balances_activations():
    cfg = _cfg("sambay_tiny", "parallel.pp=3")
    auto = plan_split(cfg.model, cfg.parallel, cfg.data.seq_len, memory_weight=1.0)
    best = min(
        max(s.activation_bytes for s in plan_split(cfg.model, _explicit(cfg, cuts), cfg.data.seq_len).stages)
        for cuts in itertools.combinations(_cut_points(cfg.model), 2)
    )
    assert max(s.activation_bytes for s in auto.stages) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("name", TINY)
def test_stage_parameters_add_up_to_the_built_model(name):
    cfg = _cfg(name, "parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual_stages=2")
    split = plan_split(cfg.model, cfg.parallel, cfg.data.seq_len)
    torch.manual_seed(0)
    params = dict(build_model(cfg.model).named_parameters())  # a tied weight appears once
    last = len(split.stages) - 1
    pattern = cfg.model.pattern()  # the GRU counts on the first stage with a 'moe_gru' FFN half
    gru_stage = next((s.index for s in split.stages if any(pattern[u // 2][1] == "moe_gru" for u in s.units
                                                          if u % 2)), None)
    half = {"norm1": 0, "mixer": 0, "norm2": 1, "ffn": 1}  # position 2L + half of block L
    for s in split.stages:
        owned = [k for k in params if k.startswith("blocks.")
                 and 2 * int(k.split(".")[1]) + half[k.split(".")[2]] in s.units]
        if s.index == 0:
            owned += [k for k in params if k.startswith("embed.")]
        if s.index == gru_stage:
            owned += [k for k in params if k.startswith("router_gru.")]
        if s.index == last:
            owned += [k for k in params if k.startswith(("norm.", "head."))]
        assert s.params == sum(params[k].numel() for k in owned), s
    assert sum(s.params for s in split.stages) == sum(p.numel() for p in params.values())


def test_plan_prints_the_stages(capsys):
    assert main(["plan", "configs/tiny.toml", "--set", "parallel.pp=2", "--set", "train.micro_batch_size=2"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s+\d", line)]
    assert [r[0] for r in rows] == ["0", "1"]
    cfg = _cfg("tiny")
    torch.manual_seed(0)
    total = sum(p.numel() for p in build_model(cfg.model).parameters())
    assert sum(int(r[3].replace(",", "")) for r in rows) == total
    imbalance = re.search(r"^imbalance\s+([\d.]+)", out, re.M)
    split = plan_split(cfg.model, load_config("configs/tiny.toml", ["parallel.pp=2"]).parallel, cfg.data.seq_len)
    assert imbalance and float(imbalance.group(1)) == pytest.approx(split.imbalance, abs=1e-3)
    # 8 sequences = 1 rank x 2 per micro-batch x 2 micro-batches per round (the 2 stages) x 2 rounds
    assert re.search(r"^batch\s+8 sequences .* 2 pipeline micro-batches x 2 accumulation step", out, re.M)
    # a batch that does not divide is reported, not refused: plan still shows the split
    assert main(["plan", "configs/tiny.toml", "--set", "parallel.pp=2"]) == 0
    assert "train.global_batch_size: 8 is not a multiple" in capsys.readouterr().out


def test_plan_exits_2_naming_the_field(capsys):
    assert main(["plan", "configs/tiny.toml", "--set", "parallel.pp=7"]) == 2
    err = capsys.readouterr().err.strip()
    assert "parallel.pp:" in err and "\n" not in err


def test_plan_prints_half_blocks(capsys):
    """A cut inside block 1 shows as its mixer half ending stage 0 and its FFN half starting stage 1."""
    args = ["--set", "parallel.pp=2", "--set", 'parallel.pp_split=["1.ffn"]']
    assert main(["plan", "configs/rmoe_tiny.toml", *args]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s+\d", line)]
    n = _cfg("rmoe_tiny").model.n_layers
    assert [r[2] for r in rows] == ["0-1.mixer", f"1.ffn-{n - 1}"]
    assert "cuts ['1.ffn'] (given by parallel.pp_split)" in out
