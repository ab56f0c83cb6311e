"""Mixture-of-Experts FFNs ('moe', 'moe_gru' = RMoE): grouped experts vs a per-token loop, the
router, the layerwise GRU vs torch.nn.GRUCell, the auxiliary loss, decoding, packing, training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import GLAConfig, MoEConfig, load_config
from pretrain.models import build_model, count_parameters
from pretrain.models.context import ForwardContext
from pretrain.models.layers.moe import MoE, route
from kernels.moe import moe_experts
from tests.models.util import decode as _decode

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _moe_cfg(make_cfg, pattern, model=None, **moe):
    """A tiny model with 4 experts (top-2, hidden 16) and a router GRU of width 8; ``model``:
    further ModelConfig fields."""
    fields = dict(n_experts=4, top_k=2, expert_hidden=16, router_hidden=8)
    fields.update(moe)
    return make_cfg(pattern, init_std=0.2, moe=MoEConfig(**fields), **(model or {}))


def _naive_experts(x, w1, w3, w2, idx, weight):
    """y[n] = sum_j weight[n, j] * SwiGLU_{idx[n, j]}(x[n]), one token at a time."""
    rows = []
    for n in range(x.shape[0]):
        y = torch.zeros_like(x[n])
        for j in range(idx.shape[1]):
            e = idx[n, j]
            y = y + weight[n, j] * ((F.silu(x[n] @ w1[e]) * (x[n] @ w3[e])) @ w2[e])
        rows.append(y)
    return torch.stack(rows)


def test_grouped_experts_match_per_token_loop(nan_poison):
    g = torch.Generator().manual_seed(0)
    n, d, h, e, k = 13, 8, 12, 5, 2
    x = torch.randn(n, d, generator=g)
    w1, w3 = torch.randn(e, d, h, generator=g), torch.randn(e, d, h, generator=g)
    w2 = torch.randn(e, h, d, generator=g)
    idx = torch.stack([torch.randperm(e - 1, generator=g)[:k] for _ in range(n)])  # expert 4 unused
    weight = torch.rand(n, k, generator=g)
    inputs = [t.requires_grad_() for t in (x, w1, w3, w2)]
    weight.requires_grad_()
    got = moe_experts(*inputs, idx, weight)
    ref = _naive_experts(*inputs, idx, weight)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn(n, d, generator=g)
    grads = torch.autograd.grad(got, [*inputs, weight], dy)
    ref_grads = torch.autograd.grad(ref, [*inputs, weight], dy)
    for name, a, b in zip(("x", "w1", "w3", "w2", "weight"), grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert grads[1][4].abs().sum() == 0  # the unused expert gets a zero gradient


def test_grouped_experts_reject_bad_shapes():
    x, w = torch.randn(3, 4), torch.randn(2, 4, 6)
    idx, weight = torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    with pytest.raises(ValueError, match="w2"):
        moe_experts(x, w, w, torch.randn(2, 4, 6), idx, weight)
    with pytest.raises(ValueError, match="expert_idx"):
        moe_experts(x, w, w, torch.randn(2, 6, 4), idx.int(), weight)


def test_router_softmax_topk_renormalised():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 6, generator=g)
    probs, idx, weight = route(logits, 3)
    for n in range(9):
        p = [v / sum(torch.exp(logits[n]).tolist()) for v in torch.exp(logits[n]).tolist()]
        best = sorted(range(6), key=lambda i: -p[i])[:3]
        assert idx[n].tolist() == best
        total = sum(p[i] for i in best)
        torch.testing.assert_close(weight[n], torch.tensor([p[i] / total for i in best]))
    torch.testing.assert_close(probs.sum(-1), torch.ones(9))


def test_moe_layer_with_shared_expert_matches_naive(make_cfg):
    cfg = _moe_cfg(make_cfg, "attn:moe", shared_expert=True)
    torch.manual_seed(0)
    layer = build_model(cfg).blocks["0"].ffn
    x = torch.randn(2, 5, cfg.d_model)
    y, carry = layer(x, ForwardContext(positions=torch.zeros(2, 5, dtype=torch.long)), {})
    flat = x.reshape(10, -1)
    probs = torch.softmax(flat @ layer.router.weight.T, dim=-1)
    top, idx = probs.topk(2, dim=-1)
    ref = _naive_experts(flat, layer.w1, layer.w3, layer.w2, idx, top / top.sum(-1, keepdim=True))
    ref = ref + layer.shared(flat)
    torch.testing.assert_close(y.reshape(10, -1), ref, rtol=1e-5, atol=1e-5)
    assert set(carry) == {"aux_loss", "metric/moe_load.0"}


def _capture_router(model):
    """Per MoE block: its FFN input and its router logits, recorded by hooks."""
    seen: dict[str, dict] = {}
    for name, block in model.blocks.items():
        ffn = block.ffn
        if not isinstance(ffn, MoE):
            continue
        rec = seen.setdefault(name, {})
        ffn.register_forward_pre_hook(lambda m, args, rec=rec: rec.__setitem__("x", args[0]))
        head = ffn.router_out if ffn.recurrent else ffn.router
        head.register_forward_hook(lambda m, args, out, rec=rec: rec.__setitem__("logits", out))
    return seen


def test_gru_state_carried_across_layers_matches_grucell(make_cfg):
    """The router logits of every 'moe_gru' layer equal a manual loop that applies one
    torch.nn.GRUCell (the model's shared weights) layer by layer; a 'moe' layer between them
    passes the GRU state through."""
    cfg = _moe_cfg(make_cfg, "attn:moe_gru mamba:moe_gru swa:moe attn:moe_gru")
    torch.manual_seed(0)
    model = build_model(cfg)
    seen = _capture_router(model)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    with torch.no_grad():
        model(ids)
        cell = torch.nn.GRUCell(8, 8)
        cell.load_state_dict(model.router_gru.state_dict())
        h = torch.zeros(14, 8)
        for name in ("0", "1", "3"):
            ffn = model.blocks[name].ffn
            x = seen[name]["x"].reshape(14, -1)
            h = cell(x @ ffn.router_in.weight.T, h)
            torch.testing.assert_close(seen[name]["logits"].reshape(14, -1), h @ ffn.router_out.weight.T)
        x = seen["2"]["x"].reshape(14, -1)
        torch.testing.assert_close(seen["2"]["logits"].reshape(14, -1), x @ model.blocks["2"].ffn.router.weight.T)
    # one GRU parameter set, owned by the model, not by any block
    gru_params = [n for n, _ in model.named_parameters() if "router_gru" in n]
    assert sorted(gru_params) == [f"router_gru.{w}" for w in ("bias_hh", "bias_ih", "weight_hh", "weight_ih")]


def test_aux_loss_and_load_match_switch_formula(make_cfg):
    cfg = _moe_cfg(make_cfg, "attn:moe_gru mamba:moe", aux_loss_coef=0.1, z_loss_coef=0.01)
    torch.manual_seed(0)
    model = build_model(cfg)
    seen = _capture_router(model)
    ids = torch.randint(0, cfg.vocab_size, (3, 6))
    _, aux = model(ids, return_aux=True)
    expected = 0.0
    for name in ("0", "1"):
        logits = seen[name]["logits"].reshape(18, 4).detach().double()
        probs = torch.softmax(logits, -1)
        chosen = F.one_hot(probs.topk(2, -1).indices, 4).sum(1).double()  # [N, E] 0/1
        load = chosen.sum(0) / (18 * 2)
        expected += 0.1 * 4 * (load * probs.mean(0)).sum() + 0.01 * (torch.logsumexp(logits, -1) ** 2).mean()
        torch.testing.assert_close(aux[f"metric/moe_load.{name}"].double(), load)
    torch.testing.assert_close(aux["aux_loss"].double(), expected)
    assert aux["aux_loss"].requires_grad and not aux["metric/moe_load.0"].requires_grad
    assert not any(k.startswith("router") for k in aux)  # the GRU weights stay inside the model


def test_every_parameter_gets_a_gradient_and_meta_init(make_cfg, nan_poison):
    cfg = _moe_cfg(make_cfg, "attn:moe_gru mamba:moe_gru swa:moe", shared_expert=True)  # 2 GRU steps: W_hh used
    torch.manual_seed(3)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))
    logits, aux = model(ids, return_aux=True)
    (F.cross_entropy(logits.flatten(0, 1), ids.flatten()) + aux["aux_loss"]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.device("meta"):
        meta = build_model(cfg)
    meta.to_empty(device="cpu")  # NaN-poisoned: init_weights must write every value
    torch.manual_seed(3)
    meta.init_weights()
    for name, p in meta.state_dict().items():
        torch.testing.assert_close(p, model.state_dict()[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("pattern", ["attn:moe_gru mamba:moe_gru", "swa:moe mamba:moe_gru"])
def test_decoding_parity(make_cfg, rel_err, pattern):
    cfg = _moe_cfg(make_cfg, pattern, shared_expert=True)
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    positions = torch.stack([torch.cat([torch.arange(4), torch.arange(7)]), torch.arange(11)])
    with torch.no_grad():
        full = model(ids)
        assert rel_err(_decode(model, ids, [1] * 11), full) <= 1e-4
        assert rel_err(_decode(model, ids, [3, 1, 5, 2]), full) <= 1e-4
        packed = model(ids, positions)
        assert rel_err(_decode(model, ids, [2, 3, 1, 5], positions), packed) <= 1e-4


def test_packed_equals_separate(make_cfg):
    cfg = _moe_cfg(make_cfg, "attn:moe_gru mamba:moe_gru")
    torch.manual_seed(0)
    model = build_model(cfg)
    docs = [torch.randint(0, cfg.vocab_size, (n,)) for n in (5, 8)]
    positions = torch.cat([torch.arange(5), torch.arange(8)])[None]
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], positions)[0]
        torch.testing.assert_close(packed[:5], model(docs[0][None])[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[5:], model(docs[1][None])[0], rtol=1e-5, atol=1e-5)


def test_parameter_count_and_active_flops(make_cfg):
    cfg = _moe_cfg(make_cfg, "attn:moe_gru attn:moe", shared_expert=True)
    with torch.device("meta"):
        model = build_model(cfg)
    d, h, e, r = cfg.d_model, 16, 4, 8
    experts = e * 3 * d * h + 3 * d * h  # routed + shared
    counts = count_parameters(model)
    assert counts["ffn.moe_gru"] == experts + d * r + r * e
    assert counts["ffn.moe"] == experts + d * e
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in model.router_gru.parameters()) == 2 * 3 * r * r + 2 * 3 * r
    # the stacked routed experts are outside the dense 6N count; the hook adds the top-2 only
    assert model.blocks["1"].ffn.flops_per_token(32) == 6 * 2 * 3 * d * h
    assert model.blocks["0"].ffn.flops_per_token(32) == 6 * 2 * 3 * d * h + 6 * 2 * 3 * r * r


@pytest.mark.parametrize("name", ["rmoe_tiny", "rmoe", "hybrid_mix"])
def test_configs_build(name):
    cfg = load_config(CONFIGS / f"{name}.toml")
    assert "moe_gru" in {f for _, f in cfg.model.pattern()}
    cfg.model.vocab_size = cfg.data.vocab_size
    with torch.device("meta"):
        model = build_model(cfg.model)
    assert model.router_gru is not None


def test_hybrid_mix_decoding_parity(make_cfg, rel_err):
    """configs/hybrid_mix.toml's pattern (Mamba, GLA, SWA, attention; RMoE and MLP FFNs) at
    tiny width, with prompts longer than the window and the GLA chunk."""
    gla = GLAConfig(n_heads=2, chunk_size=4)
    cfg = _moe_cfg(make_cfg, "mamba:moe_gru gla:mlp swa:moe_gru attn:mlp", model={"gla": gla})
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.no_grad():
        full = model(ids)
        assert rel_err(_decode(model, ids, [1] * 11), full) <= 1e-4
        assert rel_err(_decode(model, ids, [3, 1, 5, 2]), full) <= 1e-4


def test_rmoe_trains_and_logs_expert_load(small_corpus, prepared_dir, tmp_path):
    from pretrain.train.trainer import train
    from tests.conftest import losses, tiny_overrides

    overrides = tiny_overrides(
        small_corpus, prepared_dir, tmp_path,
        **{
            "model.layer_pattern": "'attn:moe_gru mamba:moe_gru'",
            "model.moe.n_experts": 4,
            "model.moe.expert_hidden": 32,
            "model.moe.router_hidden": 16,
            "model.moe.balance": "'global'",  # as in the RMoE configs
            "train.max_steps": 6,
            "checkpoint.interval": 0,
            "train.eval_interval": 0,
            "optim.lr": 1e-2,
        },
    )
    train(load_config(None, overrides))
    logged = losses(tmp_path)
    assert sum(v for _, v in logged[-2:]) / 2 < logged[0][1]
    records = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    loads = [r["moe_load.1"] for r in records if "moe_load.1" in r]
    assert len(loads) >= 6 and all(len(v) == 4 and abs(sum(v) - 1) < 1e-5 for v in loads)
    assert any("aux_loss" in r for r in records)
