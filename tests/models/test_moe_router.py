"""MoE routers: the LM loss alone trains them (finite differences in float64, top-1 included),
and the 'global' load-balancing loss equals a naive loop over all layers' router outputs
concatenated (RMoE's reference, Hugging Face Mixtral's load_balancing_loss_func)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ConfigError, MoEConfig, load_config
from pretrain.models import build_model
from pretrain.models.layers.moe import MoE, route


def _model(make_cfg, pattern, model=None, **moe):
    """A tiny model (4 experts of width 16, GRU width 8), balance and z-losses off unless
    given; ``model``: further ModelConfig fields."""
    fields = dict(n_experts=4, top_k=2, expert_hidden=16, router_hidden=8, aux_loss_coef=0.0, z_loss_coef=0.0)
    fields.update(moe)
    torch.manual_seed(0)
    return build_model(make_cfg(pattern, init_std=0.2, moe=MoEConfig(**fields), **(model or {})))


def _record_logits(model) -> dict[str, torch.Tensor]:
    """Block name -> its router logits [B, T, E] of the latest forward, recorded by hooks."""
    seen: dict[str, torch.Tensor] = {}
    for name, block in model.blocks.items():
        if isinstance(block.ffn, MoE):
            head = block.ffn.router_out if block.ffn.recurrent else block.ffn.router
            head.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, out))
    return seen


def _router_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if "router" in n}


ROUTER_CASES = [
    (pattern, k, renorm)
    for pattern in ("attn:moe", "attn:moe_gru attn:moe_gru")  # two GRU steps: W_hh is used
    for k in (1, 2, 4)
    for renorm in (True, False)
]


@pytest.mark.parametrize(("pattern", "top_k", "renormalize"), ROUTER_CASES)
def test_lm_loss_gradient_of_router_matches_finite_differences(make_cfg, pattern, top_k, renormalize):
    """With the balance and z-losses off, every router parameter (linear router, GRU input and
    output projections, the shared GRU) gets a non-zero LM-loss gradient equal to central
    differences in float64 along a random direction, with no top-k selection flipping."""
    model = _model(make_cfg, pattern, top_k=top_k, renormalize=renormalize).double()  # RoPE attention
    seen = _record_logits(model)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))

    def lm_loss() -> torch.Tensor:
        logits = model(ids)
        assert logits.dtype == torch.float64  # norms, rotations and logits never round down to fp32
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    def chosen() -> list[torch.Tensor]:
        return [seen[b].topk(top_k, dim=-1).indices.sort(dim=-1).values for b in sorted(seen)]

    params = _router_params(model)
    grads = torch.autograd.grad(lm_loss(), list(params.values()))
    base = chosen()
    g = torch.Generator().manual_seed(2)
    eps = 1e-6
    for (name, p), grad in zip(params.items(), grads):
        assert grad.norm() > 1e-6, f"{name}: no gradient from the LM loss"
        v = torch.randn(p.shape, generator=g, dtype=p.dtype)
        with torch.no_grad():
            p.add_(eps * v)
            up = lm_loss()
            assert all(torch.equal(a, b) for a, b in zip(chosen(), base)), f"{name}: selection flipped"
            p.sub_(2 * eps * v)
            down = lm_loss()
            assert all(torch.equal(a, b) for a, b in zip(chosen(), base)), f"{name}: selection flipped"
            p.add_(eps * v)
        fd = (up - down) / (2 * eps)
        analytic = (grad * v).sum()
        assert abs(analytic) > 1e-6, name
        # central differences at eps 1e-6 of a loss near 5 carry ~5e-10 of float64 rounding
        torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=2e-9, msg=f"{name}: {analytic.item()} vs {fd.item()}")


def test_route_weights_renormalised_raw_and_switch_top1():
    """k >= 2: renormalised to sum to 1 or the raw probabilities; k = 1: the raw probability
    either way (a renormalised top-1 weight would be the constant 1)."""
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    p = logits.exp() / logits.exp().sum(-1, keepdim=True)
    for k in (1, 2, 5):
        for renorm in (True, False):
            _, idx, weight = route(logits, k, renorm)
            raw = p.gather(1, idx)
            expected = raw / raw.sum(-1, keepdim=True) if renorm and k > 1 else raw
            torch.testing.assert_close(weight, expected)
            assert weight.dtype == torch.float64


def _naive_global_balance(logits_per_layer: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Mixtral's load_balancing_loss_func, one token at a time: the router logits of all
    layers concatenated [L*N, E]; tokens_per_expert[j, e] = share of the L*N tokens whose
    j-th choice is e; router_prob[e] = mean probability; loss = E * sum_{j,e} of the product."""
    cat = torch.cat([x.reshape(-1, x.shape[-1]) for x in logits_per_layer]).double()
    n, e = cat.shape
    probs = torch.softmax(cat, dim=-1)
    counts = torch.zeros(top_k, e, dtype=torch.float64)
    for t in range(n):
        order = sorted(range(e), key=lambda i: -probs[t, i].item())
        for j in range(top_k):
            counts[j, order[j]] += 1
    tokens_per_expert = counts / n
    router_prob = probs.sum(0) / n
    return e * (tokens_per_expert * router_prob[None]).sum()


def test_global_balance_loss_matches_naive_concatenation(make_cfg):
    """Value and gradient of the 'global' loss over MoE blocks 0, 1, 3 (a dense block between),
    plus each layer's z-loss; the per-layer expert loads are still reported."""
    coef, z_coef, k = 0.1, 0.01, 2
    model = _model(
        make_cfg, "attn:moe_gru attn:moe attn:mlp attn:moe_gru", top_k=k, aux_loss_coef=coef, z_loss_coef=z_coef,
        balance="global",
    )
    seen = _record_logits(model)
    ids = torch.randint(0, model.cfg.vocab_size, (3, 5), generator=torch.Generator().manual_seed(4))
    _, aux = model(ids, return_aux=True)
    layers = [seen[b] for b in ("0", "1", "3")]
    ref = coef * _naive_global_balance(layers, k)
    ref = ref + sum(z_coef * torch.logsumexp(x.double(), -1).square().mean() for x in layers)
    torch.testing.assert_close(aux["aux_loss"].double(), ref)
    params = list(_router_params(model).values())
    got = torch.autograd.grad(aux["aux_loss"], params, retain_graph=True)
    want = torch.autograd.grad(ref, params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-9)
    assert sorted(aux) == ["aux_loss", "metric/moe_load.0", "metric/moe_load.1", "metric/moe_load.3"]
    for name, x in zip(("0", "1", "3"), layers):
        chosen = x.reshape(-1, 4).topk(k, -1).indices.flatten()
        torch.testing.assert_close(aux[f"metric/moe_load.{name}"], torch.bincount(chosen, minlength=4) / chosen.numel())


def test_global_balance_sums_ride_in_the_carry_across_a_stage_split(make_cfg):
    """Blocks run as two pipeline stages that hand over only the carry give the full model's
    aux loss; the running sums are in the carry between the stages and gone at the end."""
    model = _model(make_cfg, "attn:moe_gru attn:moe_gru attn:moe attn:moe_gru", aux_loss_coef=0.1, balance="global")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, full = model(ids, return_aux=True)
        h = model.embed(ids)
        ctx = model._context(h, None, None)
        carry = model.router_gru.carry()
        for name in ("0", "1"):
            h, carry = model.blocks[name](h, ctx, carry)
        assert {"moe_balance.load_sum", "moe_balance.prob_sum"} <= set(carry) and "aux_loss" not in carry
        for name in ("2", "3"):
            h, carry = model.blocks[name](h, ctx, carry)
    assert not any(key.startswith("moe_balance") for key in carry)
    torch.testing.assert_close(carry["aux_loss"], full["aux_loss"])


def test_balance_modes_agree_on_one_layer_up_to_top_k(make_cfg):
    """With a single MoE layer, 'global' is Mixtral's k * (Switch's per-layer loss)."""
    losses = {}
    for balance in ("per_layer", "global"):
        model = _model(make_cfg, "attn:moe", top_k=3, aux_loss_coef=1.0, balance=balance)
        _, aux = model(torch.arange(12).reshape(2, 6), return_aux=True)
        losses[balance] = aux["aux_loss"]
    torch.testing.assert_close(losses["global"], 3 * losses["per_layer"])


def test_bad_balance_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model\.moe\.balance"):
        load_config(None, ["model.layer_pattern='attn:moe'", "model.moe.balance='sum'"])
