"""Mamba-2's state space duality (Dao & Gu 2024, "Transformers are SSMs: Generalized Models and
Efficient Algorithms Through Structured State Space Duality"), per head h with a scalar decay
``A[h]`` and B/C shared by the heads of a group:

    H_t = exp(dt_t A) H_{t-1} + dt_t x_t (x) B_t        y_t = H_t C_t + D x_t     (H: [P, N])

Layout: ``naive.py`` (the specification), ``chunk_torch.py`` (the paper's chunked algorithm in
PyTorch: the CPU path), ``chunk.py`` (the chunked forward and backward in Triton) and
``recurrent.py`` (the one-token decoding step in Triton). :func:`ssd_chunked` and :func:`ssd_step`
pick one (:mod:`kernels.dispatch`); tests/kernels/test_ssd_triton.py compares the Triton kernels
with the token loop and the PyTorch path under the interpreter. ``state_passing.py`` (PyTorch): an
initial state's part of the outputs and the sequence's total decay, for context parallelism.

Packed documents: the models mark them with ``reset`` ``[B, T]`` (True where a document starts),
which works for any batch size; ``cu_seqlens`` (the fla / mamba_ssm convention, B = 1) packs
sequences that each get their own initial and final state.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dispatch import check_inputs, select
from kernels.ssd import chunk_torch
from kernels.ssd.state_passing import ssd_initial_state_output, ssd_total_decay

__all__ = ["ssd_chunked", "ssd_step", "ssd_initial_state_output", "ssd_total_decay"]


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
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """SSD over a whole sequence (training, prefill), chunk by chunk.

    Args:
        x: ``[B, T, H, P]`` input (after the short convolution).
        dt: ``[B, T, H]`` positive step sizes (bias and softplus already applied).
        A: ``[H]`` negative scalar decay per head.
        B, C: ``[B, T, G, N]`` input and output projections of the state; G divides H.
        D: ``[H]`` skip connection, or None.
        initial_state: ``[B, H, P, N]`` state before the first token (``[S, H, P, N]``, one
            per sequence, with ``cu_seqlens``), or None for zeros.
        reset: ``[B, T]`` bool, True where a document starts: the carried state (initial_state
            too, at t = 0) is dropped before that token is added.
        chunk_size: tokens per chunk of the PyTorch path (the Triton kernel uses its own
            ``kernels.ssd.chunk.CHUNK``); T need not be a multiple of it.
        cu_seqlens: ``[S + 1]`` integer offsets of S sequences packed along T (B must be 1),
            rising strictly from 0 to T; or None.
        backend: ``model.kernels``: 'auto', 'triton' or 'torch' (``PRETRAIN_KERNELS`` overrides).

    Returns:
        ``y [B, T, H, P]`` in x's dtype, and the final state ``[B, H, P, N]`` (``[S, H, P, N]``
        with ``cu_seqlens``) in fp32 (fp64 for fp64 inputs on the PyTorch path).

    Raises:
        ValueError: mismatched shapes, non-float inputs, several devices, an empty sequence, a
            chunk_size <= 0, bad ``cu_seqlens``, or a backend that cannot run
            (:func:`kernels.dispatch.select`).
    """
    check_inputs("ssd_chunked", dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=initial_state))
    if x.dim() != 4:
        raise ValueError(f"ssd_chunked: x {tuple(x.shape)} must be [B, T, H, P]")
    n_seq = x.shape[0] if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, x.shape[:2])
    if initial_state is not None and (B.dim() != 4 or initial_state.shape != (n_seq, *x.shape[2:], B.shape[-1])):
        raise ValueError(f"ssd_chunked: initial_state {tuple(initial_state.shape)} must be [{n_seq}, H, P, N]")
    if reset is not None and reset.dtype != torch.bool:
        raise ValueError(f"ssd_chunked: reset must be bool, got {reset.dtype}")
    if chunk_size <= 0:
        raise ValueError(f"ssd_chunked: chunk_size must be > 0, got {chunk_size}")
    if select("ssd", backend, x.device, "kernels.ssd.chunk") == "triton":
        chunk_torch._check_shapes(x, dt, A, B, C, D)
        if reset is not None and reset.shape != x.shape[:2]:
            raise ValueError(f"ssd_chunked: reset {tuple(reset.shape)} must be {tuple(x.shape[:2])}")
        from kernels.ssd import chunk  # noqa: PLC0415  (only where triton is installed)

        return chunk.ssd_chunked_triton(x, dt, A, B, C, D, initial_state, reset=reset, cu_seqlens=cu_seqlens)
    if cu_seqlens is None:
        return chunk_torch.ssd_chunked(x, dt, A, B, C, D, h0=initial_state, reset=reset, chunk_size=chunk_size)
    # packed sequences on the PyTorch path: one call per sequence, each with its own state
    bounds = cu_seqlens.tolist()
    ys, states = [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = slice(start, end)
        y, h = chunk_torch.ssd_chunked(
            x[:, part], dt[:, part], A, B[:, part], C[:, part], D,
            h0=None if initial_state is None else initial_state[i : i + 1],
            reset=None if reset is None else reset[:, part],
            chunk_size=chunk_size,
        )
        ys.append(y)
        states.append(h)
    return torch.cat(ys, dim=1), torch.cat(states, dim=0)


def _check_cu_seqlens(cu_seqlens: Tensor, bt: tuple[int, int]) -> int:
    """The number of packed sequences; ValueError unless B = 1 and the offsets rise strictly from 0 to T."""
    if bt[0] != 1 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
        raise ValueError(f"ssd_chunked: cu_seqlens must be an integer [S + 1] tensor with B = 1, got "
                         f"{tuple(cu_seqlens.shape)} {cu_seqlens.dtype} for B = {bt[0]}")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != bt[1] or bool((cu_seqlens.diff() <= 0).any()):
        raise ValueError(f"ssd_chunked: cu_seqlens {cu_seqlens.tolist()} must rise strictly from 0 to T={bt[1]}")
    return cu_seqlens.numel() - 1


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
    if select("ssd", backend, x.device, "kernels.ssd.recurrent") == "triton":
        from kernels.ssd import recurrent  # noqa: PLC0415

        return recurrent.ssd_step_triton(state, x, dt, A, B, C, D, reset=reset)
    return chunk_torch.ssd_step(state, x, dt, A, B, C, D, reset=reset)
