"""Issue 10's part of bench/kernels.py: the fused linear + cross-entropy (peak memory and time
against the unfused path, and Liger-Kernel's where installed) and the memory-bound element-wise
ops (RMSNorm, gated RMSNorm, SwiGLU, the GMU's gate, the short causal conv) against the measured
copy bandwidth. Run through ``python bench/kernels.py`` (``--no-lce``, ``--lce-tokens``, ``--mem-ops``,
``--mem-tokens``).

Memory-bound ops: per op, forward and forward+backward time of our Triton kernel
(``backend='triton'``), our PyTorch path (``backend='torch'``) and ``torch.compile`` of that
PyTorch call, with the achieved GB/s of the op's MINIMUM bytes and their fraction of the measured
copy bandwidth (goal issue 10: the Triton kernel >= 70 % of it, forward and forward+backward).
Minimum bytes, ``e`` bytes an element (--dtype), N = B T tokens; per-channel parameters (the
norms' weight, the conv's ``[C, W]`` weight and bias) are left out:
  rms_norm            fwd 2 N D e (x in, y out); f+b 5 N D e (+ x, dy in, dx out)
  rms_norm_residual   fwd 4 N D e (x, residual in; y, h out); f+b 10 N D e
  gated_rms_norm      fwd 3 N D e (x, z in; y out); f+b 8 N D e
  swiglu              fwd 3 N F e (gate, up in; out); f+b 8 N F e
  gated_memory        fwd 3 N F e (memory, gate in; out); f+b 8 N F e
  causal_conv1d       fwd 2 N C e (x in, y out); f+b 5 N C e
i.e. forward: inputs read once + outputs written once; forward+backward: 3 x inputs + 2 x
outputs (the backward reads the inputs and the output gradients and writes the input gradients),
the convention of bench/kernels.py. An op whose module is not there yet prints 'not available
yet'.
"""

from __future__ import annotations

import importlib
import statistics
from dataclasses import dataclass
from typing import Callable

import torch

from bench import linear_cross_entropy as lce_bench

GOAL_FRACTION = 0.70  # of the measured copy bandwidth
LCE_CPU = dict(tokens=4096, vocab=32768, d_model=1024)  # about 30 s on 2 cores for both paths
LCE_GPU = dict(tokens=16384, vocab=32768, d_model=1024)  # issue 10's sizes (the memory goal's)


@dataclass
class MemOp:
    """A memory-bound op: where it lives, its inputs at N tokens, its call, its minimum bytes."""

    name: str
    module: str  # the public function's package
    function: str
    make: Callable[[int, torch.dtype, torch.device], dict]  # N -> named inputs (leaves)
    call: Callable[[Callable, dict, str], object]  # (function, inputs, backend) -> output(s)
    elements: Callable[[int], tuple[int, int]]  # N -> (input elements, output elements), per-token tensors only

    def min_bytes(self, n: int, elem: int) -> tuple[float, float]:
        """Minimum bytes of (forward, forward+backward)."""
        i, o = self.elements(n)
        return (i + o) * elem, (3 * i + 2 * o) * elem


D_MODEL, D_FFN, D_CONV, CONV_WIDTH = 4096, 11008, 8192, 4


def _leaf(gen, shape, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_()


def _norm_inputs(n, dtype, device, residual=False, gated=False):
    gen = torch.Generator().manual_seed(0)
    inp = dict(x=_leaf(gen, (n, D_MODEL), dtype, device), weight=_leaf(gen, (D_MODEL,), torch.float32, device))
    if residual:
        inp["residual"] = _leaf(gen, (n, D_MODEL), dtype, device)
    if gated:
        inp["z"] = _leaf(gen, (n, D_MODEL), dtype, device)
    return inp


def _pair_inputs(n, dtype, device, names):
    gen = torch.Generator().manual_seed(0)
    return {k: _leaf(gen, (n, D_FFN), dtype, device) for k in names}


def _conv_inputs(n, dtype, device):
    gen = torch.Generator().manual_seed(0)
    b = 8
    return dict(x=_leaf(gen, (b, n // b, D_CONV), dtype, device),
                weight=_leaf(gen, (D_CONV, CONV_WIDTH), torch.float32, device, 0.5),
                bias=_leaf(gen, (D_CONV,), torch.float32, device))


MEM_OPS = {
    op.name: op
    for op in (
        MemOp("rms_norm", "kernels.rmsnorm", "rms_norm", _norm_inputs,
              lambda f, a, be: f(a["x"], a["weight"], 1e-6, backend=be), lambda n: (n * D_MODEL, n * D_MODEL)),
        MemOp("rms_norm_residual", "kernels.rmsnorm", "rms_norm",
              lambda n, dt, dev: _norm_inputs(n, dt, dev, residual=True),
              lambda f, a, be: f(a["x"], a["weight"], 1e-6, residual=a["residual"], backend=be),
              lambda n: (2 * n * D_MODEL, 2 * n * D_MODEL)),
        MemOp("gated_rms_norm", "kernels.rmsnorm", "gated_rms_norm",
              lambda n, dt, dev: _norm_inputs(n, dt, dev, gated=True),
              lambda f, a, be: f(a["x"], a["z"], a["weight"], 1e-6, backend=be),
              lambda n: (2 * n * D_MODEL, n * D_MODEL)),
        MemOp("swiglu", "kernels.swiglu", "swiglu", lambda n, dt, dev: _pair_inputs(n, dt, dev, ("gate", "up")),
              lambda f, a, be: f(a["gate"], a["up"], backend=be), lambda n: (2 * n * D_FFN, n * D_FFN)),
        MemOp("gated_memory", "kernels.gmu", "gated_memory",
              lambda n, dt, dev: _pair_inputs(n, dt, dev, ("memory", "gate")),
              lambda f, a, be: f(a["memory"], a["gate"], backend=be), lambda n: (2 * n * D_FFN, n * D_FFN)),
        MemOp("causal_conv1d", "kernels.short_conv", "causal_conv1d", _conv_inputs,
              lambda f, a, be: f(a["x"], a["weight"], a["bias"], activation="silu", backend=be),
              lambda n: (n * D_CONV, n * D_CONV)),
    )
}


def load_op(op: MemOp) -> Callable | None:
    """The op's public function, or None where its module (or the function) is not there yet."""
    try:
        return getattr(importlib.import_module(op.module), op.function)
    except (ImportError, AttributeError):
        return None


def _outputs(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def time_fwd_and_fb(fn: Callable[[], object], leaves: list[torch.Tensor], timer: Callable) -> tuple[float, float]:
    """(forward ms without autograd, forward+backward ms) of ``fn`` with ``timer(step) -> ms``;
    every output gets a random gradient (an op with two outputs, like the fused residual, too)."""
    with torch.no_grad():
        fwd = timer(fn)
    with torch.no_grad():
        grads = [torch.randn_like(y) for y in _outputs(fn())]

    def step():
        for z in leaves:
            z.grad = None
        torch.autograd.backward(_outputs(fn()), grads)

    return fwd, timer(step)


def bench_mem_op(op: MemOp, n: int, dtype: torch.dtype, device: torch.device, timer: Callable) -> list[dict]:
    """Rows ``{impl, fwd, fb}`` (ms) or ``{impl, status}`` for op at N tokens."""
    fn = load_op(op)
    if fn is None:
        return [dict(impl="all", status="not available yet")]
    inp = op.make(n, dtype, device)
    leaves = [z for z in inp.values() if z.requires_grad]
    compiled = torch.compile(lambda a: op.call(fn, a, "torch"))
    impls = {"ours (triton)": lambda a: op.call(fn, a, "triton"), "ours (torch)": lambda a: op.call(fn, a, "torch"),
             "torch.compile (torch)": compiled}
    rows = []
    for impl, call in impls.items():
        row = dict(impl=impl)
        try:
            row["fwd"], row["fb"] = time_fwd_and_fb(lambda c=call: c(inp), leaves, timer)
        except torch.cuda.OutOfMemoryError:
            row["status"] = "OOM"
        except Exception as exc:  # noqa: BLE001  (report and go on: a signature or backend that cannot run)
            row["status"] = f"error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:80]}"
        rows.append(row)
    return rows


def format_mem_table(op: MemOp, n: int, rows: list[dict], elem: int, copy_gbs: float) -> list[str]:
    """The lines of op's table: ms, GB/s and % of the copy bandwidth, and the goal's verdict."""
    bf, bb = op.min_bytes(n, elem)
    lines = [f"== {op.name}  N={n} tokens, {elem}-byte elements; minimum bytes fwd {bf / 1e6:.1f} MB, "
             f"f+b {bb / 1e6:.1f} MB; bound: {copy_gbs:.0f} GB/s measured copy",
             f"  {'impl':<24}{'fwd ms':>9}{'GB/s':>16}{'f+b ms':>10}{'GB/s':>16}"]
    for r in rows:
        if "status" in r:
            lines.append(f"  {r['impl']:<24}{r['status']}")
            continue
        cells = f"  {r['impl']:<24}"
        for width, ms, by in ((9, r["fwd"], bf), (10, r["fb"], bb)):
            gbs = by / ms / 1e6
            cells += f"{ms:>{width}.3f}{gbs:>9.0f} ({gbs / copy_gbs:4.0%})"
        lines.append(cells)
    ours = next((r for r in rows if r["impl"] == "ours (triton)" and "status" not in r), None)
    if ours is not None:
        frac = min(bf / ours["fwd"], bb / ours["fb"]) / 1e6 / copy_gbs
        lines.append(f"  goal: Triton fwd and f+b >= {GOAL_FRACTION:.0%} of the copy bandwidth: "
                     f"{frac:.0%}  {'met' if frac >= GOAL_FRACTION else 'NOT met'}")
    return lines


def lce_lines(size: dict, dtype: str, device: str, names: tuple[str, ...]) -> list[str]:
    """Peak memory and time of the linear + cross-entropy variants ``names`` (each in its own
    process, bench/linear_cross_entropy.py's measurement), against 'unfused' (one of them); the
    goal is judged on ``names[0]``."""
    res = lce_bench.measure(size["tokens"], size["vocab"], size["d_model"], dtype, device, names)
    bound = lce_bench.bounds(size["tokens"], size["vocab"], size["d_model"])
    base = res["unfused"]
    gib = 2**30
    lines = [f"== linear + cross-entropy  N={size['tokens']} tokens, V={size['vocab']}, D={size['d_model']}, "
             f"{dtype}, {device}; fused blocks of {bound['chunk']} tokens",
             f"  {'path':<16}{'peak GiB':>10}{'x unfused':>11}{'time ms':>10}{'x unfused':>11}{'loss':>11}"]
    for name in names:
        r = res[name]
        if "error" in r:
            lines.append(f"  {name:<16}{r['error']}")
            continue
        lines.append(f"  {name:<16}{r['peak'] / gib:10.3f}{r['peak'] / max(base['peak'], 1):11.3f}"
                     f"{r['seconds'] * 1e3:10.1f}{r['seconds'] / base['seconds']:11.2f}{r['loss']:11.5f}")
    ratio = res[names[0]]["peak"] / max(base["peak"], 1)
    lines.append(f"  goal: {names[0]} peak <= 25 % of unfused: {ratio:.1%}  {'met' if ratio <= 0.25 else 'NOT met'}"
                 f"  (bounds: unfused {bound['unfused'] / gib:.3f} GiB, fused {bound['fused'] / gib:.3f} GiB)")
    return lines


def median_ms(step: Callable, reps: int = 3) -> float:
    """Wall-clock median ms of ``step`` (the CPU tests of the table; on CUDA bench/kernels.py
    passes its CUDA-event timer)."""
    import time

    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
