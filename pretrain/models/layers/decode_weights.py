"""Decode-time layouts of projection weights: several projections of one input fused into one
product, split for every thread, laid out for a product with one token.

A decoding step multiplies one token per row by every weight, a matrix-vector product bound by
reading the weights, plus a fixed cost per operator call. On the CPU, MKL computes a one-row
product on ONE thread, and reads an output-major ``[out, in]`` matrix (``nn.Linear``'s layout)
more slowly than an input-major one when ``out >= in``. So the decoding paths here multiply by

- one matrix for projections of the same input (q/k/v, SwiGLU's gate/up, Mamba's x/z): fewer
  operator calls per token;
- split by output rows into P = ``torch.get_num_threads()`` blocks, one batched product
  (``bmm``) whose batch spreads over the threads;
- each block input-major (``[P, in, out / P]``, a copy) when ``out >= in``, else a view of the
  weight itself (no copy).

(On a GPU: one block, output-major: only the fusion applies.)

Measured on the CPU here (2 threads, shapes 256 -> 384 .. 2048 and 1024 -> 256): 1.5-2.6x the
speed of ``F.linear`` with one row.

A copy is built on first use and rebuilt when a weight changes: another tensor, device or
dtype, an in-place update (the version counter, which optimizer steps, ``copy_`` and
``load_state_dict`` bump; a write through ``.data`` is not seen), or another thread count. It
costs the memory of the weights it copies; :func:`drop_decode_weights` frees it. Gradients never
flow through it: the callers use it only with autograd off.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_ATTR = "_decode_weights"


def _key(weights: list[Tensor], parts: int) -> tuple:
    return parts, tuple((w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape)) for w in weights)


def _layout(weights: list[Tensor], parts: int) -> tuple[Tensor, bool]:
    """``[P, in, out / P]`` (input-major copy, True) or ``[P, out / P, in]`` (False)."""
    w = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach()
    out, inp = w.shape
    blocks = w.view(parts, out // parts, inp)
    if out >= inp and w.device.type == "cpu":
        return blocks.transpose(1, 2).contiguous(), True
    return blocks, False


def decode_linear(x: Tensor, owner: nn.Module, name: str, *linears: nn.Linear) -> Tensor:
    """``x [..., in]`` times the bias-free ``linears`` (all reading ``in`` features), their
    outputs concatenated in order -> ``[..., sum of out]``, through the layout ``name`` cached
    on ``owner`` (see the module docstring). Equal to ``torch.cat([m(x) for m in linears], -1)``
    up to the summation order. Raises ValueError for a linear with a bias or another input
    width. Use only without autograd (the layout is detached)."""
    weights = [m.weight for m in linears]
    if any(m.bias is not None for m in linears) or len({w.shape[1] for w in weights}) != 1:
        raise ValueError(f"decode_linear({name}): the projections must be bias-free and read the same input")
    out, inp = sum(w.shape[0] for w in weights), weights[0].shape[1]
    parts = torch.get_num_threads() if x.device.type == "cpu" else 1  # a GPU's GEMV fills it already
    parts = parts if out % parts == 0 else 1
    cache = owner.__dict__.setdefault(_ATTR, {})
    key = _key(weights, parts)
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        # the entry holds the weights it was built from: their storage cannot be freed and
        # reused at the same address by a replacing tensor while the key still names it
        hit = cache[name] = (key, *_layout(weights, parts), [w.detach() for w in weights])
    _, w, input_major, _ = hit
    rows = x.reshape(-1, inp)  # [N, in]
    y = torch.bmm(rows.expand(parts, *rows.shape), w if input_major else w.transpose(1, 2))  # [P, N, out / P]
    return y.transpose(0, 1).reshape(*x.shape[:-1], out)


def decoding(x: Tensor) -> bool:
    """``x [B, T, ...]`` is one token per row with autograd off: a decoding step, which the
    layers run through :func:`decode_linear`."""
    return x.dim() >= 3 and x.shape[1] == 1 and not torch.is_grad_enabled()


def drop_decode_weights(model: nn.Module) -> None:
    """Free the decode-time weight copies of every submodule of ``model`` (they are rebuilt on
    the next decoding step)."""
    for module in model.modules():
        module.__dict__.pop(_ATTR, None)
