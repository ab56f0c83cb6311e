"""The specification of SwiGLU's gating (Shazeer 2020, "GLU Variants Improve Transformer"),
``silu(gate) * up`` with ``silu(v) = v / (1 + exp(-v))``, one row at a time in float64: the
tests' reference, differentiable by autograd for the gradients."""

from __future__ import annotations

import torch
from torch import Tensor


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """``silu(gate) * up`` elementwise, fp64."""
    g, u = gate.double().reshape(-1, gate.shape[-1]), up.double().reshape(-1, up.shape[-1])
    return torch.stack([g[i] / (1.0 + torch.exp(-g[i])) * u[i] for i in range(g.shape[0])]).reshape(gate.shape)
