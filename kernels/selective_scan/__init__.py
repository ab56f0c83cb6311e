"""Mamba-1's selective scan (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces"), per channel d and state index n (``A`` diagonal, one ``B``/``C`` per token):

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t        y_t = (C_t . h_t + D x_t) * silu(z_t)

(the gate only when z is given: the Mamba block's output gate, fused into the scan).

Layout: ``naive.py`` (the specification), ``chunk_torch.py`` (PyTorch, chunked in time with a
hand-written backward: the CPU path), ``chunk.py`` (the Triton scan, forward and backward, for
training and prefill) and ``recurrent.py`` (the Triton one-token update for decoding). 'auto' runs
the Triton kernels on CUDA. Token-major like the rest of the models (``[B, T, D]``), unlike
mamba_ssm's ``[B, D, T]``. ``state_passing.py`` (PyTorch): an initial state's part of the outputs
and the sequence's total decay, for context parallelism's state passing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dispatch import check_inputs, select
from kernels.selective_scan import chunk_torch
from kernels.selective_scan.chunk_torch import check_cu_seqlens
from kernels.selective_scan.state_passing import selective_scan_initial_state_output, selective_scan_total_decay

__all__ = [
    "selective_scan", "selective_state_update", "selective_scan_initial_state_output", "selective_scan_total_decay",
]


def selective_scan(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    initial_state: Tensor | None = None,
    *,
    z: Tensor | None = None,
    reset: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Selective scan over a whole sequence (training, prefill).

    Args:
        x: ``[B, T, D]`` input (after the short convolution).
        dt: ``[B, T, D]`` positive step sizes (bias and softplus already applied).
        A: ``[D, N]`` negative diagonal state matrix.
        B, C: ``[B, T, N]`` input and output projections of the state.
        D: ``[D]`` skip connection.
        initial_state: ``[B, D, N]`` state before the first token (``[N_seq, D, N]``, one per
            sequence, with ``cu_seqlens``), or None for zeros.
        z: ``[B, T, D]`` output gate, or None: ``y`` is multiplied by ``silu(z)`` (Mamba's gate,
            fused: computed in fp32 before y is rounded to x's dtype).
        reset: ``[B, T]`` bool, True where a document starts: the carried state (initial_state
            too, at t = 0) is dropped before that token is added.
        cu_seqlens: ``[N_seq + 1]`` integer offsets of ``N_seq`` sequences packed in one row
            (B = 1, fla's convention), rising strictly from 0 to T; each sequence starts from its
            own initial state and returns its own final state. Not combined with ``reset``.
        backend: ``model.kernels``: 'auto', 'triton' or 'torch' (``PRETRAIN_KERNELS`` overrides).

    Returns:
        ``y [B, T, D]`` in x's dtype, and the final state ``[B, D, N]`` (``[N_seq, D, N]`` with
        cu_seqlens) in fp32 (fp64 for fp64 inputs on the torch path; the Triton kernel computes
        in fp32).

    Raises:
        ValueError: mismatched shapes, non-float inputs, several devices, an empty sequence,
            bad ``cu_seqlens``, or a backend that cannot run (:func:`kernels.dispatch.select`).
    """
    check_inputs("selective_scan", dict(x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, initial_state=initial_state))
    if x.dim() != 3 or A.dim() != 2:
        raise ValueError(f"selective_scan: x {tuple(x.shape)} must be [B, T, D], A {tuple(A.shape)} [D, N]")
    b, t, d = x.shape
    n = A.shape[-1]
    if dt.shape != x.shape or A.shape != (d, n) or D.shape != (d,):
        raise ValueError(
            f"selective_scan: x {tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}, D {tuple(D.shape)}"
        )
    if B.shape != (b, t, n) or C.shape != (b, t, n):
        raise ValueError(f"selective_scan: B {tuple(B.shape)} and C {tuple(C.shape)} must be {(b, t, n)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"selective_scan: z {tuple(z.shape)} must be {tuple(x.shape)}")
    if t == 0:
        raise ValueError("selective_scan: empty sequence")
    n_seq = b
    if cu_seqlens is not None:
        check_cu_seqlens("selective_scan", cu_seqlens, b, t)
        if reset is not None:
            raise ValueError("selective_scan: give cu_seqlens or reset, not both")
        n_seq = len(cu_seqlens) - 1
    if initial_state is not None and initial_state.shape != (n_seq, d, n):
        raise ValueError(f"selective_scan: initial_state {tuple(initial_state.shape)} must be {(n_seq, d, n)}")
    if reset is not None and (reset.shape != (b, t) or reset.dtype != torch.bool):
        raise ValueError(f"selective_scan: reset {tuple(reset.shape)} {reset.dtype} must be bool {(b, t)}")
    if select("selective_scan", backend, x.device, "kernels.selective_scan.chunk") == "triton":
        from kernels.selective_scan import chunk  # noqa: PLC0415  (only where triton is installed)

        return chunk.selective_scan_triton(
            x, dt, A, B, C, D, z, initial_state=initial_state, output_final_state=True, reset=reset,
            cu_seqlens=cu_seqlens,
        )
    return chunk_torch.selective_scan(x, dt, A, B, C, D, h0=initial_state, reset=reset, z=z, cu_seqlens=cu_seqlens)


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    *,
    z: Tensor | None = None,
    reset: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """One token of :func:`selective_scan` (decoding), mamba_ssm's name: ``state [B, D, N]``,
    ``x, dt [B, D]``, ``A [D, N]``, ``B, C [B, N]``, ``D [D]``, ``z [B, D]`` gate or None,
    ``reset [B]`` bool. Returns ``(y [B, D] in x's dtype, new state [B, D, N] fp32)``: the new
    state is a fresh tensor, ``state`` is not modified. The Triton kernel is ``recurrent.py``.
    Raises ValueError as :func:`selective_scan`."""
    check_inputs("selective_state_update", dict(state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z))
    b, d = x.shape if x.dim() == 2 else (-1, -1)
    n = A.shape[-1]
    if x.dim() != 2 or dt.shape != x.shape or A.shape != (d, n) or B.shape != (b, n) or C.shape != (b, n):
        raise ValueError(
            f"selective_state_update: x {tuple(x.shape)}, dt {tuple(dt.shape)}, A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}, C {tuple(C.shape)}"
        )
    if state.shape != (b, d, n) or D.shape != (d,) or (reset is not None and reset.shape != (b,)):
        raise ValueError(
            f"selective_state_update: state {tuple(state.shape)} must be {(b, d, n)}, D {(d,)}, reset {(b,)}"
        )
    if z is not None and z.shape != x.shape:
        raise ValueError(f"selective_state_update: z {tuple(z.shape)} must be {tuple(x.shape)}")
    if select("selective_state_update", backend, x.device, "kernels.selective_scan.recurrent") == "triton":
        from kernels.selective_scan import recurrent  # noqa: PLC0415  (only where triton is installed)

        return recurrent.selective_state_update_triton(state, x, dt, A, B, C, D, z, reset)
    return chunk_torch.selective_state_update(state, x, dt, A, B, C, D, reset=reset, z=z)
