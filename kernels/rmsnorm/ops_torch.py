"""RMSNorm and the gated RMSNorm in PyTorch (the CPU path, autograd by torch), computed in at
least fp32: a bf16 mean of squares loses too much precision."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kernels.dispatch import at_least_fp32


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """As :func:`kernels.rmsnorm.rms_norm`; ``h = residual + x`` rounded to residual's dtype."""
    if residual is not None:
        h = (residual + x).to(residual.dtype)
        return rms_norm(h, weight, eps), h
    xf = at_least_fp32(x)
    return F.rms_norm(xf, (x.shape[-1],), weight.to(xf.dtype), eps).to(x.dtype)


def gated_rms_norm(x: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int,
                   norm_before_gate: bool = False) -> Tensor:
    """As :func:`kernels.rmsnorm.gated_rms_norm` (``group_size`` divides the last dim)."""
    gate = F.silu(at_least_fp32(z))
    y = at_least_fp32(x) if norm_before_gate else at_least_fp32(x) * gate
    y = F.rms_norm(y.unflatten(-1, (-1, group_size)), (group_size,), eps=eps).flatten(-2)
    y = y * at_least_fp32(weight)
    return (y * gate if norm_before_gate else y).to(x.dtype)
