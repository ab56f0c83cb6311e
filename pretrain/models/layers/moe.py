"""Mixture-of-Experts FFNs: 'moe' (softmax top-k router) and 'moe_gru' (RMoE).

RMoE (Qiu et al. 2024, "Layerwise Recurrent Router for Mixture-of-Experts"): layer i projects
its input to the router width h (x'_i = W_in,i x, per layer), updates a GRU whose hidden state
is carried PER TOKEN from one MoE layer to the next (h_i = GRU(x'_i, h_{i-1}), h_0 = 0; not
along the sequence, so decoding needs no cache), and scores the experts from it
(logits_i = W_out,i h_i). Both routers then take softmax -> top-k and scale each chosen
expert's output by a routing weight that depends on the logits, so the LM loss trains the router:
  * top_k >= 2: the chosen probabilities renormalised to sum to 1 (Mixtral, RMoE) when
    ``model.moe.renormalize``, else the raw probabilities;
  * top_k = 1: always the raw probability p (Switch Transformer). Renormalising would make
    every weight exactly 1, constant in the logits, and the router would get no gradient
    from the LM loss at all, so ``renormalize`` has no effect there.

The GRU cell is ONE parameter set shared by every 'moe_gru' layer. It lives in a dedicated
module, :class:`RouterGRU`, owned by :class:`~pretrain.models.hybrid.HybridLM` (``router_gru``,
created when the pattern uses 'moe_gru'), not inside any block:
  * the model forward puts its four weight tensors into the ``carry`` dict (keys
    ``router_gru.*``) before the first block, and each 'moe_gru' layer reads them from there,
    beside the hidden state ``carry["router_h"] [B, T, h]``. Nothing is hidden in module
    attributes, and the blocks stay independent modules.
  * pipeline parallel: like the embedding, the GRU belongs to the first stage; later stages
    receive its weights with the rest of the carry, and their gradient flows back through the
    pipeline's backward sends into the one parameter set (no replica to keep in sync).
  * FSDP2: the GRU is a parameter of the root module, unsharded for the whole forward and
    backward, so references to it in the carry stay valid in every block.

Losses and metrics go through the carry too: the Switch load-balancing loss
``coef * E * sum_e f_e P_e`` (f_e: fraction of the N*k token->expert assignments that went to
e, P_e: mean router probability of e; 1 * coef per layer when balanced) and the router z-loss
``coef * mean(logsumexp(logits)^2)`` add into ``carry["aux_loss"]``, and the expert load f
of block b is ``carry["metric/moe_load.b"]`` (detached, [E]).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models.layers.mlp import SwiGLU, ffn_hidden
from pretrain.models.layers.moe_ops import moe_experts
from pretrain.models.registry import register_ffn

if TYPE_CHECKING:
    from pretrain.config import ModelConfig, MoEConfig
    from pretrain.models.context import ForwardContext

GRU_KEYS = ("router_gru.weight_ih", "router_gru.weight_hh", "router_gru.bias_ih", "router_gru.bias_hh")
"""Carry keys of the shared GRU's weights (torch.nn.GRUCell's names and layout)."""


def gru_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """One GRU step with torch.nn.GRUCell's equations and weight layout (gates r, z, n):
    r = sig(W_ir x + b_ir + W_hr h + b_hr), z = sig(... z ...),
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h."""
    gi = F.linear(x, w_ih, b_ih)  # [..., 3h]
    gh = F.linear(h, w_hh, b_hh)
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h


class RouterGRU(nn.Module):
    """The GRU cell (input and hidden width h) shared by all 'moe_gru' layers of a model."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.weight_ih = nn.Parameter(torch.empty(3 * hidden, hidden))
        self.weight_hh = nn.Parameter(torch.empty(3 * hidden, hidden))
        self.bias_ih = nn.Parameter(torch.empty(3 * hidden))
        self.bias_hh = nn.Parameter(torch.empty(3 * hidden))

    def carry(self) -> dict[str, Tensor]:
        """The weights as the carry entries 'moe_gru' layers read (see the module docstring)."""
        return dict(zip(GRU_KEYS, (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)))

    def init_weights(self) -> None:
        """torch.nn.GRUCell's default: every weight and bias ~ U(-1/sqrt(h), 1/sqrt(h))."""
        bound = 1.0 / math.sqrt(self.hidden)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)


def uses_router_gru(cfg: ModelConfig) -> bool:
    """Whether a model of this config needs the shared :class:`RouterGRU`."""
    return any(ffn == "moe_gru" for _, ffn in cfg.pattern())


def route(logits: Tensor, top_k: int, renormalize: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax top-k routing (Shazeer et al. 2017; Switch, Fedus et al. 2021; Mixtral).

    ``logits [N, E]`` -> ``probs [N, E]`` (softmax, in fp32 or fp64 when the logits are
    fp64), ``expert_idx [N, k]`` (int64, top-k of probs, descending) and ``weight [N, k]``:
    the chosen probabilities, renormalised to sum to 1 when ``renormalize`` and k >= 2. At
    k = 1 the weight is always the raw probability (Switch): renormalised it would be the
    constant 1 and the router would get no gradient from the loss of the experts' output.
    """
    probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    top, idx = probs.topk(top_k, dim=-1)
    if renormalize and top_k > 1:
        top = top / top.sum(dim=-1, keepdim=True)
    return probs, idx, top


def balance_loss(probs: Tensor, expert_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Switch load balancing: ``E * sum_e f_e * P_e`` and the load f [E] (detached), with f_e
    the fraction of token->expert assignments routed to e and P_e the mean probability of e."""
    n_experts = probs.shape[-1]
    load = torch.bincount(expert_idx.flatten(), minlength=n_experts).to(probs.dtype) / expert_idx.numel()
    return n_experts * (load * probs.mean(dim=0)).sum(), load


class MoE(nn.Module):
    """Dropless top-k MoE of SwiGLU experts, with an optional always-on shared expert.

    ``recurrent``: route with the layerwise GRU (RMoE) instead of one linear layer.
    """

    uses_carry = True

    def __init__(self, d_model: int, hidden: int, cfg: MoEConfig, name: str, recurrent: bool) -> None:
        super().__init__()
        self.name = name
        self.top_k = cfg.top_k
        self.renormalize = cfg.renormalize
        self.aux_loss_coef = cfg.aux_loss_coef
        self.z_loss_coef = cfg.z_loss_coef
        self.recurrent = recurrent
        e = cfg.n_experts
        if recurrent:
            self.router_in = nn.Linear(d_model, cfg.router_hidden, bias=False)  # x -> GRU input
            self.router_out = nn.Linear(cfg.router_hidden, e, bias=False)  # GRU state -> logits
        else:
            self.router = nn.Linear(d_model, e, bias=False)
        self.w1 = nn.Parameter(torch.empty(e, d_model, hidden))  # gate
        self.w3 = nn.Parameter(torch.empty(e, d_model, hidden))  # up
        self.w2 = nn.Parameter(torch.empty(e, hidden, d_model))  # down (into the residual stream)
        self.shared = SwiGLU(d_model, hidden) if cfg.shared_expert else None

    def _logits(self, x: Tensor, carry: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Router logits of ``x [B, T, d]``; the GRU router also advances carry["router_h"]."""
        if not self.recurrent:
            return self.router(x), carry
        missing = [k for k in GRU_KEYS if k not in carry]
        if missing:
            raise KeyError(f"'moe_gru' reads the shared GRU from the carry (HybridLM.router_gru); missing {missing}")
        xin = self.router_in(x)  # [B, T, h]
        h = carry.get("router_h")
        if h is None:
            h = torch.zeros_like(xin)  # before the first MoE layer
        h = gru_cell(xin, h.to(xin.dtype), *(carry[k] for k in GRU_KEYS))
        return self.router_out(h), {**carry, "router_h": h}

    def forward(self, x: Tensor, ctx: ForwardContext, carry: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``x [B, T, d]`` -> ``[B, T, d]``; adds the load-balancing (and z-) loss to
        carry["aux_loss"] and the detached expert load to carry["metric/moe_load.<block>"]."""
        b, t, d = x.shape
        logits, carry = self._logits(x, carry)
        logits = logits.reshape(b * t, -1)  # [N, E]
        probs, idx, weight = route(logits, self.top_k, self.renormalize)
        flat = x.reshape(b * t, d)
        y = moe_experts(flat, self.w1, self.w3, self.w2, idx, weight)
        if self.shared is not None:
            y = y + self.shared(flat)
        lb, load = balance_loss(probs, idx)
        aux = self.aux_loss_coef * lb
        if self.z_loss_coef > 0:
            aux = aux + self.z_loss_coef * torch.logsumexp(logits.float(), dim=-1).square().mean()
        carry = {**carry, f"metric/moe_load.{self.name}": load.detach()}
        carry["aux_loss"] = carry["aux_loss"] + aux if "aux_loss" in carry else aux
        return y.view(b, t, d), carry

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs of the k active experts (6 x their weights; the stacked expert
        weights are not nn.Linear, so the dense 6N count skips all experts) and of the shared
        GRU cell applied in this layer. For stats.flops_per_token, which so far queries only
        mixers for this hook."""
        _, d, hidden = self.w1.shape
        flops = 6.0 * self.top_k * 3 * d * hidden
        if self.recurrent:
            flops += 6.0 * 2 * 3 * self.router_out.weight.shape[1] ** 2
        return flops

    def activation_elements(self) -> int:
        """Per token: input, logits and probs, and per active expert the gathered input, the
        SwiGLU intermediates and the output (plus the GRU gates and the shared expert)."""
        e, d, hidden = self.w1.shape
        n = d + 2 * e + self.top_k * (2 * d + 4 * hidden)
        if self.recurrent:
            n += 8 * self.router_out.weight.shape[1]
        if self.shared is not None:
            n += self.shared.activation_elements()
        return n

    def init_weights(self, init_std: float, out_std: float) -> None:
        for lin in (self.router_in, self.router_out) if self.recurrent else (self.router,):
            nn.init.normal_(lin.weight, std=init_std)
        nn.init.normal_(self.w1, std=init_std)
        nn.init.normal_(self.w3, std=init_std)
        nn.init.normal_(self.w2, std=out_std)
        if self.shared is not None:
            self.shared.init_weights(init_std, out_std)


def _expert_hidden(cfg: ModelConfig) -> int:
    return cfg.moe.expert_hidden or ffn_hidden(cfg)


@register_ffn("moe")
def _moe(cfg: ModelConfig, layer_idx: int) -> MoE:
    return MoE(cfg.d_model, _expert_hidden(cfg), cfg.moe, str(layer_idx), recurrent=False)


@register_ffn("moe_gru")
def _moe_gru(cfg: ModelConfig, layer_idx: int) -> MoE:
    return MoE(cfg.d_model, _expert_hidden(cfg), cfg.moe, str(layer_idx), recurrent=True)
