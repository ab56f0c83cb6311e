"""The specification of SwiGLU's gating (Shazeer 2020, "GLU Variants Improve Transformer"),
``silu(gate) * up``, one element at a time in float64: the tests' reference."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` elementwise, fp64, ``silu(v) = v / (1 + exp(-v))``."""
    out = [g / (1.0 + math.exp(-g)) * u for g, u in zip(gate.double().flatten().tolist(), up.double().flatten().tolist())]
    return torch.tensor(out, dtype=torch.float64).reshape(gate.shape)
