"""Gated Linear Attention (Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training"), with fla's API: per head, a per-key-channel forget gate
``alpha_t = exp(g_t)`` given in log space (``g <= 0``),

    S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t        o_t = (scale * q_t) S_t

Layout: ``naive.py`` (the specification, token by token), ``chunk_torch.py`` (the chunkwise
PyTorch implementation, the CPU path), and the Triton kernels ``chunk.py`` / ``fused_recurrent.py``
where present. :func:`chunk_gla` and :func:`fused_recurrent_gla` pick one (:mod:`kernels.dispatch`).

Packed documents: fla marks them with ``cu_seqlens`` (B = 1); the models mark them with ``reset``
``[B, T]`` (True where a document starts, from the position ids), which works for any batch size
and is kept as an extra keyword. ``cu_seqlens`` is turned into ``reset``.

Triton: ``chunk.py``'s ``chunk_gla_triton`` (forward and backward; tests/kernels/test_gla_triton.py
compares it with a token loop and the PyTorch path under the interpreter). A fused recurrent
decoding kernel (``fused_recurrent.py`` exporting ``fused_recurrent_gla(q, k, v, g, scale=,
initial_state=, reset=) -> (o, final_state)``) does not exist yet: decoding runs the PyTorch step.
"""

from __future__ import annotations

from torch import Tensor

from kernels.dispatch import check_inputs, select
from kernels.gla import chunk_torch

__all__ = ["chunk_gla", "fused_recurrent_gla"]


def _check(op: str, q, k, v, g, initial_state, reset, cu_seqlens, output_final_state) -> Tensor | None:
    """Shape/dtype/device checks shared by both entry points; returns ``reset`` with ``cu_seqlens`` folded in."""
    check_inputs(op, {"q": q, "k": k, "v": v, "g": g, "initial_state": initial_state})
    if q.dim() != 4:
        raise ValueError(f"{op}: q {tuple(q.shape)} must be [B, T, H, K]")
    b, t, h, dk = q.shape
    if k.shape != q.shape or g.shape != q.shape:
        raise ValueError(f"{op}: q {tuple(q.shape)}, k {tuple(k.shape)} and g {tuple(g.shape)} must match")
    if v.dim() != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(f"{op}: v {tuple(v.shape)} must be [B, T, H, V] with B, T, H = {(b, t, h)}")
    if t == 0:
        raise ValueError(f"{op}: empty sequence")
    if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[-1]):
        raise ValueError(f"{op}: initial_state {tuple(initial_state.shape)} must be {(b, h, dk, v.shape[-1])}")
    if reset is not None and (reset.shape != (b, t) or reset.dtype.is_floating_point):
        raise ValueError(f"{op}: reset {tuple(reset.shape)} {reset.dtype} must be bool {(b, t)}")
    if cu_seqlens is None:
        return reset
    if reset is not None or b != 1 or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"{op}: cu_seqlens must be an integer [N + 1] tensor, with B = 1 and no reset")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != t or bool((cu_seqlens.diff() <= 0).any()):
        raise ValueError(f"{op}: cu_seqlens {cu_seqlens.tolist()} must rise strictly from 0 to T={t}")
    if len(cu_seqlens) > 2 and (initial_state is not None or output_final_state):
        raise ValueError(f"{op}: per-sequence initial/final states with cu_seqlens are not supported; use reset")
    out = q.new_zeros(1, t, dtype=bool)
    out[0, cu_seqlens[1:-1].long()] = True
    return out


def chunk_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    *,
    reset: Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention over a whole sequence (training, prefill), chunkwise-parallel.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys, any float dtype.
        v: ``[B, T, H, V]`` values.
        g: ``[B, T, H, K]`` log forget gates (<= 0): alpha_t = exp(g_t).
        scale: query scale; None is ``K ** -0.5``.
        initial_state: ``[B, H, K, V]`` state before the first token, or None for zeros.
        output_final_state: return the state after the last token (else None).
        cu_seqlens: ``[N + 1]`` integer offsets of N packed sequences (B must be 1), or None.
        reset: ``[B, T]`` bool, True where a document starts: the carried state is dropped
            before that token is added (``initial_state`` too, at t = 0).
        chunk_size: tokens per chunk of the PyTorch path.
        backend: ``model.kernels``: 'auto', 'triton' or 'torch' (``PRETRAIN_KERNELS`` overrides).

    Returns:
        ``o [B, T, H, V]`` in v's dtype, and the final state ``[B, H, K, V]`` in fp32 (fp64 for
        fp64 inputs) or None.

    Raises:
        ValueError: mismatched shapes, non-float inputs, several devices, an empty sequence,
            bad ``cu_seqlens``, or a backend that cannot run (:func:`kernels.dispatch.select`).
    """
    reset = _check("chunk_gla", q, k, v, g, initial_state, reset, cu_seqlens, output_final_state)
    if chunk_size <= 0:
        raise ValueError(f"chunk_gla: chunk_size {chunk_size} must be > 0")
    if select("gla", backend, q.device, "kernels.gla.chunk") == "triton":
        from kernels.gla import chunk  # noqa: PLC0415  (only where triton is installed)

        o, h = chunk.chunk_gla_triton(
            q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state, reset=reset
        )
    else:
        o, h = chunk_torch.chunk_gla(q, k, v, g, h0=initial_state, reset=reset, chunk_size=chunk_size, scale=scale)
    return o, (h if output_final_state else None)


def fused_recurrent_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    *,
    reset: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Gated linear attention token by token (decoding: T is small, often 1). Arguments, returns
    and errors as :func:`chunk_gla` (no ``chunk_size``)."""
    reset = _check("fused_recurrent_gla", q, k, v, g, initial_state, reset, cu_seqlens, output_final_state)
    if select("gla", backend, q.device, "kernels.gla.fused_recurrent") == "triton":
        from kernels.gla import fused_recurrent  # noqa: PLC0415

        o, h = fused_recurrent.fused_recurrent_gla(q, k, v, g, scale=scale, initial_state=initial_state, reset=reset)
    else:
        o, h = chunk_torch.recurrent_gla(q, k, v, g, h0=initial_state, reset=reset, scale=scale)
    return o, (h if output_final_state else None)
