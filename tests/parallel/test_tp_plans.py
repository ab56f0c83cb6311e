"""Every tensor-parallel plan against the unsplit layer, in one process (tests/parallel/
tp_reference.py): outputs, the carry and every gradient (input, carry, parameters) of each
block's mixer and FFN, at tp 2 and 4, for every family's layer types."""

from __future__ import annotations

import pytest
import torch

from parallel.tensor import FFN_PLANS, MIXER_PLANS
from pretrain.config import ConfigError, load_config
from pretrain.models import build_model
from tests.parallel.tp_reference import simulate_region

# Mamba-2 with 8 heads of 16 (init_std 0.2: the gated norm's inputs well above its eps)
_M2 = ["model.d_model=64", "model.n_layers=2", "model.mamba2.d_state=8", "model.mamba2.head_dim=16",
       "model.mamba2.chunk_size=4", "model.init_std=0.2"]

# config, overrides: every mixer and FFN type with a plan appears in one of them
CASES = {
    "llama_gqa": ("configs/llama_tiny.toml", []),  # 8 heads / 2 KV heads: tp 4 replicates KV
    "sambay": ("configs/sambay_tiny.toml", []),
    "diff": ("configs/sambay_tiny.toml", ['model.layer_pattern=["diff_swa","diff_attn_kv","diff_xattn","diff_attn"]',
                                          "model.n_layers=4", "model.attention.n_heads=8"]),
    # Mamba-2 B/C groups: 1 (replicated, the norm's sums of squares all-reduced), 2 (split at tp 2, shared by rank
    # pairs at tp 4), 4 (split); the memory layer with the GMU reading 4 groups
    "mamba2": ("configs/mamba2_tiny.toml", _M2),
    "mamba2_g2": ("configs/mamba2_tiny.toml", [*_M2, "model.mamba2.n_groups=2"]),
    "mamba2_g4": ("configs/mamba2_tiny.toml", [*_M2, "model.mamba2.n_groups=4"]),
    "mamba2_mem": ("configs/mamba2_tiny.toml", [*_M2, "model.mamba2.n_groups=4",
                                                'model.layer_pattern=["mamba2_mem:none","gmu:none"]']),
    # 4 heads, chunks of 8 so that the 12 tokens cross a chunk boundary
    "gla": ("configs/gla_tiny.toml", ["model.n_layers=2", "model.gla.n_heads=4", "model.gla.chunk_size=8"]),
    "sambay_gla": ("configs/sambay_tiny.toml", ['model.layer_pattern=["gla","swa","gla_mem","attn_kv","gmu","xattn"]',
                                                "model.n_layers=6", "model.gla.n_heads=4", "model.gla.chunk_size=8"]),
    # segments and memory chunks of 4 tokens, so that documents of 5 and 7 cross them; short windows
    "titans": ("configs/titans_mac_tiny.toml", ['model.layer_pattern=["mac","mag","mal"]', "model.n_layers=3",
                                                "model.titans.segment_size=4", "model.titans.chunk_size=4",
                                                "model.titans.n_persistent=2", "model.attention.window=6"]),
    # 2 memory heads: split at tp 2, replicated at tp 4 (memory.out column-parallel, no reduce-scatter)
    "titans_mag_mem2": ("configs/titans_mac_tiny.toml", ["model.layer_pattern=mag", "model.n_layers=1",
                                                         "model.titans.n_heads=2", "model.titans.chunk_size=4",
                                                         "model.titans.n_persistent=2", "model.attention.window=6"]),
    "titans_mac_none": ("configs/titans_mac_tiny.toml", ["model.n_layers=1", "model.titans.mac_output='none'",
                                                         "model.titans.segment_size=4", "model.titans.chunk_size=4"]),
    "rmoe": ("configs/rmoe_tiny.toml", ["model.d_model=32", "model.moe.router_hidden=8", "model.moe.expert_hidden=8",
                                        "model.n_layers=3", "model.moe.z_loss_coef=1e-2"]),  # 'global' balance
    "moe": ("configs/rmoe_tiny.toml", ["model.d_model=32", "model.moe.expert_hidden=8", "model.n_layers=2",
                                       "model.layer_pattern='attn:moe'", "model.moe.balance='per_layer'",
                                       "model.moe.top_k=1", "model.moe.shared_expert=true"]),
}


def _model(path: str, overrides: list[str]):
    cfg = load_config(path, ["model.vocab_size=64", *overrides]).model
    torch.manual_seed(0)
    return build_model(cfg).double()


def _block_inputs(model, index: int, ids: torch.Tensor, position_ids: torch.Tensor):
    """Hidden states and carry entering block ``index`` (detached leaves)."""
    h = model.embed(ids)
    ctx = model._context(h, position_ids, None)
    carry = model.router_gru.carry() if model.router_gru is not None else {}
    with torch.no_grad():
        for block in list(model.blocks.values())[:index]:
            h, carry = block(h, ctx, carry)
    leaf = {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in carry.items()}
    return h.detach(), ctx, leaf


def _run(module, args, plan, tp):
    out = module(*args) if plan is None else simulate_region(module, plan, tp, args)
    y, carry = out if getattr(module, "uses_carry", False) else (out, {})
    torch.manual_seed(1)
    loss = (y * torch.randn(y.shape, dtype=y.dtype)).sum()
    for k, v in sorted(carry.items()):
        if v.requires_grad:
            loss = loss + (v * torch.randn(v.shape, dtype=v.dtype)).sum()
    tensors = [a for a in args if torch.is_tensor(a) and a.requires_grad]
    carry_in = args[-1] if getattr(module, "uses_carry", False) else {}
    tensors += [v for _, v in sorted(carry_in.items()) if v.requires_grad]
    params = [p for _, p in sorted(module.named_parameters())]
    grads = torch.autograd.grad(loss, tensors + params, allow_unused=True)
    return y, carry, grads


def _check(module, args_fn, plan, tp, what):
    y0, c0, g0 = _run(module, args_fn(), None, tp)
    y1, c1, g1 = _run(module, args_fn(), plan, tp)
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-9, msg=lambda m, w=f"{what}: output": f"{w}\n{m}")
    assert c1.keys() == c0.keys(), what
    for k in c0:
        torch.testing.assert_close(c1[k], c0[k], rtol=1e-6, atol=1e-9, msg=lambda m, w=f"{what}: carry {k}": f"{w}\n{m}")
    for i, (a, b) in enumerate(zip(g0, g1)):
        assert (a is None) == (b is None), f"{what}: gradient {i}"
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9, msg=lambda m, w=f"{what}: gradient {i}": f"{w}\n{m}")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("tp", [2, 4])
def test_plans_equal_unsplit_layer(case, tp):
    path, overrides = CASES[case]
    model = _model(path, overrides)
    cfg = model.cfg
    b, t = 2, 12
    ids = torch.randint(0, cfg.vocab_size, (b, t))
    position_ids = torch.cat([torch.arange(5), torch.arange(7)]).expand(b, t)  # two packed documents
    checked = 0
    for index, block in enumerate(model.blocks.values()):
        h, ctx, carry = _block_inputs(model, index, ids, position_ids)
        mixer_plan = MIXER_PLANS[block.mixer_name](cfg, index, tp)
        x = block.norm1(h).detach()

        def mixer_args():
            xx = x.clone().requires_grad_()
            if getattr(block.mixer, "uses_carry", False):
                return (xx, ctx, None, {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in carry.items()})
            return (xx, ctx, None)

        _check(block.mixer, mixer_args, mixer_plan, tp, f"{case} block {index} {block.mixer_name} tp{tp}")
        checked += 1
        if block.ffn is not None:
            ffn_plan = FFN_PLANS[block.ffn_name](cfg, index, tp)
            x2 = torch.randn_like(x)

            def ffn_args():
                xx = x2.clone().requires_grad_()
                if getattr(block.ffn, "uses_carry", False):
                    return (xx, ctx, {k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in carry.items()})
                return (xx,)

            _check(block.ffn, ffn_args, ffn_plan, tp, f"{case} block {index} {block.ffn_name} tp{tp}")
            checked += 1
    assert checked >= len(model.blocks)


def test_plan_refuses_indivisible_heads():
    cfg = load_config("configs/llama_tiny.toml", ["model.vocab_size=64"]).model
    with pytest.raises(ConfigError, match="model.attention.n_heads"):
        MIXER_PLANS["attn"](cfg, 0, 3)
    with pytest.raises(ConfigError, match="model.ffn_hidden"):
        FFN_PLANS["mlp"](cfg, 0, 7)


def test_gla_and_titans_plans_refuse_indivisible_heads():
    gla = load_config("configs/gla_tiny.toml", ["model.vocab_size=64"]).model  # 2 heads
    with pytest.raises(ConfigError, match="model.gla.n_heads"):
        MIXER_PLANS["gla"](gla, 0, 4)
    with pytest.raises(ConfigError, match="model.gla.n_heads"):
        MIXER_PLANS["gla_mem"](gla, 0, 4)
    titans = load_config("configs/titans_mac_tiny.toml", ["model.vocab_size=64", "model.titans.n_heads=2"]).model
    for name in ("mac", "mal"):
        with pytest.raises(ConfigError, match="model.titans.n_heads"):
            MIXER_PLANS[name](titans, 0, 4)
    MIXER_PLANS["mag"](titans, 0, 4)  # its memory is then replicated: only the attention heads split
    with pytest.raises(ConfigError, match="model.attention.n_heads"):
        MIXER_PLANS["mag"](titans, 0, 8)
def test_moe_plan_refuses_indivisible_expert_hidden():
    cfg = load_config("configs/rmoe_tiny.toml", ["model.vocab_size=64", "model.moe.expert_hidden=12"]).model
    with pytest.raises(ConfigError, match="model.moe.expert_hidden"):
        FFN_PLANS["moe_gru"](cfg, 1, 8)
    FFN_PLANS["moe_gru"](cfg, 1, 4)  # 12 / 4 splits


def test_every_layer_type_has_a_plan_and_a_case():
    """Every mixer and FFN a pattern may name has a plan, and appears in one of CASES."""
    from pretrain.models.registry import FFNS, MIXERS

    assert sorted(MIXER_PLANS) == sorted(MIXERS)
    assert sorted(FFN_PLANS) == sorted(f for f in FFNS if f != "none")
    seen = set()
    for path, overrides in CASES.values():
        seen |= {name for pair in load_config(path, ["model.vocab_size=64", *overrides]).model.pattern() for name in pair}
    assert set(MIXERS) | set(FFN_PLANS) <= seen, sorted(set(MIXERS) | set(FFN_PLANS) - seen)


def test_plan_says_what_tp_replicates():
    """`pretrain plan` names the KV projections kept whole when KV heads are fewer than ranks."""
    from pretrain.plan import format_tp

    cfg = load_config("configs/sambay_tiny.toml", ["model.vocab_size=64"]).model  # 4 heads, 2 KV heads
    at4 = {line.split()[1]: line for line in format_tp(cfg, 4)}
    assert "replicated: wk.weight (each of 2 groups on 2 ranks)" in at4["swa"]
    assert "replicated" not in at4["xattn"]  # queries only
    assert "partial sums in the layer over 4 ranks" in at4["mamba"]  # x_proj's dt, B, C
    assert not any("replicated" in line for line in format_tp(cfg, 2))
