"""The Gated Memory Unit's element-wise core (Ren et al. 2025, "Decoder-Hybrid-Decoder
Architecture for Efficient Reasoning with Long Generation", SambaY): gate a memory read ``m``
(an earlier Mamba / Mamba-2 / GLA layer's output) with the current input's projection,
``m ⊙ silu(W1 x)``; the layer (:mod:`pretrain.models.layers.gmu`) adds the projections.

It is SwiGLU's gating with the memory as the "up" operand, so it runs the same Triton kernel
(:mod:`kernels.swiglu.elementwise`: forward, and a backward that stores nothing but the inputs).
The GMU over a Mamba-2 or GLA memory normalises the product per group first (ArchScale's GMU
with ``use_norm``): that variant is :func:`kernels.rmsnorm.gated_rms_norm` with the gate before
the norm, called through the layer's ``RMSNormGated`` (which also handles a tensor-parallel
rank's partial group). Layout: ``naive.py`` (the specification).
"""

from __future__ import annotations

from torch import Tensor

from kernels.swiglu import _gated

__all__ = ["gated_memory"]


def gated_memory(memory: Tensor, gate: Tensor, *, backend: str = "auto") -> Tensor:
    """``memory ⊙ silu(gate)`` for ``memory, gate [B, T, d_mem]`` (any equal shapes) -> the
    same shape, in their promoted dtype (the Triton kernel computes in fp32).

    Args:
        memory: the memory read ``m``.
        gate: the input's projection ``W1 x``, before its SiLU.
        backend: ``model.kernels``: 'auto', 'triton' or 'torch' (``PRETRAIN_KERNELS`` overrides).

    Raises:
        ValueError: different shapes, non-float inputs, several devices, or a backend that cannot
            run (:func:`kernels.dispatch.select`).
    """
    return _gated("gated_memory", gate, memory, backend)
