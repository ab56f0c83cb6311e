"""Which native transformers class a model config maps to, and the two config translations.

A config exports natively only when one transformers class computes exactly what our layers
compute; otherwise :func:`native_family` raises :class:`ConvertError` naming the feature that
prevents it. The families:

=========== ========================== =============================================
family      transformers class          our layer pattern
=========== ========================== =============================================
llama       LlamaForCausalLM            every block 'attn:mlp' (RoPE)
mistral     MistralForCausalLM          every block 'swa:mlp' (RoPE, one window)
mixtral     MixtralForCausalLM          every block 'attn:moe' or 'swa:moe', top-k >= 2
                                        renormalised, no shared expert
diffllama   DiffLlamaForCausalLM        every block 'diff_attn:mlp' (RoPE)
mamba       MambaForCausalLM            every block 'mamba:none'
mamba2      Mamba2ForCausalLM           every block 'mamba2:none'
=========== ========================== =============================================
"""

from __future__ import annotations

import math
from typing import Any

from pretrain.config import ModelConfig
from pretrain.models.layers.mlp import ffn_hidden

HF_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "diffllama": "DiffLlamaForCausalLM",
    "mamba": "MambaForCausalLM",
    "mamba2": "Mamba2ForCausalLM",
}
"""Family -> the transformers class its export loads as (config.json ``architectures``)."""

IMPORTABLE = ("llama", "mistral", "mixtral", "mamba", "mamba2")
"""HF ``model_type`` values `pretrain convert --from hf` reads (DiffLlama's export folds the
pair norm's gain into o_proj, which no import can split again)."""


class ConvertError(ValueError):
    """A conversion that cannot be done; the one-line message names the reason."""


def native_family(cfg: ModelConfig) -> str:
    """The family of :data:`HF_CLASSES` that computes exactly what ``cfg``'s model computes.

    Raises :class:`ConvertError` naming the config field or feature that has no native class."""
    pattern = cfg.pattern()
    mixers = sorted({m for m, _ in pattern})
    ffns = sorted({f for _, f in pattern})
    shape = f"model.layer_pattern {cfg.layer_pattern!r} (mixers {', '.join(mixers)}; FFNs {', '.join(ffns)})"
    if len(mixers) > 1 or len(ffns) > 1:
        raise ConvertError(f"{shape} mixes block types, which no native transformers class does")
    mixer, ffn = mixers[0], ffns[0]
    families = {
        ("attn", "mlp"): "llama",
        ("swa", "mlp"): "mistral",
        ("attn", "moe"): "mixtral",
        ("swa", "moe"): "mixtral",
        ("diff_attn", "mlp"): "diffllama",
        ("mamba", "none"): "mamba",
        ("mamba2", "none"): "mamba2",
    }
    family = families.get((mixer, ffn))
    if family is None:
        raise ConvertError(f"{shape} has no native transformers class")
    if family in ("llama", "mistral", "mixtral", "diffllama") and cfg.attention.pos_encoding != "rope":
        raise ConvertError(f"model.attention.pos_encoding={cfg.attention.pos_encoding!r}: {HF_CLASSES[family]} always applies RoPE")
    if family == "mixtral":
        m = cfg.moe
        if m.top_k < 2 or not m.renormalize:
            raise ConvertError(
                "model.moe: MixtralForCausalLM renormalises the top-k router probabilities, which "
                f"equals our routing only with top_k >= 2 and renormalize = true (top_k={m.top_k}, renormalize={m.renormalize})"
            )
        if m.shared_expert:
            raise ConvertError("model.moe.shared_expert: MixtralForCausalLM has no shared expert")
    if family == "diffllama":
        kv = cfg.attention.n_kv_heads or cfg.attention.n_heads
        if kv % 2:
            raise ConvertError(f"model.attention.n_kv_heads={kv}: DiffLlamaForCausalLM needs an even KV head count")
    return family


def _attention_fields(cfg: ModelConfig, max_positions: int) -> dict[str, Any]:
    a = cfg.attention
    return {
        "num_attention_heads": a.n_heads,
        "num_key_value_heads": a.n_kv_heads or a.n_heads,
        "head_dim": a.head_dim or cfg.d_model // a.n_heads,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(a.rope_theta)},
        "max_position_embeddings": max_positions,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
    }


def hf_config_dict(family: str, cfg: ModelConfig, eos_id: int, max_positions: int) -> dict[str, Any]:
    """The transformers config fields (standard names) of ``cfg``'s model as ``family``.

    ``eos_id``: the tokenizer's end-of-document id, also the BOS the tokenizer prepends (our
    documents start after an EOS; see pretrain/convert/tokenizer.py). ``max_positions``: the
    training sequence length (RoPE has no hard limit; tools read it as the context size)."""
    common = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "initializer_range": cfg.init_std,
    }
    if family in ("llama", "mistral", "diffllama"):
        out = {**common, **_attention_fields(cfg, max_positions), "intermediate_size": ffn_hidden(cfg), "mlp_bias": False}
        if family == "mistral":
            out["sliding_window"] = cfg.attention.window
        if family == "diffllama":
            out["lambda_std_dev"] = 0.1
        return out
    if family == "mixtral":
        m = cfg.moe
        sliding = cfg.pattern()[0][0] == "swa"
        return {
            **common,
            **_attention_fields(cfg, max_positions),
            "intermediate_size": m.expert_hidden or ffn_hidden(cfg),
            "num_local_experts": m.n_experts,
            "num_experts_per_tok": m.top_k,
            "router_aux_loss_coef": m.aux_loss_coef,
            "output_router_logits": False,
            "router_jitter_noise": 0.0,
            "sliding_window": cfg.attention.window if sliding else None,
        }
    if family == "mamba":
        m = cfg.mamba
        return {
            **common,
            "state_size": m.d_state,
            "conv_kernel": m.d_conv,
            "expand": m.expand,
            "intermediate_size": m.expand * cfg.d_model,
            "time_step_rank": m.dt_rank or math.ceil(cfg.d_model / 16),
            "layer_norm_epsilon": cfg.norm_eps,
            "use_bias": False,
            "use_conv_bias": True,
            "hidden_act": "silu",
            "residual_in_fp32": True,
        }
    if family == "mamba2":
        m = cfg.mamba2
        return {
            **common,
            "num_heads": m.expand * cfg.d_model // m.head_dim,
            "head_dim": m.head_dim,
            "state_size": m.d_state,
            "n_groups": m.n_groups,
            "conv_kernel": m.d_conv,
            "expand": m.expand,
            "chunk_size": m.chunk_size,
            "layer_norm_epsilon": cfg.norm_eps,
            "use_bias": False,
            "use_conv_bias": True,
            "hidden_act": "silu",
            "rms_norm": True,
            "residual_in_fp32": True,
            "time_step_limit": (0.0, float("inf")),
        }
    raise ConvertError(f"unknown family {family!r}; known: {sorted(HF_CLASSES)}")


def _get(hf: dict, name: str, default: Any = None) -> Any:
    """``hf[name]``, or ``default`` when it is absent or null."""
    value = hf.get(name)
    return default if value is None else value


def _require_hf(ok: bool, model_type: str, message: str) -> None:
    if not ok:
        raise ConvertError(f"config.json ({model_type}): {message}, which our layers do not compute")


def _json_float(value: Any) -> float:
    """A float of config.json, where transformers writes infinity as ``{"__float__": "Infinity"}``."""
    return float(value["__float__"]) if isinstance(value, dict) else float(value)


def _rope_theta(hf: dict, model_type: str) -> float:
    rope = _get(hf, "rope_parameters") or _get(hf, "rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    _require_hf(kind == "default", model_type, f"RoPE scaling {kind!r}")
    return float(rope.get("rope_theta", _get(hf, "rope_theta", 10000.0)))


def model_section_from_hf(hf: dict) -> tuple[str, dict[str, Any]]:
    """(family, our ``[model]`` section as a TOML dict) of a transformers ``config.json`` dict.

    Raises :class:`ConvertError` for a model_type outside :data:`IMPORTABLE` or a feature our
    layers do not compute (biases, RoPE scaling, another activation)."""
    model_type = hf.get("model_type", "")
    if model_type not in IMPORTABLE:
        raise ConvertError(
            f"config.json: model_type {model_type!r} cannot be imported; supported: {', '.join(IMPORTABLE)}"
        )
    d = hf["hidden_size"]
    section: dict[str, Any] = {
        "vocab_size": hf["vocab_size"],
        "d_model": d,
        "n_layers": hf["num_hidden_layers"],
        "tie_embeddings": bool(_get(hf, "tie_word_embeddings", model_type.startswith("mamba"))),
    }
    if model_type in ("llama", "mistral", "mixtral"):
        _require_hf(not _get(hf, "attention_bias", False), model_type, "attention biases")
        _require_hf(not _get(hf, "mlp_bias", False), model_type, "MLP biases")
        _require_hf(_get(hf, "hidden_act", "silu") == "silu", model_type, f"activation {hf.get('hidden_act')!r}")
        heads = hf["num_attention_heads"]
        # kept even when as long as max_position_embeddings: transformers applies it beyond that too
        window = _get(hf, "sliding_window") if model_type != "llama" else None
        attention = {
            "n_heads": heads,
            "n_kv_heads": _get(hf, "num_key_value_heads", heads),
            "head_dim": _get(hf, "head_dim", d // heads),
            "rope_theta": _rope_theta(hf, model_type),
            "pos_encoding": "rope",
        }
        if window is not None:
            attention["window"] = int(window)
        mixer = "attn" if window is None else "swa"
        section.update(norm_eps=hf["rms_norm_eps"], attention=attention)
        if model_type == "mixtral":
            section.update(
                layer_pattern=f"{mixer}:moe",
                ffn="moe",
                moe={
                    "n_experts": hf["num_local_experts"],
                    "top_k": hf["num_experts_per_tok"],
                    "expert_hidden": hf["intermediate_size"],
                    "renormalize": True,
                    # Mixtral's load_balancing_loss_func: one loss over all layers' routers
                    "balance": "global",
                    "aux_loss_coef": float(_get(hf, "router_aux_loss_coef", 0.001)),
                },
            )
            _require_hf(hf["num_experts_per_tok"] >= 2, model_type, "top-1 routing renormalised to weight 1")
        else:
            section.update(layer_pattern=mixer, ffn="mlp", ffn_hidden=hf["intermediate_size"])
        return model_type, section
    _require_hf(not _get(hf, "use_bias", False), model_type, "projection biases")
    _require_hf(_get(hf, "use_conv_bias", True), model_type, "a convolution without bias")
    _require_hf(_get(hf, "hidden_act", "silu") == "silu", model_type, f"activation {hf.get('hidden_act')!r}")
    section.update(norm_eps=hf["layer_norm_epsilon"], layer_pattern=model_type, ffn="none")
    if model_type == "mamba":
        section["mamba"] = {
            "d_state": hf["state_size"],
            "d_conv": hf["conv_kernel"],
            "expand": hf["expand"],
            "dt_rank": hf["time_step_rank"],
        }
        _require_hf(hf["intermediate_size"] == hf["expand"] * d, model_type, "intermediate_size != expand * hidden_size")
        return model_type, section
    limit = [_json_float(v) for v in _get(hf, "time_step_limit", (0.0, float("inf")))]
    _require_hf(limit == [0.0, float("inf")], model_type, f"time_step_limit {limit} (a clamped step size)")
    _require_hf(_get(hf, "rms_norm", True), model_type, "no gated RMSNorm")
    section["mamba2"] = {
        "d_state": hf["state_size"],
        "d_conv": hf["conv_kernel"],
        "expand": hf["expand"],
        "head_dim": hf["head_dim"],
        "n_groups": hf["n_groups"],
        "chunk_size": hf["chunk_size"],
    }
    _require_hf(hf["num_heads"] * hf["head_dim"] == hf["expand"] * d, model_type, "num_heads * head_dim != expand * hidden_size")
    return model_type, section
