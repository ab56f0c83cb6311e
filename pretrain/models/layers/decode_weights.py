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
``load_state_dict`` bump), another thread count, or a new decoding session
(:func:`new_session`: every ``HybridLM.new_cache`` and every one-token forward without a cache
starts one). Writes the version counter does not see (through ``.data``, as an EMA update or a
weight copy between two models does; to inference tensors, which have none) are therefore seen
by the next session; within one, the weights are those of its start. A copy costs the memory of
the weights it copies; :func:`drop_decode_weights` frees it. Gradients never flow through it:
the callers use it only with autograd off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

_ATTR = "_decode_weights"
_session = [0]  # the current decoding session (see new_session)


def new_session() -> None:
    """Start a decoding session: every cached layout and constant is rebuilt on its next use
    (the module docstring says why). Cheap: a counter."""
    _session[0] += 1


class _Sources:
    """What a cached decode-time tensor was built from: the tensors themselves (held, so their
    storage cannot be freed and reused at the same address while the entry names them), their
    data pointers and version counters (None for an inference tensor, which has none), the
    thread count and the decoding session."""

    __slots__ = ("weights", "ptrs", "versions", "threads", "session")

    def __init__(self, weights: tuple[Tensor, ...], threads: int) -> None:
        self.weights = weights
        self.ptrs = tuple(w.data_ptr() for w in weights)
        self.versions = tuple(None if w.is_inference() else w._version for w in weights)
        self.threads = threads
        self.session = _session[0]

    def valid(self, weights: tuple[Tensor, ...], threads: int) -> bool:
        """Built in this decoding session from these very tensors (identity: a replaced
        parameter is another tensor; dtype, device and shape come with it), their current data
        (``.data = ...`` moves the pointer, an in-place update bumps the version) and this
        thread count."""
        if threads != self.threads or self.session != _session[0] or len(weights) != len(self.weights):
            return False
        for w, old, ptr, version in zip(weights, self.weights, self.ptrs, self.versions):
            if w is not old or w.data_ptr() != ptr or (version is not None and w._version != version):
                return False
        return True


class _Entry(_Sources):
    """A cached layout of projection weights (see the module docstring)."""

    __slots__ = ("parts", "layout", "input_major")

    def __init__(self, weights: tuple[Tensor, ...], threads: int) -> None:
        super().__init__(weights, threads)
        out = sum(w.shape[0] for w in weights)
        self.parts = threads if out % threads == 0 else 1
        self.layout, self.input_major = _layout(weights, self.parts)


class _Derived(_Sources):
    """A cached tensor computed from parameters (:func:`decode_constant`)."""

    __slots__ = ("value",)

    def __init__(self, weights: tuple[Tensor, ...], value: Tensor) -> None:
        super().__init__(weights, 1)
        self.value = value


def decode_constant(owner: nn.Module, name: str, fn: Callable[..., Tensor], *params: Tensor) -> Tensor:
    """``fn(*params)`` (detached), computed on first use and kept on ``owner`` under ``name``
    until one of ``params`` changes (as the layouts of :func:`decode_linear`): a decoding step's
    function of the weights alone, e.g. Mamba's ``A = -exp(A_log)``, costs its operators once
    instead of at every token. Use only without autograd."""
    cache = owner.__dict__.setdefault(_ATTR, {})
    entry = cache.get(name)
    if entry is None or not entry.valid(params, 1):
        entry = cache[name] = _Derived(params, fn(*(p.detach() for p in params)))
    return entry.value


def _layout(weights: tuple[Tensor, ...], parts: int) -> tuple[Tensor, bool]:
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
    if any(m.bias is not None for m in linears):
        raise ValueError(f"decode_linear({name}): the projections must be bias-free")
    return decode_matmul(x, owner, name, *(m.weight for m in linears))


def decode_matmul(x: Tensor, owner: nn.Module, name: str, *weights: Tensor) -> Tensor:
    """``x [..., in]`` times the transposed ``weights`` (each ``[out_i, in]``, ``nn.Linear``'s
    layout), concatenated -> ``[..., sum of out_i]``: :func:`decode_linear` for weights that are
    not a linear's own (a tied output head). Raises ValueError for weights of another input
    width than each other. Use only without autograd."""
    threads = torch.get_num_threads() if x.device.type == "cpu" else 1  # a GPU's GEMV fills it already
    cache = owner.__dict__.setdefault(_ATTR, {})
    entry = cache.get(name)
    if entry is None or not entry.valid(weights, threads):
        if len({w.shape[1] for w in weights}) != 1:
            raise ValueError(f"decode_linear({name}): the projections must read the same input")
        entry = cache[name] = _Entry(weights, threads)
    w, inp = entry.layout, weights[0].shape[1]
    rows = x.reshape(-1, inp)  # [N, in]
    y = torch.bmm(rows.expand(entry.parts, *rows.shape), w if entry.input_major else w.transpose(1, 2))  # [P, N, out / P]
    return y.transpose(0, 1).reshape(*x.shape[:-1], -1)


def decoding(x: Tensor) -> bool:
    """``x [B, T, ...]`` is one token per row with autograd off: a decoding step, which the
    layers run through :func:`decode_linear`."""
    return x.dim() >= 3 and x.shape[1] == 1 and not torch.is_grad_enabled()


def drop_decode_weights(model: nn.Module) -> None:
    """Free the decode-time weight copies of every submodule of ``model`` (they are rebuilt on
    the next decoding step)."""
    for module in model.modules():
        module.__dict__.pop(_ATTR, None)
