"""The Gated Memory Unit's element-wise core (Ren et al. 2025, SambaY): gate a memory read
``m`` (an earlier Mamba / Mamba-2 / GLA layer's output) with the current input's projection,
``y = m ⊙ silu(W1 x)``; the layer (:mod:`pretrain.models.layers.gmu`) adds the projections.

It is SwiGLU's gating with the memory as the "up" operand, so it runs the same Triton kernel
(:mod:`kernels.swiglu.elementwise`, forward and backward, nothing stored but the inputs). The
GMU over a Mamba-2 or GLA memory normalises the product per group first (ArchScale's GMU with
``use_norm``): :func:`gated_memory_rms_norm`, the gated RMSNorm of :mod:`kernels.rmsnorm`.
Layout: ``naive.py`` (the specification).
"""

from __future__ import annotations

from torch import Tensor

from kernels.rmsnorm import gated_rms_norm
from kernels.swiglu import _gated

__all__ = ["gated_memory", "gated_memory_rms_norm"]


def gated_memory(memory: Tensor, gate: Tensor, *, backend: str = "auto") -> Tensor:
    """``memory ⊙ silu(gate)`` for ``memory, gate [B, T, d_mem]`` (any equal shapes) -> the
    same shape, in their promoted dtype. ``backend``: ``model.kernels`` ('auto', 'triton',
    'torch'). Raises ValueError for different shapes, non-float inputs, several devices or a
    backend that cannot run."""
    return _gated("gated_memory", gate, memory, backend)


def gated_memory_rms_norm(memory: Tensor, gate: Tensor, weight: Tensor, eps: float, group_size: int, *,
                          backend: str = "auto") -> Tensor:
    """``rmsnorm(memory ⊙ silu(gate)) * weight`` per group of ``group_size`` channels (SambaY's
    GMU over a Mamba-2 / GLA memory), in memory's dtype; :func:`kernels.rmsnorm.gated_rms_norm`
    with the gate before the norm. Raises ValueError as that function."""
    return gated_rms_norm(memory, gate, weight, eps, group_size=group_size, backend=backend)
