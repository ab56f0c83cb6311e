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
  * pipeline parallel: the weights never cross a stage boundary; every stage with a 'moe_gru'
    layer holds its own copy of the GRU and puts it into its carry, and the pipeline engine
    (parallel/pipeline/stage.py, SharedParamSync) sums the copies' gradients after each backward,
    so they take identical steps and stay equal, like a tied embedding on the first and last
    stage. Only the router hidden state ``router_h`` crosses the boundary.
  * FSDP2: the GRU is a parameter of the root module, unsharded for the whole forward and
    backward, so references to it in the carry stay valid in every block.

Losses and metrics go through the carry too. The Switch load-balancing loss of a layer is
``E * sum_e f_e P_e`` (f_e: fraction of the N*k token->expert assignments that went to e, a
constant; P_e: mean router probability of e over the N tokens); ``model.moe.balance`` picks
how the L MoE layers of a model combine it:
  * 'per_layer' (Switch, Megatron): ``coef * sum_i E sum_e f_ie P_ie``, L * coef when balanced.
  * 'global' (RMoE's reference, Hugging Face Mixtral's ``load_balancing_loss_func``): one loss
    over the router outputs of all layers concatenated along the tokens,
    ``coef * E * sum_e F_e P_e`` with F_e the fraction of the L*N tokens that chose e among
    their top k (= k * mean_i f_ie) and P_e = mean_i P_ie (every layer routes the same N
    tokens), k * coef when balanced. Each layer adds f_i and P_i to running sums in the carry
    (``moe_balance.load_sum``, ``moe_balance.prob_sum``; a pipeline stage forwards them with
    the rest of the carry) and the model's last MoE layer turns them into the loss. Only the
    load averaged over layers is balanced: one layer's skew may offset another's.
  Converting coefficients: the balanced values match with coef_global = coef_per_layer * L / k,
  and so do the gradients into layer i's router while the layers' loads f_i are alike; the
  'global' gradient shrinks further as the layers' imbalances cancel in the mean. For
  configs/rmoe.toml (L = 12, k = 2), 'per_layer' at the paper's 1e-3 is 6x the paper's loss
  in value and about 20x (10x to 55x per layer) in router gradient at initialisation.
Every position of the batch counts in either loss (batches are packed without padding, and a
document start does not change a per-token router). The router z-loss
``coef * mean(logsumexp(logits)^2)`` is per layer in both modes. All add into
``carry["aux_loss"]``, and the expert load f of block b is ``carry["metric/moe_load.b"]``
(detached, [E]).

Context parallelism (``ctx.cp``): routing is per token and the GRU's state crosses layers, not
tokens, so nothing is exchanged but the statistics: f and P are those of the whole sequences
(:func:`sequence_stats`), and so are the balance loss and the logged load on every rank. The
z-loss stays a mean over the rank's tokens, like the LM loss (the trainer's mean over the cp
ranks makes both the whole sequences' means).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from pretrain.models.layers.mlp import SwiGLU, ffn_hidden
from kernels.moe import ExpertCompute, dispatch_experts, gru_cell, local_experts
from pretrain.models.registry import register_ffn

if TYPE_CHECKING:
    from pretrain.config import ModelConfig, MoEConfig
    from pretrain.models.context import ForwardContext
    from pretrain.models.sequence_split import SequenceSplit

GRU_KEYS = ("router_gru.weight_ih", "router_gru.weight_hh", "router_gru.bias_ih", "router_gru.bias_hh")
"""Carry keys of the shared GRU's weights (torch.nn.GRUCell's names and layout)."""


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


def expert_load(expert_idx: Tensor, n_experts: int) -> Tensor:
    """f [E] (fp32, no gradient): the fraction of the N*k token->expert assignments
    ``expert_idx [N, k]`` that went to each expert; sums to 1."""
    return torch.bincount(expert_idx.flatten(), minlength=n_experts).float() / expert_idx.numel()


def balance_loss(load: Tensor, mean_prob: Tensor, top_k: int = 1) -> Tensor:
    """Switch load balancing ``top_k * E * sum_e f_e * P_e`` (Fedus et al. 2021, eq. 4):
    ``load`` f [E] from :func:`expert_load`, ``mean_prob`` P [E] the mean router probability
    of each expert over the tokens (carries the gradient). ``top_k`` = 1 gives Switch's
    per-layer form (1 when balanced); ``top_k`` = k gives Mixtral's, whose f counts, per
    expert, the tokens that chose it among their k (k when balanced)."""
    return top_k * mean_prob.shape[-1] * (load.to(mean_prob.dtype) * mean_prob).sum()


def sequence_stats(counts: Tensor, probs: Tensor, cp: SequenceSplit) -> tuple[Tensor, Tensor]:
    """The balance loss's f and P over the whole sequences of a context-parallel split, from
    this process's tokens: ``counts [E]`` token->expert assignments (int), ``probs [N, E]``
    router probabilities. One :meth:`~SequenceSplit.all_sum` of ``2 E + 1`` floats (counts,
    probability sums, token count) -> (f [E] fp32 detached, P [E] in probs' dtype).

    Gradient scaling: every rank then computes the same loss A(P), and all_sum's backward
    (an all-reduce sum of the ranks' identical upstream gradients) hands rank r cp x dA/dP
    times its own tokens' share; the trainer's mean over the cp ranks turns the parameter
    gradients back into the single-process dA/dtheta, as it does for the LM loss, whose
    per-rank mean over N / cp tokens is likewise cp x the global mean's share. Under expert
    parallelism ``counts`` are already summed over the ep group (data-parallel ranks of the
    same cp coordinate); the sum over the cp ranks completes them."""
    e = probs.shape[-1]
    local = torch.cat([counts.to(probs.dtype), probs.sum(dim=0), probs.new_full((1,), probs.shape[0])])
    total = cp.all_sum(local)
    load = total[:e].detach().float()
    return load / load.sum(), total[e : 2 * e] / total[2 * e]


LOAD_SUM, PROB_SUM = "moe_balance.load_sum", "moe_balance.prob_sum"
"""Carry keys of the 'global' balance loss's running sums over MoE layers of f [E] and P [E]."""


class MoE(nn.Module):
    """Dropless top-k MoE of SwiGLU experts, with an optional always-on shared expert.

    ``recurrent``: route with the layerwise GRU (RMoE) instead of one linear layer.

    ``expert_compute`` (default :func:`kernels.moe.local_experts`) is the hook that runs the
    experts on the permuted tokens (see kernels.moe.ExpertCompute); expert
    parallelism (parallel/expert.py) replaces it and shards ``w1, w3, w2`` along the experts,
    leaving routing here unchanged. The load it reports (tokens per expert over every process
    sharing the experts) gives the balance loss's f and the logged load; the mean router
    probability P stays this process's, so with equal token counts per process the mean over
    processes of the balance loss equals the loss of their tokens together.
    """

    uses_carry = True

    def __init__(
        self, d_model: int, hidden: int, cfg: MoEConfig, name: str, recurrent: bool, moe_layers: tuple[int, ...] = (),
        kernels: str = "auto",
    ) -> None:
        """``moe_layers``: indices of the model's MoE blocks, which the 'global' balance loss
        spans (its last one finishes the loss); empty: this layer alone. ``kernels``:
        ``model.kernels``, the backend of the permutation, expert GEMMs and GRU cell."""
        super().__init__()
        self.name = name
        self.top_k = cfg.top_k
        self.renormalize = cfg.renormalize
        self.aux_loss_coef = cfg.aux_loss_coef
        self.z_loss_coef = cfg.z_loss_coef
        self.balance = cfg.balance
        self.n_balance_layers = max(len(moe_layers), 1)
        self.finishes_balance = not moe_layers or name == str(moe_layers[-1])
        self.recurrent = recurrent
        e = cfg.n_experts
        self.n_experts = e
        self.kernels = kernels
        self.expert_compute: ExpertCompute = functools.partial(local_experts, backend=kernels)
        if recurrent:
            self.router_in = nn.Linear(d_model, cfg.router_hidden, bias=False)  # x -> GRU input
            self.router_out = nn.Linear(cfg.router_hidden, e, bias=False)  # GRU state -> logits
        else:
            self.router = nn.Linear(d_model, e, bias=False)
        self.w1 = nn.Parameter(torch.empty(e, d_model, hidden))  # gate
        self.w3 = nn.Parameter(torch.empty(e, d_model, hidden))  # up
        self.w2 = nn.Parameter(torch.empty(e, hidden, d_model))  # down (into the residual stream)
        self.shared = SwiGLU(d_model, hidden, kernels) if cfg.shared_expert else None

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
        h = gru_cell(xin, h.to(xin.dtype), *(carry[k] for k in GRU_KEYS), backend=self.kernels)
        return self.router_out(h), {**carry, "router_h": h}

    def forward(self, x: Tensor, ctx: ForwardContext, carry: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``x [B, T, d]`` -> ``[B, T, d]``; adds the load-balancing (and z-) loss to
        carry["aux_loss"] and the detached expert load to carry["metric/moe_load.<block>"]."""
        b, t, d = x.shape
        logits, carry = self._logits(x, carry)
        logits = logits.reshape(b * t, -1)  # [N, E]
        probs, idx, weight = route(logits, self.top_k, self.renormalize)
        flat = x.reshape(b * t, d)
        y, counts = dispatch_experts(
            flat, idx, weight, self.n_experts, self.expert_compute, self.w1, self.w3, self.w2, backend=self.kernels
        )
        if self.shared is not None:
            y = y + self.shared(flat)
        if ctx.cp is None:
            load, mean_prob = counts.float() / counts.sum(), probs.mean(dim=0)  # f [E] as expert_load, P [E]
        else:
            load, mean_prob = sequence_stats(counts, probs, ctx.cp)
        carry = {**carry, f"metric/moe_load.{self.name}": load}
        aux, carry = self._balance(load, mean_prob, carry)
        if self.z_loss_coef > 0:
            z = self.z_loss_coef * torch.logsumexp(logits.to(probs.dtype), dim=-1).square().mean()
            aux = z if aux is None else aux + z
        if aux is not None:
            carry["aux_loss"] = carry["aux_loss"] + aux if "aux_loss" in carry else aux
        return y.view(b, t, d), carry

    def _balance(
        self, load: Tensor, mean_prob: Tensor, carry: dict[str, Tensor]
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """This layer's weighted balance loss (None while a 'global' loss is still being
        summed) and the carry with the 'global' running sums updated or, at the last MoE
        layer, removed."""
        if self.balance == "per_layer":
            return self.aux_loss_coef * balance_loss(load, mean_prob), carry
        load_sum = carry[LOAD_SUM] + load if LOAD_SUM in carry else load
        prob_sum = carry[PROB_SUM] + mean_prob if PROB_SUM in carry else mean_prob
        if not self.finishes_balance:
            return None, {**carry, LOAD_SUM: load_sum, PROB_SUM: prob_sum}
        carry = {k: v for k, v in carry.items() if k not in (LOAD_SUM, PROB_SUM)}
        n = self.n_balance_layers
        return self.aux_loss_coef * balance_loss(load_sum / n, prob_sum / n, self.top_k), carry

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
        _, d, hidden = self.w1.shape
        e = self.n_experts  # w1 holds only this rank's experts under expert parallelism
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


def _build(cfg: ModelConfig, layer_idx: int, recurrent: bool) -> MoE:
    moe_layers = tuple(i for i, (_, ffn) in enumerate(cfg.pattern()) if ffn in ("moe", "moe_gru"))
    hidden = cfg.moe.expert_hidden or ffn_hidden(cfg)
    return MoE(cfg.d_model, hidden, cfg.moe, str(layer_idx), recurrent, moe_layers, cfg.kernels)


@register_ffn("moe")
def _moe(cfg: ModelConfig, layer_idx: int) -> MoE:
    return _build(cfg, layer_idx, recurrent=False)


@register_ffn("moe_gru")
def _moe_gru(cfg: ModelConfig, layer_idx: int) -> MoE:
    return _build(cfg, layer_idx, recurrent=True)
