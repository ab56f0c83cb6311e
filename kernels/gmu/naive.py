"""The specification of the Gated Memory Unit's element-wise core (Ren et al. 2025, "Decoder-
Hybrid-Decoder Architecture for Efficient Reasoning with Long Generation", SambaY):
``memory * silu(gate)``, element by element in float64; the normalised variant is
:func:`kernels.rmsnorm.naive.gated_rms_norm` (gate before the norm)."""

from __future__ import annotations

from torch import Tensor

from kernels.swiglu import naive


def gated_memory(memory: Tensor, gate: Tensor) -> Tensor:
    """``memory ⊙ silu(gate)``, fp64."""
    return naive.swiglu(gate, memory)
