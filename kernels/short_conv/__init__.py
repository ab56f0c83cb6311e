"""The short causal depthwise convolution (width 2-4) that Mamba (Gu & Dao 2023, section 3.4),
Mamba-2 (Dao & Gu 2024) and Titans (Behrouz et al. 2024, section 4.4) put before their
recurrences, with a document mask and a decoding state:

    y[t, c] = act(bias[c] + sum_{s=0}^{W-1} [positions[t] >= s] * weight[c, W-1-s] * x[t-s, c])

(tap W-1 multiplies the current token; inputs before t = 0 come from the initial state; a tap
never reads before the token's document start; act = SiLU or the identity).

Layout: ``naive.py`` (the specification, a token loop), ``conv_torch.py`` (PyTorch shifted
multiply-adds, autograd backward: the CPU path), ``chunk.py`` (Triton forward and backward over a
sequence, SiLU fused) and ``recurrent.py`` (the Triton one-token update for decoding). 'auto' runs
the Triton kernels on CUDA. Token-major (``[B, T, C]``), unlike the ``[B, C, T]`` of nn.Conv1d
and Dao's causal-conv1d package; the weight is nn.Conv1d's depthwise ``[C, 1, W]`` without the 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dispatch import check_inputs, select
from kernels.short_conv import conv_torch

__all__ = ["causal_conv1d", "causal_conv1d_update", "final_conv_state"]
ACTIVATIONS = (None, "silu")


def _check_common(op: str, c: int, weight: Tensor, bias: Tensor | None, activation: str | None) -> None:
    if weight.dim() != 2 or weight.shape[0] != c or weight.shape[1] < 1:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} must be [C={c}, W >= 1]")
    if bias is not None and bias.shape != (c,):
        raise ValueError(f"{op}: bias {tuple(bias.shape)} must be [{c}]")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation {activation!r} must be None or 'silu'")


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    positions: Tensor | None = None,
    initial_state: Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
) -> Tensor:
    """Short causal depthwise convolution over a sequence (training, prefill).

    Args:
        x: ``[B, T, C]`` float inputs (channels contiguous on the Triton path, else copied).
        weight: ``[C, W]`` taps: ``weight[:, W-1]`` multiplies the current token,
            ``weight[:, W-1-s]`` the input s steps back (nn.Conv1d's ``weight[:, 0, :]``).
        bias: ``[C]`` or None.
        positions: ``[B, T]`` integer position of each token in its document, or None (no
            mask): the input s steps back counts only where ``positions >= s``, so a document
            start (position 0) reads nothing before it, the initial state included.
        initial_state: ``[B, C, W-1]`` the W-1 inputs before ``x`` (oldest first; any strides),
            or None for zeros: continuing a decoding cache.
        activation: None or 'silu' (fused into the kernel).
        backend: ``model.kernels``: 'auto', 'triton' or 'torch' (``PRETRAIN_KERNELS`` overrides).

    Returns:
        ``y [B, T, C]`` in x's dtype (computed in fp32 on the Triton path). Differentiable in x,
        weight, bias and initial_state; the Triton backward is deterministic.

    Raises:
        ValueError: mismatched shapes, non-float inputs, several devices, an empty sequence, an
            unknown activation, or a backend that cannot run (:func:`kernels.dispatch.select`).
    """
    check_inputs("causal_conv1d", dict(x=x, weight=weight, bias=bias, initial_state=initial_state))
    if x.dim() != 3 or x.shape[1] == 0:
        raise ValueError(f"causal_conv1d: x {tuple(x.shape)} must be [B, T > 0, C]")
    b, t, c = x.shape
    _check_common("causal_conv1d", c, weight, bias, activation)
    k = weight.shape[1]
    if initial_state is not None and initial_state.shape != (b, c, k - 1):
        raise ValueError(f"causal_conv1d: initial_state {tuple(initial_state.shape)} must be {(b, c, k - 1)}")
    if positions is not None and (positions.shape != (b, t) or positions.is_floating_point()):
        raise ValueError(f"causal_conv1d: positions {tuple(positions.shape)} must be integer {(b, t)}")
    if k == 1:  # no past to read: nothing for a state or a mask to do
        initial_state = positions = None
    if select("causal_conv1d", backend, x.device, "kernels.short_conv.chunk") == "triton":
        from kernels.short_conv import chunk  # noqa: PLC0415  (only where triton is installed)

        return chunk.causal_conv1d_triton(x, weight, bias, positions, initial_state, activation)
    return conv_torch.causal_conv1d(x, weight, bias, positions, initial_state, activation)


def final_conv_state(x: Tensor, initial_state: Tensor | None, width: int) -> Tensor:
    """The decoding state after ``x [B, T, C]``: its last ``width - 1`` inputs ``[B, C, W-1]``
    (oldest first), reaching into ``initial_state [B, C, W-1]`` (zeros when None) when T < W-1;
    in x's dtype, differentiable (a view-and-copy, no kernel needed)."""
    if initial_state is None:
        initial_state = x.new_zeros(x.shape[0], x.shape[2], width - 1)
    return torch.cat([initial_state.to(x.dtype), x.transpose(1, 2)], dim=-1)[..., x.shape[1] :]


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    positions: Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One token of :func:`causal_conv1d` (decoding), the name of Dao's causal-conv1d package.

    Args:
        x: ``[B, C]`` the new token's inputs.
        conv_state: ``[B, C, W-1]`` the previous inputs, oldest first (any strides).
        weight, bias, activation, backend: as :func:`causal_conv1d` (W = 1, no state, runs the
            PyTorch path: the Triton kernel needs W >= 2).
        positions: ``[B]`` integer position of the token in its document, or None: tap s reads
            the state only where ``positions >= s``. (A position, not a reset flag: two tokens
            into a new document the state still holds the previous document's last input.)

    Returns:
        ``(y [B, C] in x's dtype, new state [B, C, W-1] in conv_state's dtype)``: the state
        shifted left by one with x last; a fresh tensor, ``conv_state`` is not modified.

    Raises:
        ValueError: as :func:`causal_conv1d`.
    """
    check_inputs("causal_conv1d_update", dict(x=x, conv_state=conv_state, weight=weight, bias=bias))
    if x.dim() != 2:
        raise ValueError(f"causal_conv1d_update: x {tuple(x.shape)} must be [B, C]")
    b, c = x.shape
    _check_common("causal_conv1d_update", c, weight, bias, activation)
    k = weight.shape[1]
    if conv_state.shape != (b, c, k - 1):
        raise ValueError(f"causal_conv1d_update: conv_state {tuple(conv_state.shape)} must be {(b, c, k - 1)} "
                         f"(W - 1 = {k - 1} previous inputs)")
    if positions is not None and (positions.shape != (b,) or positions.is_floating_point()):
        raise ValueError(f"causal_conv1d_update: positions {tuple(positions.shape)} must be integer [{b}]")
    if k >= 2 and select("causal_conv1d_update", backend, x.device, "kernels.short_conv.recurrent") == "triton":
        from kernels.short_conv import recurrent  # noqa: PLC0415  (only where triton is installed)

        return recurrent.causal_conv1d_update_triton(x, conv_state, weight, bias, positions, activation)
    return conv_torch.causal_conv1d_update(x, conv_state, weight, bias, positions, activation)
