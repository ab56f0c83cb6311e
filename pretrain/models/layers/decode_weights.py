"""Decode-time copies of projection weights: several projections of one input fused into one
matrix product, laid out for a product with one token.

A decoding step multiplies one token per row by every weight, so it is a matrix-vector product
bound by reading the weights, plus a fixed cost per operator call. Two things cut that cost
without touching the parameters (training, checkpoints and tensor-parallel plans keep seeing the
separate ``nn.Linear`` layers):

- one product instead of several for projections of the same input (q/k/v, SwiGLU's gate/up,
  Mamba's x/z): fewer operator calls per token;
- the weight stored input-major (``W^T``, contiguous ``[in, out]``) when ``out >= in``: MKL's
  product of one row with an input-major matrix vectorises over the outputs and reads the
  weights about 1.3-1.9x faster on the CPU than the output-major ``nn.Linear`` layout (measured
  on shapes 256 -> 384 .. 4096; for ``out < in``, e.g. a down projection, the output-major
  layout is as fast or faster and is kept).

The copy is built on first use and rebuilt when a weight changes: another tensor, device or
dtype, or an in-place update (the version counter, which optimizer steps, ``copy_`` and
``load_state_dict`` bump; a write through ``.data`` is not seen). It costs the memory of the
weights it covers; :func:`drop_decode_weights` frees it. Gradients never flow through it: the
callers use it only with autograd off.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ATTR = "_decode_weights"


def _key(weights: list[Tensor]) -> tuple:
    return tuple((w.data_ptr(), w._version, w.dtype, w.device, tuple(w.shape)) for w in weights)


def decode_linear(x: Tensor, owner: nn.Module, name: str, *linears: nn.Linear) -> Tensor:
    """``x [..., in]`` times the bias-free ``linears`` (all reading ``in`` features), their
    outputs concatenated in order -> ``[..., sum of out]``, through the copy ``name`` cached on
    ``owner`` (see the module docstring). Equal to ``torch.cat([m(x) for m in linears], -1)``
    up to the summation order of the product. Raises ValueError for a linear with a bias or a
    different input width. Use only without autograd (the copy is detached)."""
    weights = [m.weight for m in linears]
    if any(m.bias is not None for m in linears) or len({w.shape[1] for w in weights}) != 1:
        raise ValueError(f"decode_linear({name}): the projections must be bias-free and read the same input")
    cache = owner.__dict__.setdefault(_ATTR, {})
    key = _key(weights)
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        w = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach()
        transposed = w.shape[0] >= w.shape[1]
        hit = cache[name] = (key, w.t().contiguous() if transposed else w, transposed)
    _, w, transposed = hit
    return torch.matmul(x, w) if transposed else F.linear(x, w)


def drop_decode_weights(model: nn.Module) -> None:
    """Free the decode-time weight copies of every submodule of ``model`` (they are rebuilt on
    the next decoding step)."""
    for module in model.modules():
        module.__dict__.pop(_ATTR, None)
