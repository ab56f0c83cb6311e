"""The specification of RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization")
and of Mamba-2's gated RMSNorm (Dao & Gu 2024; mamba_ssm's ``RMSNormGated``), one row at a time
in float64: the reference the tests compare both faster paths with."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _silu(v: float) -> float:
    return v / (1.0 + math.exp(-v))


def _norm_row(row: list[float], eps: float) -> list[float]:
    rstd = 1.0 / math.sqrt(sum(v * v for v in row) / len(row) + eps)
    return [v * rstd for v in row]


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dim; with ``residual``,
    ``h = x + residual`` is normalised instead and ``(y, h)`` returned. fp64 results."""
    src = x.double() if residual is None else x.double() + residual.double()
    w = weight.double().tolist()
    rows = src.reshape(-1, src.shape[-1]).tolist()
    out = [[v * wj for v, wj in zip(_norm_row(row, eps), w)] for row in rows]
    y = torch.tensor(out, dtype=torch.float64).reshape(src.shape)
    return y if residual is None else (y, src)


def gated_rms_norm(x: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int | None = None,
                   norm_before_gate: bool = False) -> Tensor:
    """``rmsnorm(x * silu(z)) * weight``, or ``rmsnorm(x) * weight * silu(z)`` with
    ``norm_before_gate``, the mean of squares over each group of ``group_size`` channels (the
    whole last dim when None). fp64 result."""
    d = x.shape[-1]
    gs = group_size or d
    w = weight.double().tolist()
    out = []
    for xr, zr in zip(x.double().reshape(-1, d).tolist(), z.double().reshape(-1, d).tolist()):
        gate = [_silu(v) for v in zr]
        src = xr if norm_before_gate else [a * g for a, g in zip(xr, gate)]
        normed = [v for s in range(0, d, gs) for v in _norm_row(src[s:s + gs], eps)]
        y = [v * wj for v, wj in zip(normed, w)]
        out.append([v * g for v, g in zip(y, gate)] if norm_before_gate else y)
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape)
