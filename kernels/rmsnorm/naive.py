"""The specification of RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization")
and of Mamba-2's gated RMSNorm (Dao & Gu 2024; mamba_ssm's ``RMSNormGated``), one row (and
group) at a time in float64 with the formulas written out: the reference the tests compare both
faster paths with, differentiable by autograd for the gradients."""

from __future__ import annotations

import torch
from torch import Tensor


def _silu(v: Tensor) -> Tensor:
    return v / (1.0 + torch.exp(-v))


def _norm(v: Tensor, eps: float) -> Tensor:
    """One row or group ``v [n]``: ``v / sqrt(sum(v^2) / n + eps)``."""
    return v / torch.sqrt((v * v).sum() / v.numel() + eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dim; with ``residual``,
    ``h = x + residual`` is normalised instead and ``(y, h)`` returned. fp64 results."""
    src = x.double() if residual is None else x.double() + residual.double()
    w = weight.double()
    rows = src.reshape(-1, src.shape[-1])
    y = torch.stack([_norm(rows[i], eps) * w for i in range(rows.shape[0])]).reshape(src.shape)
    return y if residual is None else (y, src)


def gated_rms_norm(x: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int | None = None,
                   norm_before_gate: bool = False) -> Tensor:
    """``rmsnorm(x * silu(z)) * weight``, or ``rmsnorm(x) * weight * silu(z)`` with
    ``norm_before_gate``, the mean of squares over each group of ``group_size`` channels (the
    whole last dim when None). fp64 result."""
    d = x.shape[-1]
    gs = group_size or d
    w = weight.double()
    xs, zs = x.double().reshape(-1, d), z.double().reshape(-1, d)
    out = []
    for i in range(xs.shape[0]):
        gate = _silu(zs[i])
        src = xs[i] if norm_before_gate else xs[i] * gate
        y = torch.cat([_norm(src[s:s + gs], eps) for s in range(0, d, gs)]) * w
        out.append(y * gate if norm_before_gate else y)
    return torch.stack(out).reshape(x.shape)
