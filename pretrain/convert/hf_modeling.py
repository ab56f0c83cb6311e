"""Our ``HybridLM`` as a transformers model, for the remote-code export of the families that
have no native transformers class (pretrain/convert/remote.py bundles this file, with the
model code it imports, into the folder as ``modeling_pretrain.py``).

:class:`PretrainHybridConfig` keeps our ``[model]`` section (``pretrain_model``) next to the
standard names tools read; :class:`PretrainHybridForCausalLM` holds the ``HybridLM`` modules under
our own parameter names (``embed.weight``, ``blocks.0.mixer.wq.weight``, ...; a tied head has no
weight of its own) and decodes through our recurrent cache (:class:`pretrain.models.Cache`, what
`pretrain generate` uses): ``generate()`` costs one token's work per new token, whatever the
mixers (attention keeps its K/V, the recurrent mixers their fixed-size states).

Imports stay within torch, transformers and our model code: this file must run without the
``pretrain`` package once bundled.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from pretrain.config.model import ModelConfig
from pretrain.models import Cache, HybridLM


class PretrainHybridConfig(PretrainedConfig):
    """transformers config of a ``HybridLM``.

    ``pretrain_model``: our ``ModelConfig`` as a dict (``dataclasses.asdict``), the whole
    architecture; the standard fields (``vocab_size``, ``hidden_size``, ``num_hidden_layers``,
    ``tie_word_embeddings``, token ids, ...) are copies for tools and are written by the export.
    ``use_cache``: whether ``forward`` returns a decoding cache when not told otherwise."""

    model_type = "pretrain_hybrid"

    def __init__(self, pretrain_model: dict[str, Any] | None = None, use_cache: bool = True, **kwargs: Any) -> None:
        self.pretrain_model = dict(pretrain_model or {})
        self.use_cache = use_cache
        super().__init__(**kwargs)


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """``ModelConfig`` from ``dataclasses.asdict`` output (nested sections as dicts). Raises
    TypeError on a field ModelConfig does not have."""
    defaults = ModelConfig()
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(ModelConfig):
        if f.name not in data:
            continue
        value = data[f.name]
        section = getattr(defaults, f.name)
        if isinstance(value, dict) and dataclasses.is_dataclass(section):
            value = type(section)(**value)
        kwargs[f.name] = value
    unknown = sorted(set(data) - set(kwargs))
    if unknown:
        raise TypeError(f"pretrain_model: unknown ModelConfig fields {unknown}")
    return ModelConfig(**kwargs)


class PretrainHybridForCausalLM(PreTrainedModel, GenerationMixin):
    """A ``HybridLM`` behind the transformers causal-LM interface.

    ``forward(input_ids [B, T] int64)`` -> ``CausalLMOutputWithPast`` with fp32 ``logits
    [B, T, V]`` and, with ``use_cache``, ``cache``: our decoding :class:`Cache`, consumed and
    updated in place by the next call (any number of new tokens). Every row is one causal
    stream starting at the cache's offset: padding (an ``attention_mask`` with zeros) raises
    ValueError, and ``position_ids`` are ignored. ``labels [B, T]`` (-100 ignored) add the mean
    next-token cross-entropy as ``loss``.
    """

    config_class = PretrainHybridConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _is_stateful = True  # a recurrent state cannot be rolled back: no assisted decoding

    def __init__(self, config: PretrainHybridConfig) -> None:
        super().__init__(config)
        lm = HybridLM(model_config_from_dict(config.pretrain_model))
        # our modules directly under this one: the state_dict keeps our names; the HybridLM is
        # kept unregistered and runs on these same modules
        for name, child in lm.named_children():
            self.add_module(name, child)
        object.__setattr__(self, "lm", lm)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not make a DynamicCache: the first forward creates our Cache
        return False

    def _init_weights(self, module: torch.nn.Module) -> None:
        """HybridLM initialises itself when built; loading then overwrites every weight."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.embed

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.embed = self.lm.embed = value

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        labels: Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("attention_mask: padded inputs are not supported (each row is one unpadded sequence)")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = self.lm.new_cache(input_ids.shape[0])
        logits = self.lm(input_ids, cache=cache if use_cache else None)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().to(logits.device))
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
