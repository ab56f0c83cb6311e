"""Mamba-2's state space duality (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and
Efficient Algorithms Through Structured State Space Duality"), per head h with a scalar decay
``A[h]`` and B/C shared by the heads of a group:

    H_t = exp(dt_t A) H_{t-1} + dt_t x_t (x) B_t        y_t = H_t C_t + D x_t     (H: [P, N])

Layout: ``naive.py`` (the specification), ``chunk_torch.py`` (the paper's chunked algorithm in
PyTorch: the CPU path), and a Triton kernel ``chunk.py`` where present (none yet).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dispatch import check_inputs, select
from kernels.ssd import chunk_torch

__all__ = ["ssd_chunked", "ssd_step"]


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
    *,
    reset: Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """SSD over a whole sequence (training, prefill), chunk by chunk.

    Args:
        x: ``[B, T, H, P]`` input (after the short convolution).
        dt: ``[B, T, H]`` positive step sizes (bias and softplus already applied).
        A: ``[H]`` negative scalar decay per head.
        B, C: ``[B, T, G, N]`` input and output projections of the state; G divides H.
        D: ``[H]`` skip connection, or None.
        initial_state: ``[B, H, P, N]`` state before the first token, or None for zeros.
        reset: ``[B, T]`` bool, True where a document starts: the carried state (initial_state
            too, at t = 0) is dropped before that token is added.
        chunk_size: tokens per chunk; T need not be a multiple of it.
        backend: ``model.kernels``: 'auto', 'triton' or 'torch' (``PRETRAIN_KERNELS`` overrides).

    Returns:
        ``y [B, T, H, P]`` in x's dtype, and the final state ``[B, H, P, N]`` in fp32 (fp64 for fp64 inputs).

    Raises:
        ValueError: mismatched shapes, non-float inputs, several devices, an empty sequence, a
            chunk_size <= 0, or a backend that cannot run (:func:`kernels.dispatch.select`).
    """
    check_inputs("ssd_chunked", dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=initial_state))
    if x.dim() != 4:
        raise ValueError(f"ssd_chunked: x {tuple(x.shape)} must be [B, T, H, P]")
    if initial_state is not None and (B.dim() != 4 or initial_state.shape != (x.shape[0], *x.shape[2:], B.shape[-1])):
        raise ValueError(f"ssd_chunked: initial_state {tuple(initial_state.shape)} must be [B, H, P, N]")
    if reset is not None and reset.dtype != torch.bool:
        raise ValueError(f"ssd_chunked: reset must be bool, got {reset.dtype}")
    select("ssd", backend, x.device, None)  # no Triton kernel yet: 'triton' raises
    return chunk_torch.ssd_chunked(x, dt, A, B, C, D, h0=initial_state, reset=reset, chunk_size=chunk_size)


def ssd_step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    *,
    reset: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One token of :func:`ssd_chunked` (decoding): ``state [B, H, P, N]``, ``x [B, H, P]``,
    ``dt [B, H]``, ``A, D [H]``, ``B, C [B, G, N]``, ``reset [B]`` bool. Returns ``(y [B, H, P]``
    in x's dtype, new state fp32). Raises ValueError as :func:`ssd_chunked`."""
    check_inputs("ssd_step", dict(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D))
    if x.dim() != 3 or B.dim() != 3 or state.shape != (*x.shape, B.shape[-1]) or A.shape != (x.shape[1],):
        raise ValueError(
            f"ssd_step: state {tuple(state.shape)}, x {tuple(x.shape)}, A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    if reset is not None and reset.shape != x.shape[:1]:
        raise ValueError(f"ssd_step: reset {tuple(reset.shape)} must be {tuple(x.shape[:1])}")
    select("ssd", backend, x.device, None)
    return chunk_torch.ssd_step(state, x, dt, A, B, C, D, reset=reset)
