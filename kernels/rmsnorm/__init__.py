"""RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"), optionally fused
with the residual add of a pre-norm block, and Mamba-2's gated RMSNorm (Dao & Gu 2024,
"Transformers are SSMs"; mamba_ssm's ``RMSNormGated``), which SambaY's GMU reuses:

    y = x / sqrt(mean(x^2) + eps) * weight

Layout: ``naive.py`` (the specification, a row loop in fp64), ``ops_torch.py`` (PyTorch: the CPU
path) and ``fused.py`` (Triton forward and backward, the residual add and the gate fused; the
weight gradient from per-program partial rows summed in torch, deterministic). 'auto' runs the
Triton kernels on CUDA.
"""

from __future__ import annotations

from torch import Tensor

from kernels.dispatch import check_inputs, select
from kernels.rmsnorm import ops_torch

__all__ = ["gated_rms_norm", "rms_norm"]


def rms_norm(x: Tensor, weight: Tensor, eps: float, *, residual: Tensor | None = None,
             backend: str = "auto") -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm over the last dimension, computed in fp32 (fp64 inputs in fp64 on the torch path).

    Args:
        x: ``[..., D]`` input (with ``residual``: the branch output added to the stream).
        weight: ``[D]`` scale.
        eps: added to the mean of squares, inside the square root.
        residual: ``[..., D]`` residual stream, or None. When given the add is fused:
            ``h = x + residual``, rounded to residual's dtype, is normalised.
        backend: ``model.kernels``: 'auto', 'triton' or 'torch' (``PRETRAIN_KERNELS`` overrides).

    Returns:
        ``y [..., D]`` in x's dtype; with ``residual``, ``(y, h)``: ``y`` normalised from ``h``,
        both in residual's dtype. Differentiable in x, residual and weight.

    Raises:
        ValueError: mismatched shapes, non-float inputs, several devices, or a backend that
            cannot run (:func:`kernels.dispatch.select`).
    """
    check_inputs("rms_norm", dict(x=x, weight=weight, residual=residual))
    if x.dim() == 0 or weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: x {tuple(x.shape)} must be [..., D] and weight {tuple(weight.shape)} [D]")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} must be x's {tuple(x.shape)}")
    if select("rms_norm", backend, x.device, "kernels.rmsnorm.fused") == "triton":
        from kernels.rmsnorm import fused  # noqa: PLC0415  (only where triton is installed)

        return fused.rms_norm_triton(x, weight, eps, residual)
    return ops_torch.rms_norm(x, weight, eps, residual)


def gated_rms_norm(x: Tensor, z: Tensor, weight: Tensor, eps: float, *, group_size: int | None = None,
                   norm_before_gate: bool = False, backend: str = "auto") -> Tensor:
    """Gated RMSNorm: ``rmsnorm(x * silu(z)) * weight`` (``norm_before_gate=False``, what Mamba-2
    and SambaY's GMU use), or ``rmsnorm(x) * weight * silu(z)``; the mean of squares is taken
    per group of ``group_size`` consecutive channels (Mamba-2: one group per B/C group).

    Args:
        x: ``[..., D]`` input (Mamba-2: the SSD output; GMU: the memory).
        z: ``[..., D]`` gate before its SiLU.
        weight: ``[D]`` scale.
        eps: added to each group's mean of squares.
        group_size: channels per group, dividing D; None for one group of D.
        norm_before_gate: apply the gate after the norm instead of before it.
        backend: ``model.kernels``: 'auto', 'triton' or 'torch' (``PRETRAIN_KERNELS`` overrides).

    Returns:
        ``[..., D]`` in x's dtype, computed in fp32 (fp64 on the torch path for fp64 inputs).
        Differentiable in x, z and weight.

    Raises:
        ValueError: mismatched shapes, a group size that does not divide D, non-float inputs,
            several devices, or a backend that cannot run.
    """
    check_inputs("gated_rms_norm", dict(x=x, z=z, weight=weight))
    d = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or z.shape != x.shape or weight.shape != (d,):
        raise ValueError(
            f"gated_rms_norm: x {tuple(x.shape)} and z {tuple(z.shape)} must be [..., D], "
            f"weight {tuple(weight.shape)} [D]"
        )
    group_size = group_size or d
    if group_size <= 0 or d % group_size:
        raise ValueError(f"gated_rms_norm: group_size {group_size} must divide D = {d}")
    if select("gated_rms_norm", backend, x.device, "kernels.rmsnorm.fused") == "triton":
        from kernels.rmsnorm import fused  # noqa: PLC0415  (only where triton is installed)

        return fused.gated_rms_norm_triton(x, z, weight, eps, group_size, norm_before_gate)
    return ops_torch.gated_rms_norm(x, z, weight, eps, group_size, norm_before_gate)
