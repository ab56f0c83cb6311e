"""Parameter counts, training FLOPs per token and a memory estimate (``pretrain plan``, MFU).

Everything is counted on the real module tree (a meta-device build when given a config), so a
new layer type is counted without touching this file. Layers may refine the estimates with
``flops_per_token(seq_len)`` (work beyond 6 x their weights) and ``activation_elements()``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import torch
from torch import nn

from pretrain.models.hybrid import HybridLM
from pretrain.models.layers.attention import Attention

if TYPE_CHECKING:
    from pretrain.config import ModelConfig

_MATMUL_TYPES = (nn.Linear, nn.Conv1d)  # weights used once per token: 2 FLOPs forward, 4 backward


def _model(model_or_cfg: nn.Module | ModelConfig) -> nn.Module:
    if isinstance(model_or_cfg, nn.Module):
        return model_or_cfg
    with torch.device("meta"):  # no memory, no initialisation cost
        return HybridLM(model_or_cfg)


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def count_parameters(model_or_cfg: nn.Module | ModelConfig) -> dict[str, int]:
    """Parameter counts: ``total`` (tied weights once), ``embedding`` (input embedding plus an
    untied head), ``non_embedding``, ``norm``, and ``mixer.<name>`` / ``ffn.<name>`` summed over
    the blocks of each type. Counts only the blocks a (pipeline-stage) model owns."""
    model = _model(model_or_cfg)
    counts: dict[str, int] = defaultdict(int)
    counts["total"] = _numel(model)
    counts["embedding"] = _numel(getattr(model, "embed", None)) + _numel(getattr(model, "head", None))
    counts["non_embedding"] = counts["total"] - counts["embedding"]
    counts["norm"] = _numel(getattr(model, "norm", None))
    for block in model.blocks.values():
        counts["norm"] += _numel(block.norm1) + _numel(block.norm2)
        counts[f"mixer.{block.mixer_name}"] += _numel(block.mixer)
        counts[f"ffn.{block.ffn_name}"] += _numel(block.ffn)
    return dict(counts)


def _matmul_params(module: nn.Module | None) -> int:
    if module is None:
        return 0
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, _MATMUL_TYPES))


def block_flops(block: nn.Module, seq_len: int) -> dict[str, float]:
    """Forward + backward training FLOPs per token of one decoder block at ``seq_len``:
    ``dense`` (6 x its matmul weights, plus FFN work outside nn.Linear such as MoE's active
    experts), ``attention`` (an Attention mixer's score and value products) or ``scan`` (other
    mixers' sequence terms). The per-block part of :func:`flops_per_token`."""
    out = {"dense": 6.0 * _matmul_params(block), "attention": 0.0, "scan": 0.0}
    extra = getattr(block.mixer, "flops_per_token", None)
    if extra is not None:
        out["attention" if isinstance(block.mixer, Attention) else "scan"] += extra(seq_len)
    ffn_extra = getattr(block.ffn, "flops_per_token", None)
    if ffn_extra is not None:  # e.g. MoE: the active experts' stacked (non-Linear) weights
        out["dense"] += ffn_extra(seq_len)
    return out


def head_flops(cfg: ModelConfig) -> float:
    """Training FLOPs per token of the output head: 6 x d_model x vocab_size (tied or not)."""
    return 6.0 * cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward + backward training FLOPs per token at ``seq_len``.

    ``dense`` = 6 x every weight used in a matmul (projections, the depthwise conv, the output
    head, tied or not; not the embedding lookup); ``attention`` = score and value products with
    the number of keys each query really sees (causal, window); ``scan`` = Mamba's
    elementwise state updates; ``total`` their sum; ``matmul_params`` the N of 6N.
    """
    model = _model(cfg)
    n = sum(_matmul_params(b) for b in model.blocks.values()) + cfg.vocab_size * cfg.d_model
    out = {"matmul_params": float(n), "dense": head_flops(cfg), "attention": 0.0, "scan": 0.0}
    for block in model.blocks.values():
        for key, value in block_flops(block, seq_len).items():
            out[key] += value
    out["total"] = out["dense"] + out["attention"] + out["scan"]
    return out


def block_activation_elements(block: nn.Module, d_model: int) -> dict[str, int]:
    """Activation elements per token that one decoder block keeps for its backward, by kind:
    ``norm`` (each norm's fp32 input and normalised output), ``mixer.<name>`` and
    ``ffn.<name>`` (the layer's ``activation_elements()``, else 4 x d_model)."""
    acts = {"norm": 2 * d_model * (2 if block.ffn is not None else 1)}
    for kind, layer in (("mixer", block.mixer), ("ffn", block.ffn)):
        if layer is not None:
            elements = getattr(layer, "activation_elements", lambda: 4 * d_model)()
            acts[f"{kind}.{getattr(block, kind + '_name')}"] = elements
    return acts


def head_activation_elements(cfg: ModelConfig) -> int:
    """Activation elements per token of the final norm and head: the norm output, the fp32
    logits and their gradient."""
    return cfg.d_model + 2 * cfg.vocab_size


def memory_estimate(
    cfg: ModelConfig, micro_batch_size: int, seq_len: int, dp: int = 1, *, act_bytes: int = 4,
    tp: int = 1, sp: bool = False, cp: int = 1, cp_attention: str = "allgather",
) -> dict[str, float | dict[str, float]]:
    """Rough training memory per rank in bytes: fp32 ``params``, ``grads`` and AdamW
    ``optimizer`` states (two fp32 moments), sharded over ``dp`` ranks (FSDP/ZeRO-3; pass dp=1
    for replicated data parallelism) and ``tp`` tensor-parallel ranks (the few replicated
    parameters, norms and routers, neglected); ``activations`` of one micro-batch without
    activation checkpointing (``act_bytes`` per element: 4 for fp32, 2 under bf16 autocast),
    with their split ``activations_by_type``: the layers' and the head's split over tp ranks,
    the norms' too with sequence parallelism (``sp``); and ``total``. Context parallelism
    (``cp`` ranks) holds seq_len / cp tokens per rank and shards the weights over dp x cp; each
    layer that all-gathers keys/values keeps the other ranks' ones for its backward
    (``cp_gathered_kv``; halos and states are neglected), none under ring attention
    (``cp_attention`` 'ring': a layer keeps only its own keys/values)."""
    model = _model(cfg)
    p = count_parameters(model)["total"]
    tokens = micro_batch_size * seq_len / cp
    acts: dict[str, float] = defaultdict(float)
    for block in model.blocks.values():
        for key, elements in block_activation_elements(block, cfg.d_model).items():
            acts[key] += elements
    acts["head"] = head_activation_elements(cfg)
    by_type = {k: float(v * tokens * act_bytes) / (tp if k != "norm" or sp else 1) for k, v in acts.items()}
    if cp > 1:
        gathering = [b.mixer for b in model.blocks.values() if b.mixer_name in ("attn", "attn_kv", "diff_attn", "diff_attn_kv")]
        kv = sum(m.wk.weight.shape[0] + m.wv.weight.shape[0] for m in gathering)  # K + V elements per token
        kept = 0 if cp_attention == "ring" else kv * micro_batch_size * seq_len * (cp - 1) / cp
        by_type["cp_gathered_kv"] = float(kept * act_bytes) / tp
    shards = dp * cp * tp
    out: dict[str, float | dict[str, float]] = {
        "params": 4.0 * p / shards,
        "grads": 4.0 * p / shards,
        "optimizer": 8.0 * p / shards,
        "activations": float(sum(by_type.values())),
        "activations_by_type": by_type,
    }
    out["total"] = sum(v for v in out.values() if isinstance(v, float))
    return out
