"""Model package: nn.Modules only (no torch.distributed here).

``build_model(cfg)`` builds a :class:`HybridLM` from ``ModelConfig``; stats for ``pretrain plan``
and MFU live in :mod:`pretrain.models.stats`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# The registry first: it imports every layer module, so a layer module may import another
# (DiffAttention subclasses Attention) whichever one a caller happens to import first.
from pretrain.models import registry  # noqa: F401  # isort: skip
from pretrain.models.context import Cache, ForwardContext
from pretrain.models.hybrid import Block, HybridLM
from pretrain.models.stats import count_parameters, flops_per_token, memory_estimate

if TYPE_CHECKING:
    from pretrain.config import ModelConfig


def build_model(model_config: ModelConfig) -> HybridLM:
    """The decoder of ``model_config``, initialised from the current torch RNG (on the current
    default device: build under ``torch.device("meta")`` and call ``to_empty`` + ``init_weights``
    to materialise later)."""
    return HybridLM(model_config)


__all__ = [
    "Block",
    "Cache",
    "ForwardContext",
    "HybridLM",
    "build_model",
    "count_parameters",
    "flops_per_token",
    "memory_estimate",
]
