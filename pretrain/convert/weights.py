"""Our parameter names and layouts <-> the native transformers classes' (their in-memory
``state_dict``, which ``save_pretrained`` / ``from_pretrained`` write and read).

Layout differences handled here (everything else is a rename):
  * Mamba: our ``in_proj_x`` / ``in_proj_z`` are the row halves (x first) of HF's ``in_proj``.
  * Mamba-2: our ``in_proj_{z,x,B,C,dt}`` are the row blocks of HF's ``in_proj`` in that order,
    our ``conv1d_{x,B,C}`` the channel blocks of its ``conv1d``.
  * Mixtral: our experts ``w1, w3 [E, d, H]`` (gate, up) and ``w2 [E, H, d]`` are
    ``gate_up_proj [E, 2H, d]`` (gate rows first) and ``down_proj [E, d, H]``, transposed.
  * DiffLlama pairs query heads (i, i + H/2) and KV heads (j, j + H_kv/2) where we pair
    (2i, 2i+1) and (2j, 2j+1): heads are reordered evens-then-odds; its pair norm has no
    gain, so ours multiplies the matching input columns of ``o_proj`` (exact: the norm's output
    feeds o_proj only). That fold cannot be undone, so DiffLlama exports but does not import.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pretrain.config import ModelConfig
from pretrain.convert.families import ConvertError

Sd = dict[str, Tensor]

_LLAMA_LAYER = {
    "norm1.weight": "input_layernorm.weight",
    "mixer.wq.weight": "self_attn.q_proj.weight",
    "mixer.wk.weight": "self_attn.k_proj.weight",
    "mixer.wv.weight": "self_attn.v_proj.weight",
    "mixer.wo.weight": "self_attn.o_proj.weight",
    "norm2.weight": "post_attention_layernorm.weight",
}
_MLP = {"ffn.w1.weight": "mlp.gate_proj.weight", "ffn.w3.weight": "mlp.up_proj.weight", "ffn.w2.weight": "mlp.down_proj.weight"}
_MAMBA_LAYER = {
    "norm1.weight": "norm.weight",
    **{f"mixer.{n}": f"mixer.{n}" for n in ("A_log", "D", "out_proj.weight")},
}
_MAMBA1 = {f"mixer.{n}": f"mixer.{n}" for n in ("conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias")}
_MAMBA2 = {f"mixer.{n}": f"mixer.{n}" for n in ("dt_bias", "norm.weight")}
_DIFF = {f"mixer.lambda_{n}": f"self_attn.lambda_{n}" for n in ("q1", "k1", "q2", "k2")}


def _layer_renames(family: str) -> dict[str, str]:
    if family in ("llama", "mistral"):
        return {**_LLAMA_LAYER, **_MLP}
    if family == "diffllama":
        return {**_LLAMA_LAYER, **_MLP, **_DIFF}
    if family == "mixtral":
        return {**_LLAMA_LAYER, "ffn.router.weight": "mlp.gate.weight"}
    if family == "mamba":
        return {**_MAMBA_LAYER, **_MAMBA1}
    if family == "mamba2":
        return {**_MAMBA_LAYER, **_MAMBA2}
    raise ConvertError(f"unknown family {family!r}")


def _top_level(family: str) -> tuple[str, str, str]:
    """HF names of the embedding, the final norm and the layer prefix."""
    if family.startswith("mamba"):
        return "backbone.embeddings.weight", "backbone.norm_f.weight", "backbone.layers"
    return "model.embed_tokens.weight", "model.norm.weight", "model.layers"


def _evens_then_odds(w: Tensor, heads: int) -> Tensor:
    """Rows ``[heads * D, ...]`` of heads (0, 1, ..., heads-1) -> heads (0, 2, ..., 1, 3, ...)."""
    order = torch.cat([torch.arange(0, heads, 2), torch.arange(1, heads, 2)])
    return w.unflatten(0, (heads, -1))[order].flatten(0, 1)


def to_hf(family: str, cfg: ModelConfig, sd: Sd) -> Sd:
    """Our model ``state_dict`` (``HybridLM``, one process) -> the ``state_dict`` of the
    transformers class of ``family`` (same dtypes; tied heads get ``lm_head.weight`` = the
    embedding, as transformers lists it). Raises ConvertError on a missing parameter."""
    embed, final_norm, layers = _top_level(family)
    out: Sd = {}
    try:
        out[embed] = sd["embed.weight"]
        out[final_norm] = sd["norm.weight"]
        out["lm_head.weight"] = sd["embed.weight"] if cfg.tie_embeddings else sd["head.weight"]
        for i in range(cfg.n_layers):
            ours, theirs = f"blocks.{i}.", f"{layers}.{i}."
            for src, dst in _layer_renames(family).items():
                out[theirs + dst] = sd[ours + src]
            _layer_to_hf(family, cfg, sd, ours, theirs, out)
    except KeyError as exc:
        raise ConvertError(f"the checkpoint has no parameter {exc.args[0]!r} that {family} needs") from None
    return out


def _layer_to_hf(family: str, cfg: ModelConfig, sd: Sd, ours: str, theirs: str, out: Sd) -> None:
    if family == "mamba":
        out[theirs + "mixer.in_proj.weight"] = torch.cat([sd[ours + "mixer.in_proj_x.weight"], sd[ours + "mixer.in_proj_z.weight"]])
    elif family == "mamba2":
        parts = ("z", "x", "B", "C", "dt")
        out[theirs + "mixer.in_proj.weight"] = torch.cat([sd[f"{ours}mixer.in_proj_{p}.weight"] for p in parts])
        for name in ("weight", "bias"):
            out[f"{theirs}mixer.conv1d.{name}"] = torch.cat([sd[f"{ours}mixer.conv1d_{p}.{name}"] for p in "xBC"])
    elif family == "mixtral":
        w1, w3, w2 = (sd[f"{ours}ffn.{n}"] for n in ("w1", "w3", "w2"))
        out[theirs + "mlp.experts.gate_up_proj"] = torch.cat([w1, w3], dim=2).transpose(1, 2).contiguous()
        out[theirs + "mlp.experts.down_proj"] = w2.transpose(1, 2).contiguous()
    elif family == "diffllama":
        a = cfg.attention
        kv = a.n_kv_heads or a.n_heads
        for name, heads in (("q", a.n_heads), ("k", kv), ("v", kv)):
            key = f"{theirs}self_attn.{name}_proj.weight"
            out[key] = _evens_then_odds(out[key], heads)
        gain = sd[ours + "mixer.subln.weight"]  # [2D], shared by the H/2 pairs
        wo = sd[ours + "mixer.wo.weight"]  # [d_model, H * D]: pair i's output is columns [2D i, 2D (i+1))
        out[theirs + "self_attn.o_proj.weight"] = wo * gain.repeat(a.n_heads // 2)


def from_hf(family: str, cfg: ModelConfig, sd: Sd) -> Sd:
    """The inverse of :func:`to_hf` for the importable families: a transformers ``state_dict``
    -> our ``HybridLM`` ``state_dict`` for ``cfg``. Raises ConvertError on a missing tensor."""
    if family == "diffllama":
        raise ConvertError("DiffLlama checkpoints cannot be imported: its pair norm has no gain to split from o_proj")
    embed, final_norm, layers = _top_level(family)
    out: Sd = {}
    try:
        out["embed.weight"] = sd[embed]
        out["norm.weight"] = sd[final_norm]
        if not cfg.tie_embeddings:
            out["head.weight"] = sd["lm_head.weight"]
        for i in range(cfg.n_layers):
            ours, theirs = f"blocks.{i}.", f"{layers}.{i}."
            for dst, src in _layer_renames(family).items():
                out[ours + dst] = sd[theirs + src]
            _layer_from_hf(family, cfg, sd, ours, theirs, out)
    except KeyError as exc:
        raise ConvertError(f"the Hugging Face weights have no tensor {exc.args[0]!r}") from None
    return out


def _layer_from_hf(family: str, cfg: ModelConfig, sd: Sd, ours: str, theirs: str, out: Sd) -> None:
    if family == "mamba":
        x, z = sd[theirs + "mixer.in_proj.weight"].chunk(2)
        out[ours + "mixer.in_proj_x.weight"], out[ours + "mixer.in_proj_z.weight"] = x, z
    elif family == "mamba2":
        m = cfg.mamba2
        inner, gn = m.expand * cfg.d_model, m.n_groups * m.d_state
        heads = inner // m.head_dim
        rows = sd[theirs + "mixer.in_proj.weight"].split([inner, inner, gn, gn, heads])
        for p, w in zip(("z", "x", "B", "C", "dt"), rows):
            out[f"{ours}mixer.in_proj_{p}.weight"] = w
        for name in ("weight", "bias"):
            for p, w in zip("xBC", sd[f"{theirs}mixer.conv1d.{name}"].split([inner, gn, gn])):
                out[f"{ours}mixer.conv1d_{p}.{name}"] = w
    elif family == "mixtral":
        gate_up = sd[theirs + "mlp.experts.gate_up_proj"].transpose(1, 2)  # [E, d, 2H]
        w1, w3 = gate_up.chunk(2, dim=2)
        out[ours + "ffn.w1"], out[ours + "ffn.w3"] = w1.contiguous(), w3.contiguous()
        out[ours + "ffn.w2"] = sd[theirs + "mlp.experts.down_proj"].transpose(1, 2).contiguous()
