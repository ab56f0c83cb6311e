"""SwiGLU's gating (Shazeer 2020, "GLU Variants Improve Transformer"): ``silu(gate) * up``, the
element-wise core of the SwiGLU feed-forward ``w2(silu(w1 x) * w3 x)``.

Layout: ``naive.py`` (the specification, element by element in fp64), the PyTorch path inline
below (two element-wise ops, autograd by torch) and ``elementwise.py`` (Triton forward and
backward; the backward recomputes silu(gate) instead of storing it). 'auto' runs the Triton
kernel on CUDA. SambaY's Gated Memory Unit reuses it (:mod:`kernels.gmu`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from kernels.dispatch import check_inputs, select

__all__ = ["swiglu"]


def swiglu(gate: Tensor, up: Tensor, *, backend: str = "auto") -> Tensor:
    """``silu(gate) * up`` element-wise, ``silu(v) = v * sigmoid(v)``.

    Args:
        gate, up: ``[..., N]`` tensors of one shape (the two up-projections).
        backend: ``model.kernels``: 'auto', 'triton' or 'torch' (``PRETRAIN_KERNELS`` overrides).

    Returns:
        ``[..., N]`` in the promoted dtype of gate and up (computed in fp32 by the Triton kernel,
        in that dtype by the PyTorch path). Differentiable in both inputs.

    Raises:
        ValueError: different shapes, non-float inputs, several devices, or a backend that cannot
            run (:func:`kernels.dispatch.select`).
    """
    return _gated("swiglu", gate, up, backend)


def _gated(op: str, gate: Tensor, up: Tensor, backend: str) -> Tensor:
    """``silu(gate) * up`` for the public op ``op`` (its name in messages and dispatch)."""
    check_inputs(op, dict(gate=gate, up=up))
    if gate.shape != up.shape:
        raise ValueError(f"{op}: shapes differ: {tuple(gate.shape)} and {tuple(up.shape)}")
    if select(op, backend, gate.device, "kernels.swiglu.elementwise") == "triton":
        from kernels.swiglu import elementwise  # noqa: PLC0415  (only where triton is installed)

        return elementwise.swiglu_triton(gate, up)
    return F.silu(gate) * up
