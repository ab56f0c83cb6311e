"""Mamba-2's SSD from a nonzero initial state, by linearity: what state passing across devices
(context parallelism) adds to a run from a zero state.

``H_t = exp(dt_t A) H_{t-1} + dt_t x_t (x) B_t`` (a scalar decay per head) is linear in its
initial state, so the outputs from ``H_0 = H_in`` are those from zero plus, per head,

    y_t += exp(A * sum_{i <= t} dt_i) * (H_in C_t)          (t before any reset)

and the final state gains ``exp(A * sum_t dt_t) * H_in``: the off-diagonal (state) term of Dao &
Gu 2024's chunked algorithm with the whole sequence as one chunk. One ``[B, T, H]`` decay and one
contraction of C with the ``[B, H, P, N]`` state; plain PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dispatch import at_least_fp32


def ssd_total_decay(dt: Tensor, A: Tensor, reset: Tensor | None = None) -> Tensor:
    """The decay a whole sequence applies to SSD's initial state: ``exp(A * sum_t dt_t)`` per
    head, zero in rows where a document starts anywhere in it (t = 0 included).

    Args:
        dt: ``[B, T, H]`` positive step sizes; A: ``[H]`` negative scalar decay per head.
        reset: ``[B, T]`` bool, True where a document starts, or None.

    Returns:
        ``[B, H]`` in fp32 or wider: the final state of a run from ``H_in`` is that from zero
        plus ``decay[..., None, None] * H_in``. Differentiable in dt and A.
    """
    decay = torch.exp(at_least_fp32(dt).sum(1) * at_least_fp32(A))  # [B, H]
    if reset is not None:
        decay = decay * (~reset.any(1)).to(decay.dtype)[:, None]
    return decay


def ssd_initial_state_output(
    dt: Tensor, A: Tensor, C: Tensor, initial_state: Tensor, reset: Tensor | None = None
) -> Tensor:
    """The part of :func:`kernels.ssd.ssd_chunked`'s output due to its initial state:
    ``y_t = exp(A * sum_{i <= t} dt_i) * (H_in C_t)`` per head (head h reads group ``h // (H /
    G)`` of C) for t before the first document start of the row, 0 from it on.

    Args:
        dt: ``[B, T, H]`` positive step sizes; A: ``[H]`` negative scalar decay per head.
        C: ``[B, T, G, N]`` output projections of the state; G divides H.
        initial_state: ``[B, H, P, N]`` state before the first token.
        reset: ``[B, T]`` bool, True where a document starts, or None.

    Returns:
        ``[B, T, H, P]`` in fp32 or wider: add it to ssd_chunked's output from a zero state.
        Differentiable in dt, A, C and initial_state.

    Raises:
        ValueError: mismatched shapes.
    """
    b, t, h = dt.shape
    if (
        A.shape != (h,) or C.dim() != 4 or C.shape[:2] != (b, t) or h % C.shape[2]
        or initial_state.dim() != 4 or initial_state.shape[:2] != (b, h) or initial_state.shape[-1] != C.shape[-1]
    ):
        raise ValueError(
            f"ssd_initial_state_output: dt {tuple(dt.shape)}, A {tuple(A.shape)}, C {tuple(C.shape)}, "
            f"initial_state {tuple(initial_state.shape)} must be [B, T, H], [H], [B, T, G, N], [B, H, P, N]"
        )
    if reset is not None and reset.shape != (b, t):
        raise ValueError(f"ssd_initial_state_output: reset {tuple(reset.shape)} must be {(b, t)}")
    decay = torch.exp(at_least_fp32(dt).cumsum(1) * at_least_fp32(A))  # [B, T, H]
    if reset is not None:
        decay = decay * (reset.cumsum(1) == 0).to(decay.dtype)[..., None]
    c = at_least_fp32(C).repeat_interleave(h // C.shape[2], dim=2)  # [B, T, H, N]
    y = torch.einsum("bthn,bhpn->bthp", c, initial_state.to(c.dtype))
    return y * decay[..., None]
