"""Titans' neural long-term memory (Behrouz et al. 2024, "Titans: Learning to Memorize at Test
Time"): per head an MLP memory trained at test time by mini-batch gradient descent with momentum
and forgetting (see :mod:`kernels.titans.chunk_torch` for the equations and the chunking).

Layout: ``naive.py`` (the specification, token by token with autograd's inner gradients),
``chunk_torch.py`` (closed-form chunked scan in PyTorch: the CPU path), and the Triton kernels,
forward and backward: ``chunk.py`` (the linear memory, depth 1, and the shared piece/gate
machinery) and ``chunk_mlp.py`` (the 2-layer MLP memory, depth 2). Deeper memories and fp64 run
the PyTorch path under ``model.kernels='auto'`` and raise under 'triton'. Tests:
tests/kernels/test_titans_triton.py (against ``naive.py`` and ``chunk_torch.py``) and
tests/kernels/test_titans_model_triton.py (a whole model). Decoding calls :func:`memory_scan`
with T = 1: the same kernels serve it (a piece may start and end anywhere inside a chunk).
"""

from __future__ import annotations

import os

from torch import Tensor

from kernels.dispatch import ENV_VAR, check_inputs, select
from kernels.titans import chunk_torch
from kernels.titans.chunk_torch import MemoryState

__all__ = ["MemoryState", "memory_read", "memory_scan"]


def memory_read(ws: list[Tensor], x: Tensor) -> Tensor:
    """The memory MLP of weights ``ws`` (``[B, H, d_in, d_out]`` per layer) on ``x [B, H, L, D]``
    (a read without a write): ``x W`` for one layer, else ``x + W_L silu(... silu(x W_1))``."""
    return chunk_torch.mlp_forward(ws, x)[0]


def memory_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    theta: Tensor,
    eta: Tensor,
    alpha: Tensor,
    state: MemoryState,
    init: list[Tensor],
    positions: Tensor,
    chunk_size: int,
    reset: Tensor | None = None,
    read: str = "chunk_start",
    *,
    backend: str = "auto",
) -> tuple[Tensor, MemoryState]:
    """Read and train the memory over T new tokens.

    Args:
        q, k, v: ``[B, T, H, D]`` (queries and keys already L2-normalised).
        theta, eta, alpha: ``[B, T, H]`` learning rate, momentum and forgetting, in [0, 1].
        state: the memory before these tokens (``MemoryState.fresh`` at a sequence start).
        init: the learned initial weights, ``[H, d_in, d_out]`` per layer (restored at resets).
        positions: ``[B, T]`` integer positions (in the document, or absolute): a chunk ends
            after a token with ``position % chunk_size == chunk_size - 1``.
        chunk_size: tokens per mini-batch of the inner gradient descent.
        reset: ``[B, T]`` bool, True where a document starts (memory back to ``init``), or None.
        read: 'chunk_start' (``y_t = M_{W0}(q_t)``) or 'per_token' (``y_t = M_t(q_t)``).
        backend: ``model.kernels``: 'auto', 'triton' or 'torch' (``PRETRAIN_KERNELS`` overrides).

    Returns:
        ``y [B, T, H, D]`` in at least fp32, and the state after the T tokens; differentiable in
        every input, ``init`` included.

    Raises:
        ValueError: mismatched shapes, non-float inputs, several devices, an unknown ``read``,
            a backend that cannot run (:func:`kernels.dispatch.select`), or 'triton' asked for a
            case its kernels do not support (a memory deeper than 2, fp64, an empty sequence).
    """
    check_inputs("memory_scan", dict(q=q, k=k, v=v, theta=theta, eta=eta, alpha=alpha))
    check_inputs("memory_scan", {f"init[{i}]": p for i, p in enumerate(init)} | {"q": q})
    if q.dim() != 4:
        raise ValueError(f"memory_scan: q {tuple(q.shape)} must be [B, T, H, D]")
    if chunk_size <= 0:
        raise ValueError(f"memory_scan: chunk_size {chunk_size} must be > 0")
    if select("titans", backend, q.device, "kernels.titans.chunk") == "triton":
        from kernels.titans import chunk  # noqa: PLC0415  (only where triton is installed)

        states = [x.dtype for x in (*state.w0, *state.m, *state.s)]
        why = "an empty sequence" if q.shape[1] == 0 else chunk.unsupported(q, states, len(init))
        if why is None:
            return chunk.memory_scan_triton(q, k, v, theta, eta, alpha, state, init, positions, chunk_size, reset, read)
        asked = os.environ.get(ENV_VAR, "") or backend
        if asked != "auto":  # 'auto' quietly takes the PyTorch path for what the kernel lacks
            source = f"{ENV_VAR}={asked!r}" if os.environ.get(ENV_VAR) else f"model.kernels={asked!r}"
            raise ValueError(f"{source}: the titans Triton kernel does not support {why}; use 'auto' or 'torch'")
    return chunk_torch.memory_scan(q, k, v, theta, eta, alpha, state, init, positions, chunk_size, reset, read)
