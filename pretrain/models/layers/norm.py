"""RMSNorm computed in at least fp32 (bf16 mean-of-squares loses too much precision), through
:func:`kernels.rmsnorm.rms_norm` (the Triton kernel, or PyTorch, as ``model.kernels`` says)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.dispatch import cpu_torch_path
from kernels.rmsnorm import rms_norm
from pretrain.models.layers.decode_weights import decoding


def at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in fp32, or as it is when it is already wider (fp64): the precision floor of norms,
    rotations and logits, which must not round a float64 check down to fp32."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with a learned ``weight [dim]``. ``kernels``:
    ``model.kernels`` ('auto', 'triton', 'torch'); the default keeps the PyTorch path for the
    layers that do not pass it."""

    def __init__(self, dim: int, eps: float = 1e-5, kernels: str = "torch") -> None:
        super().__init__()
        self.eps = eps
        self.kernels = kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """``x [..., dim]`` -> normalised, in x's dtype. With ``residual`` the pre-norm block's
        add is fused: returns ``(rmsnorm(h), h)`` for ``h = x + residual`` (residual's dtype)."""
        if decoding(x) and x.dtype == self.weight.dtype == torch.float32 and cpu_torch_path(self.kernels, x):
            # a decoding step on the CPU: the PyTorch path's one fused op, without the dispatch
            # checks that cost more than the op itself on one token
            if residual is None:
                return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)
            h = residual + x
            return F.rms_norm(h, h.shape[-1:], self.weight, self.eps), h
        return rms_norm(x, self.weight, self.eps, residual=residual, backend=self.kernels)

    def init_weights(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)
