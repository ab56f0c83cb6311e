"""RMSNorm computed in at least fp32 (bf16 mean-of-squares loses too much precision)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in fp32, or as it is when it is already wider (fp64): the precision floor of norms,
    rotations and logits, which must not round a float64 check down to fp32."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = at_least_fp32(x)
        y = F.rms_norm(xf, (x.shape[-1],), self.weight.to(xf.dtype), self.eps)
        return y.to(x.dtype)

    def init_weights(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)
