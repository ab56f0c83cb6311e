"""The Gated Memory Unit's core (SambaY, Ren et al. 2025): gate a memory read with the input.

One function, :func:`gated_memory`, that a fused kernel (ArchScale's swiglu jiterator) can
replace; the layer (:mod:`pretrain.models.layers.gmu`) adds the two projections.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def gated_memory(memory: Tensor, gate: Tensor) -> Tensor:
    """``memory ⊙ SiLU(gate)`` for ``memory, gate [B, T, d_mem]`` -> ``[B, T, d_mem]``."""
    if memory.shape != gate.shape:
        raise ValueError(f"gated_memory: memory {tuple(memory.shape)} and gate {tuple(gate.shape)} differ")
    return memory * F.silu(gate)
