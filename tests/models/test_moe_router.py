"""MoE routers: the LM loss alone trains them (finite differences in float64, top-1 included)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import MoEConfig
from pretrain.models import build_model
from pretrain.models.layers.moe import MoE, route
from pretrain.models.layers.norm import RMSNorm


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
def test_lm_loss_gradient_of_router_matches_finite_differences(make_cfg, monkeypatch, pattern, top_k, renormalize):
    """With the balance and z-losses off, every router parameter (linear router, GRU input and
    output projections, the shared GRU) gets a non-zero LM-loss gradient equal to central
    differences in float64 along a random direction, with no top-k selection flipping."""
    # RMSNorm and RoPE compute in fp32 by design (for bf16 training); differences at eps 1e-6
    # need fp64 throughout: an fp64 norm and NoPE attention
    monkeypatch.setattr(RMSNorm, "forward", lambda self, x: F.rms_norm(x, (x.shape[-1],), self.weight, self.eps))
    nope = {"attention": {"pos_encoding": "none"}}
    model = _model(make_cfg, pattern, nope, top_k=top_k, renormalize=renormalize).double()
    seen = _record_logits(model)
    normed: dict[str, torch.Tensor] = {}
    # the model returns fp32 logits; the loss is taken from the float64 final norm instead
    model.norm.register_forward_hook(lambda m, args, out: normed.__setitem__("h", out))
    ids = torch.randint(0, model.cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))

    def lm_loss() -> torch.Tensor:
        model(ids)
        logits = F.linear(normed["h"], model.embed.weight)  # tied head, float64
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
        torch.testing.assert_close(analytic, fd, rtol=1e-5, atol=1e-10, msg=name)


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
