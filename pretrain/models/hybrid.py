"""The hybrid decoder: embedding -> blocks from the layer pattern -> norm -> head.

Reads like single-device code. A pipeline stage deletes the modules it does not own (set
``embed``/``norm``/``head`` to None, drop entries of ``blocks``, or set one half of a block it
is cut inside to None: ``norm1``/``mixer`` or ``norm2``/``ffn``) and forward skips them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.linear_cross_entropy import AllReduce, linear_cross_entropy
from pretrain.models.context import Cache, ForwardContext, build_context
from pretrain.models.layers.attention import Attention, KVState, flash_available
from pretrain.models.layers.decode_weights import decode_matmul, decoding, new_session
from pretrain.models.layers.moe import RouterGRU, uses_router_gru
from pretrain.models.layers.norm import RMSNorm, at_least_fp32
from pretrain.models.registry import FFNS, MIXERS
from pretrain.models.sequence_split import SequenceSplit

if TYPE_CHECKING:
    from pretrain.config import ModelConfig


class Block(nn.Module):
    """Pre-norm residual block: h += mixer(norm1(h)) (the mixer half); h += ffn(norm2(h)) (the
    FFN half; absent when the pattern gives no FFN)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.name = str(layer_idx)
        self.mixer_name, self.ffn_name = cfg.pattern()[layer_idx]
        if self.mixer_name not in MIXERS:
            raise ValueError(f"unknown mixer {self.mixer_name!r}; known: {sorted(MIXERS)}")
        if self.ffn_name not in FFNS:
            raise ValueError(f"unknown ffn {self.ffn_name!r}; known: {sorted(FFNS)}")
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.kernels)
        self.mixer = MIXERS[self.mixer_name](cfg, layer_idx)
        self.ffn = FFNS[self.ffn_name](cfg, layer_idx)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.kernels) if self.ffn is not None else None

    def forward(self, h: Tensor, ctx: ForwardContext, carry: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """``h [B, T, d_model]`` -> the block's output and the outgoing ``carry`` (tensors that
        cross layers, e.g. a shared KV). Runs the halves present: a pipeline stage cut inside
        the block holds only one of them (the other set to None). With both, the mixer's
        residual add is fused with ``norm2`` (one pass over the stream instead of two)."""
        if self.mixer is not None and self.ffn is not None:
            y, carry = self._mix(h, ctx, carry)
            x, h = self.norm2(y, residual=h)
            return self._ffn(h, x, ctx, carry)
        if self.mixer is not None:
            h, carry = self.forward_mixer(h, ctx, carry)
        if self.ffn is not None:
            h, carry = self.forward_ffn(h, ctx, carry)
        return h, carry

    def forward_mixer(
        self, h: Tensor, ctx: ForwardContext, carry: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The mixer half, ``h + mixer(norm1(h))``; the carry passes through the layers that do
        not use it."""
        y, carry = self._mix(h, ctx, carry)
        return h + y, carry

    def forward_ffn(self, h: Tensor, ctx: ForwardContext, carry: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The FFN half, ``h + ffn(norm2(h))`` (the block must have an FFN)."""
        return self._ffn(h, self.norm2(h), ctx, carry)

    def _mix(self, h: Tensor, ctx: ForwardContext, carry: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """The mixer's output on ``norm1(h)``, before the residual add, and the carry."""
        state = ctx.cache.states.get(self.name) if ctx.cache is not None else None
        if getattr(self.mixer, "uses_carry", False):
            return self.mixer(self.norm1(h), ctx, state, carry)
        return self.mixer(self.norm1(h), ctx, state), carry

    def _ffn(
        self, h: Tensor, x: Tensor, ctx: ForwardContext, carry: dict[str, Tensor]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``h + ffn(x)`` for ``x = norm2(h)``, and the carry."""
        if getattr(self.ffn, "uses_carry", False):
            y, carry = self.ffn(x, ctx, carry)
        else:
            y = self.ffn(x)
        return h + y, carry

    def init_weights(self, init_std: float, out_std: float) -> None:
        self.norm1.init_weights()
        self.mixer.init_weights(init_std, out_std)
        if self.ffn is not None:
            self.norm2.init_weights()
            self.ffn.init_weights(init_std, out_std)


class HeadOutput:
    """The output projection's forward, shared by :class:`LMHead` and :class:`TiedHead`: fp32
    logits, or with labels the loss fused with the projection (the logits never exist).

    ``vocab_start`` / ``all_reduce``: a vocabulary-parallel head's first id and the reduction
    over its ranks (see :func:`kernels.linear_cross_entropy.linear_cross_entropy`), set by
    parallel/tensor; the defaults are one rank holding the whole vocabulary. ``kernels``: the
    fused loss's backend, ``model.kernels`` (set by :class:`HybridLM`)."""

    vocab_start: int = 0
    all_reduce: AllReduce | None = None
    kernels: str = "auto"

    def output(self, h: Tensor, weight: Tensor, labels: Tensor | None, z_loss_coef: float) -> Tensor | tuple[Tensor, Tensor]:
        """``h [B, T, d_model]`` -> fp32 logits ``[B, T, V]``; with ``labels [B, T]``, ``(mean
        cross-entropy + z-loss term, the z-loss term detached)``, both fp32 scalars."""
        if labels is None:
            if decoding(h) and h.device.type == "cpu":  # one token per row: the weight-read bound GEMV
                return at_least_fp32(decode_matmul(h, self, "head", weight))
            return at_least_fp32(F.linear(h, weight))
        return linear_cross_entropy(
            h, weight, labels, z_loss_coef=z_loss_coef, vocab_start=self.vocab_start,
            all_reduce=self.all_reduce, return_z_loss=True, backend=self.kernels,
        )


class LMHead(HeadOutput, nn.Linear):
    """The output projection ``weight [V, d_model]`` (no bias); given labels, fused with the loss."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__(d_model, vocab_size, bias=False)

    def forward(self, h: Tensor, labels: Tensor | None = None, z_loss_coef: float = 0.0):
        return self.output(h, self.weight, labels, z_loss_coef)


class TiedHead(HeadOutput, nn.Module):
    """The output projection with the input embedding's weight (no parameters of its own, so
    parameter names do not change): a module so that a tensor-parallel plan can hook it."""

    def forward(self, h: Tensor, weight: Tensor, labels: Tensor | None = None, z_loss_coef: float = 0.0):
        return self.output(h, weight, labels, z_loss_coef)


class HybridLM(nn.Module):
    sequence_split: SequenceSplit | None = None
    """Context parallelism: the rows of every forward are segments of longer sequences (set by
    ``parallel/context.py``, or a :class:`~pretrain.models.sequence_split.LocalSplit` in tests);
    None is the undivided layout."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(f"model.vocab_size must be > 0 to build the model, got {cfg.vocab_size}")
        self.cfg = cfg
        # Modules are created on the meta device and materialised uninitialised on the current
        # default device: the default initialisers never run (nor draw from the RNG), so
        # init_weights() alone decides every value and `torch.manual_seed(s); HybridLM(cfg)`
        # equals a meta build + to_empty + seeded init_weights(), on any device.
        device = torch.get_default_device()
        with torch.device("meta"):
            self.embed: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.blocks = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
            self.norm: RMSNorm | None = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.kernels)
            self.head: LMHead | None = None if cfg.tie_embeddings else LMHead(cfg.d_model, cfg.vocab_size)
            self.tied_head = TiedHead() if cfg.tie_embeddings else None
            (self.head or self.tied_head).kernels = cfg.kernels
            # RMoE's GRU, shared by every 'moe_gru' block: handed to them through the carry
            # (see pretrain/models/layers/moe.py); every pipeline stage with a 'moe_gru' block's
            # FFN half holds a copy, and parallel/pipeline/stage.py sums their gradients.
            self.router_gru: RouterGRU | None = (
                RouterGRU(cfg.moe.router_hidden) if uses_router_gru(cfg) else None
            )
        if device.type != "meta":
            self.to_empty(device=device)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter from the current RNG (works on materialised meta builds).
        Linear/embedding weights ~ N(0, init_std); projections into the residual stream
        ~ N(0, init_std / sqrt(2 n_layers)) (GPT-2); norms 1; mixers add their own (Mamba)."""
        for name in self.init_units():
            self.init_unit(name)

    def init_units(self) -> list[str]:
        """Names of the top-level modules in the order :meth:`init_weights` initialises them,
        each drawing from the RNG in turn (a pipeline stage replays this order, see
        parallel/pipeline/stage.py)."""
        optional = ("embed", "norm", "router_gru", "head")
        order = ["embed", *(f"blocks.{name}" for name in self.blocks), "norm", "router_gru", "head"]
        return [n for n in order if n not in optional or getattr(self, n) is not None]

    @torch.no_grad()
    def init_unit(self, name: str) -> None:
        """Initialise the one module ``name`` of :meth:`init_units` from the current RNG."""
        std = self.cfg.init_std
        module = self.get_submodule(name)
        if name in ("embed", "head"):
            nn.init.normal_(module.weight, std=std)
        elif name.startswith("blocks."):
            module.init_weights(std, std / math.sqrt(2 * self.cfg.n_layers))
        else:
            module.init_weights()

    def new_cache(self, batch_size: int, max_tokens: int | None = None) -> Cache:
        """An empty decoding cache for this model's blocks; with ``max_tokens`` (prompt plus new
        tokens) the attention layers' K/V buffers are allocated whole now (static: no step
        reallocates them; a window layer's ring is ``window`` slots whatever ``max_tokens``)."""
        new_session()  # the decode-time weight layouts are rebuilt from the weights as they are now
        cache = Cache({name: block.mixer.new_state(batch_size) for name, block in self.blocks.items()})
        if max_tokens is not None:
            for name, block in self.blocks.items():
                state = cache.states[name]
                if isinstance(state, KVState):
                    state.reserve(max_tokens, block.mixer.window)
        return cache

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        return_aux: bool = False,
        labels: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """``input_ids [B, T]`` (hidden states ``[B, T, d_model]`` on a stage without embedding)
        -> fp32 logits ``[B, T, V]`` (hidden states on a stage without norm/head), or with
        ``labels [B, T]`` (int64; -100 ignored) the mean next-token cross-entropy, an fp32
        scalar, computed with the head in blocks of tokens so the logits never exist
        (:func:`kernels.linear_cross_entropy.linear_cross_entropy`).

        ``position_ids [B, T]``: position inside each packed document (0 at its start); None is
        one document (continuing from the cache's offset). ``cache``: consumed and updated in
        place; any number of new tokens. ``return_aux``: also return the auxiliary outputs of
        the layers, ``{"aux_loss": scalar to add to the LM loss, "metric/...": detached}``
        (with labels and model.z_loss_coef > 0, the z-loss joins them).
        """
        h = self.embed(input_ids) if self.embed is not None else input_ids
        if cache is None and decoding(h):  # a one-token forward of its own: a session of its own
            new_session()
        out, carry = self.forward_layers(h, {}, position_ids, cache, labels)
        if not return_aux:
            return out
        return out, {k: v for k, v in carry.items() if k == "aux_loss" or k.startswith("metric/")}

    def forward_layers(
        self,
        h: Tensor,
        carry: dict[str, Tensor],
        position_ids: Tensor | None = None,
        cache: Cache | None = None,
        labels: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Everything after the embedding: hidden states ``h [B, T, d_model]`` and the incoming
        ``carry`` (empty at the first block; a pipeline stage passes what the previous stage
        returned) -> (fp32 logits ``[B, T, V]`` or with ``labels`` the loss (see :meth:`forward`),
        or hidden states without norm, and the outgoing carry with every entry the blocks left
        in it). The shared GRU's weights join the carry here, from this module's own
        ``router_gru`` (a pipeline stage's copy)."""
        ctx = self._context(h, position_ids, cache)
        if self.router_gru is not None:
            carry = {**carry, **self.router_gru.carry()}
        for block in self.blocks.values():
            h, carry = block(h, ctx, carry)
        if ctx.cp is not None:
            h = ctx.cp.attach(h)
        if cache is not None:
            cache.offset += h.shape[1]
        if self.norm is None:
            return h, carry
        h = self.norm(h)
        z_coef = self.cfg.z_loss_coef
        if self.head is not None:
            out = self.head(h, labels, z_coef)
        elif self.cfg.tie_embeddings and self.embed is not None:
            out = self.tied_head(h, self.embed.weight, labels, z_coef)
        else:
            return h, carry
        if labels is None:
            return out, carry
        loss, z_loss = out
        if z_coef:
            # the value logged as the LM loss is the cross-entropy; the gradient is the sum's
            carry = {**carry, "aux_loss": carry.get("aux_loss", 0) + z_loss, "metric/z_loss": z_loss}
        return loss - z_loss, carry

    def _context(self, h: Tensor, position_ids: Tensor | None, cache: Cache | None) -> ForwardContext:
        attn = [b.mixer for b in self.blocks.values() if isinstance(b.mixer, Attention)]
        a = self.cfg.attention
        backend = a.backend
        half = h.dtype in (torch.float16, torch.bfloat16) or (h.is_cuda and torch.is_autocast_enabled("cuda"))
        split = self.sequence_split if cache is None else None
        flash = split is None and bool(attn) and cache is None and backend != "sdpa" and half and h.is_cuda and flash_available()
        if backend == "flash" and attn and cache is None and not flash:
            raise RuntimeError("model.attention.backend='flash' needs CUDA, bf16/fp16 and the flash-attn package")
        use_rope = any(m.use_rope for m in attn)
        # the sequence length comes from the position ids when given: under sequence
        # parallelism h holds this rank's T/tp tokens while the layers see all T
        return build_context(
            h.shape[0],
            position_ids.shape[1] if position_ids is not None else h.shape[1],
            h.device,
            position_ids,
            cache,
            self.cfg.doc_masking,
            mask_windows={m.window for m in attn},
            rope=(attn[0].head_dim, a.rope_theta) if use_rope else None,
            flash=flash,
            cp=split,
        )
