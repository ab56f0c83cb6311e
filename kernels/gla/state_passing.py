"""Gated linear attention from a nonzero initial state, by linearity: what state passing across
devices (context parallelism) adds to a run from a zero state.

The recurrence ``S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t`` is linear in its initial state, so
the outputs from ``S_0 = S_in`` are those from ``S_0 = 0`` plus

    o_t += (scale * q_t * exp(G_t)) S_in,     G_t = sum_{i <= t} g_i     (t before any reset)

and the final state gains ``Diag(exp(G_T)) S_in``. A reset at or before t cuts S_in off from
token t on. Plain PyTorch over ``[B, T, H, K]`` tensors and one matmul with the ``[B, H, K, V]``
state: no pass over the sequence's states, so it costs a few elementwise ops per query.
"""

from __future__ import annotations

from torch import Tensor

from kernels.dispatch import at_least_fp32


def _no_reset_yet(reset: Tensor | None, like: Tensor) -> Tensor | None:
    """``[B, T]`` float, 1 while no document has started at or before t (None without resets)."""
    return None if reset is None else (reset.cumsum(1) == 0).to(like.dtype)


def gla_total_decay(g: Tensor, reset: Tensor | None = None) -> Tensor:
    """The decay a whole sequence applies to its initial state: ``exp(sum_t g_t)``, zero in
    rows where a document starts anywhere in it (t = 0 included).

    Args:
        g: ``[B, T, H, K]`` log forget gates (<= 0), as :func:`kernels.gla.chunk_gla`.
        reset: ``[B, T]`` bool, True where a document starts, or None.

    Returns:
        ``[B, H, K]`` in fp32 or wider (fp64 for fp64 g): the final state of a run from
        ``S_in`` is that from zero plus ``decay[..., None] * S_in``. Differentiable in g.
    """
    decay = at_least_fp32(g).sum(1).exp()  # [B, H, K]
    if reset is not None:
        decay = decay * (~reset.any(1)).to(decay.dtype)[:, None, None]
    return decay


def gla_initial_state_output(
    q: Tensor, g: Tensor, initial_state: Tensor, scale: float | None = None, reset: Tensor | None = None
) -> Tensor:
    """The part of :func:`kernels.gla.chunk_gla`'s output due to its initial state:
    ``o_t = (scale * q_t * exp(sum_{i <= t} g_i)) S_in`` for t before the first document start
    of the row, 0 from it on (Yang et al. 2023's inter-chunk term, with the whole sequence as
    one chunk).

    Args:
        q: ``[B, T, H, K]`` queries; g: ``[B, T, H, K]`` log forget gates (<= 0).
        initial_state: ``[B, H, K, V]`` state before the first token.
        scale: query scale; None is ``K ** -0.5`` (as chunk_gla).
        reset: ``[B, T]`` bool, True where a document starts, or None.

    Returns:
        ``[B, T, H, V]`` in fp32 or wider: add it to chunk_gla's output from a zero state to
        get the output from ``initial_state``. Differentiable in q, g and initial_state.

    Raises:
        ValueError: mismatched shapes.
    """
    b, t, h, dk = q.shape
    if g.shape != q.shape or initial_state.dim() != 4 or initial_state.shape[:3] != (b, h, dk):
        raise ValueError(
            f"gla_initial_state_output: q {tuple(q.shape)}, g {tuple(g.shape)} and initial_state "
            f"{tuple(initial_state.shape)} must be [B, T, H, K], [B, T, H, K], [B, H, K, V]"
        )
    if reset is not None and reset.shape != (b, t):
        raise ValueError(f"gla_initial_state_output: reset {tuple(reset.shape)} must be {(b, t)}")
    scale = dk**-0.5 if scale is None else scale
    g32 = at_least_fp32(g)
    q_in = at_least_fp32(q) * (scale * g32.cumsum(1).exp())  # [B, T, H, K]
    keep = _no_reset_yet(reset, q_in)
    if keep is not None:
        q_in = q_in * keep[:, :, None, None]
    return q_in.transpose(1, 2).matmul(initial_state.to(q_in.dtype)).transpose(1, 2)  # [B, T, H, V]
