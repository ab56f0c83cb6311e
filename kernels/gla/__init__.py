"""Gated Linear Attention (Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training"), with fla's API: per head, a per-key-channel forget gate
``alpha_t = exp(g_t)`` given in log space (``g <= 0``),

    S_t = Diag(alpha_t) S_{t-1} + k_t^T v_t        o_t = (scale * q_t) S_t

Layout: ``naive.py`` (the specification, token by token), ``chunk_torch.py`` (the chunkwise
PyTorch implementation, the CPU path), and the Triton kernels ``chunk.py`` / ``fused_recurrent.py``
where present. :func:`chunk_gla` and :func:`fused_recurrent_gla` pick one (:mod:`kernels.dispatch`).
``state_passing.py`` (PyTorch): an initial state's part of the outputs and the sequence's total
decay, for context parallelism's state passing.

Packed documents: fla marks them with ``cu_seqlens`` (B = 1, N sequences, each with its own
initial and final state ``[N, H, K, V]``); the models mark them with ``reset`` ``[B, T]`` (True
where a document starts, from the position ids), which works for any batch size and is kept as an
extra keyword. The Triton kernels take ``cu_seqlens`` natively (one program per sequence and head,
chunks aligned to each sequence's start); the PyTorch path loops over the sequences when their
states are asked for, and otherwise turns ``cu_seqlens`` into ``reset``.

Triton: ``chunk.py``'s ``chunk_gla_triton`` and ``fused_recurrent.py``'s ``fused_recurrent_gla``
(forward and backward each; tests/kernels/test_gla_triton.py, test_gla_recurrent_triton.py and
test_gla_varlen.py compare them with a token loop and the PyTorch path under the interpreter).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.dispatch import check_inputs, select
from kernels.gla import chunk_torch
from kernels.gla.state_passing import gla_initial_state_output, gla_total_decay

__all__ = ["chunk_gla", "fused_recurrent_gla", "gla_initial_state_output", "gla_total_decay"]


def _check(op: str, q, k, v, g, initial_state, reset, cu_seqlens) -> int:
    """Shape/dtype/device checks shared by both entry points; returns N, the number of sequences."""
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
    if reset is not None and (reset.shape != (b, t) or reset.dtype.is_floating_point):
        raise ValueError(f"{op}: reset {tuple(reset.shape)} {reset.dtype} must be bool {(b, t)}")
    n = b
    if cu_seqlens is not None:
        if reset is not None or b != 1 or cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point:
            raise ValueError(f"{op}: cu_seqlens must be an integer [N + 1] tensor, with B = 1 and no reset")
        bad = len(cu_seqlens) < 2 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != t
        if bad or bool((cu_seqlens.diff() <= 0).any()):
            raise ValueError(f"{op}: cu_seqlens {cu_seqlens.tolist()} must rise strictly from 0 to T={t}")
        n = len(cu_seqlens) - 1
    if initial_state is not None and initial_state.shape != (n, h, dk, v.shape[-1]):
        raise ValueError(f"{op}: initial_state {tuple(initial_state.shape)} must be {(n, h, dk, v.shape[-1])}")
    return n


def _torch_varlen(fn, q, k, v, g, initial_state, output_final_state, cu_seqlens, **kw) -> tuple[Tensor, Tensor]:
    """The PyTorch path over packed sequences: one call per sequence when states are asked for
    (each has its own), else one call with a reset at each sequence start."""
    if initial_state is None and not output_final_state:
        reset = q.new_zeros(1, q.shape[1], dtype=torch.bool)
        reset[0, cu_seqlens[1:-1].long()] = True
        return fn(q, k, v, g, h0=None, reset=reset, **kw)
    bounds = cu_seqlens.tolist()
    outs, states = [], []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        h0 = None if initial_state is None else initial_state[i : i + 1]
        o, h = fn(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], h0=h0, reset=None, **kw)
        outs.append(o)
        states.append(h)
    return torch.cat(outs, dim=1), torch.cat(states, dim=0)


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
        initial_state: ``[N, H, K, V]`` state before each sequence's first token, or None for
            zeros; N = B, or the number of packed sequences with ``cu_seqlens``.
        output_final_state: return the state after each sequence's last token (else None).
        cu_seqlens: ``[N + 1]`` integer offsets of N packed sequences (B must be 1, no
            ``reset``), each with its own initial and final state; or None.
        reset: ``[B, T]`` bool, True where a document starts: the carried state is dropped
            before that token is added (``initial_state`` too, at t = 0).
        chunk_size: tokens per chunk of the PyTorch path.
        backend: ``model.kernels``: 'auto', 'triton' or 'torch' (``PRETRAIN_KERNELS`` overrides).

    Returns:
        ``o [B, T, H, V]`` in v's dtype, and the final state ``[N, H, K, V]`` in fp32 (fp64 for
        fp64 inputs) or None.

    Raises:
        ValueError: mismatched shapes, non-float inputs, several devices, an empty sequence,
            bad ``cu_seqlens``, or a backend that cannot run (:func:`kernels.dispatch.select`).
    """
    _check("chunk_gla", q, k, v, g, initial_state, reset, cu_seqlens)
    if chunk_size <= 0:
        raise ValueError(f"chunk_gla: chunk_size {chunk_size} must be > 0")
    if select("gla", backend, q.device, "kernels.gla.chunk") == "triton":
        from kernels.gla import chunk  # noqa: PLC0415  (only where triton is installed)

        o, h = chunk.chunk_gla_triton(
            q, k, v, g, scale, initial_state, output_final_state, reset=reset, cu_seqlens=cu_seqlens
        )
    elif cu_seqlens is not None:
        o, h = _torch_varlen(
            chunk_torch.chunk_gla, q, k, v, g, initial_state, output_final_state, cu_seqlens,
            chunk_size=chunk_size, scale=scale,
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
    _check("fused_recurrent_gla", q, k, v, g, initial_state, reset, cu_seqlens)
    if select("gla", backend, q.device, "kernels.gla.fused_recurrent") == "triton":
        from kernels.gla import fused_recurrent  # noqa: PLC0415

        o, h = fused_recurrent.fused_recurrent_gla(
            q, k, v, g, scale, initial_state, output_final_state, reset=reset, cu_seqlens=cu_seqlens
        )
    elif cu_seqlens is not None:
        o, h = _torch_varlen(
            chunk_torch.recurrent_gla, q, k, v, g, initial_state, output_final_state, cu_seqlens, scale=scale
        )
    else:
        o, h = chunk_torch.recurrent_gla(q, k, v, g, h0=initial_state, reset=reset, scale=scale)
    return o, (h if output_final_state else None)
