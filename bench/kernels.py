"""Triton kernels of the recurrent cores against the device's peak, our PyTorch path and the
field's kernels (issue 9's benchmark), side by side; then issue 10's fused ops
(bench/fused_kernels.py): the linear + cross-entropy's peak memory and time against the unfused
path (and Liger-Kernel's), and the memory-bound ops' GB/s against the measured copy bandwidth.

    python bench/kernels.py [--quick] [--dtype bf16|fp32] [--ops chunk_gla ssd_chunked ...]
                            [--mem-ops rms_norm swiglu ...] [--mem-tokens N] [--no-lce]
                            [--lce-tokens N --lce-vocab V --lce-d-model D]
    python bench/kernels.py --check          # each Triton op once against the torch path (fp32, bf16)

Without a GPU it measures the linear + cross-entropy's memory (at a reduced default size,
N=4096 V=32768 D=1024 fp32: about half a minute on 2 cores), prints that the rest needs a GPU
and exits 0.

Per op with a Triton module present (``kernels.dispatch.triton_available``) and per sequence
length T: forward and forward+backward time (CUDA events after warm-up, the median of --reps),
for our Triton kernel, our PyTorch path (``backend='torch'``) and, where importable, fla's
``chunk_gla``, mamba_ssm's ``selective_scan_fn`` / ``mamba_chunk_scan_combined`` and
flash-attn's ``flash_attn_func`` (causal, same B, T, H and head size: the attention a GLA layer
replaces). Each row gives the achieved TFLOP/s and GB/s of the op's MINIMUM work, with the
device's peak beside it, and its time as a multiple of our Triton kernel's; each op ends with
its goal (issue 9, on an H100/H200) and whether the figures meet it.

Peaks: a datasheet table by device name (dense bf16 and TF32 tensor-core, fp32 CUDA-core, HBM
bandwidth) plus a measured copy bandwidth (``dst.copy_(src)`` of 1 GiB: read + write bytes /
time), the bound a memory-bound kernel can actually reach. Matmul ops (GLA, SSD, Titans) are
set against the tensor-core peak of the dtype (bf16, or TF32 for fp32 inputs: ``tl.dot``'s
default); the selective scan is element-wise and set against the fp32 CUDA-core peak.

Minimum FLOPs, forward (per op, counting the algorithm's multiply-adds as 2 FLOPs):
  chunk_gla      2 B H T (C K + C V + 2 K V), chunk C = 64: per token the intra-chunk scores
                 q k^T (C K, the causal C x C tile counted whole, as a tensor core computes it)
                 and their product with v (C V), the inter-chunk read q S and the state update
                 k^T v (K V each). It equals a FLOP counter on our chunked PyTorch path
                 (tests/kernels/test_bench_kernels.py).
  selective_scan B T D (7 N + 3): per state element dt A, exp, the decay product, (dt x) B,
                 the add, C h and the sum over N (7); per channel dt x, D x and its add (3):
                 the arithmetic of kernels/selective_scan/naive.py, element by element.
  ssd_chunked    2 B T (G C N + H C P + 2 H N P), chunk C (the config's): the group's
                 intra-chunk C B^T scores (C N), their product with x (C P), the chunk states
                 B^T x and the read of the carried states C h (N P each); the scan of the states
                 over chunks (B H P N per chunk) is left out (our PyTorch path's count is 1 %
                 above: it passes the states as a matmul over chunks).
  memory_scan    B T H (14 D F + 4 C (D + F)) for the 2-layer memory D -> F -> D (6 D^2 +
                 4 C D for the linear memory D -> D): the memory on k at the chunk's start
                 (4 D F), the output gradient to the hidden layer (2 D F), the weight gradients
                 (4 D F), the read on q (4 D F), and the dual form of the per-token read (two
                 C-wide products per layer); a lower bound: our PyTorch path counts 1.5-1.9x.
  forward+backward is 3x the forward (the backward's two products per forward product).
Minimum bytes: forward reads every per-token input once and writes every output once;
forward+backward adds the backward's reads of the inputs and the output gradient and its writes
of the input gradients: 3 x inputs + 2 x outputs. Parameters of size D or H (A, D, the memory's
initial weights) are left out; every per-token tensor is counted in --dtype.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import fused_kernels as fk  # noqa: E402
from kernels.dispatch import triton_available  # noqa: E402

# name substring (first match wins) -> dense TFLOP/s (bf16 tensor, tf32 tensor, fp32 CUDA core)
# and HBM GB/s, from NVIDIA's datasheets (SXM parts unless named).
PEAKS = [
    ("H200", dict(bf16=989.0, tf32=494.7, fp32=66.9, gbs=4800.0)),
    ("H100 PCIe", dict(bf16=756.0, tf32=378.0, fp32=51.2, gbs=2000.0)),
    ("H100", dict(bf16=989.0, tf32=494.7, fp32=66.9, gbs=3350.0)),
    ("A100 80GB PCIe", dict(bf16=312.0, tf32=156.0, fp32=19.5, gbs=1935.0)),
    ("A100-SXM4-80GB", dict(bf16=312.0, tf32=156.0, fp32=19.5, gbs=2039.0)),
    ("A100", dict(bf16=312.0, tf32=156.0, fp32=19.5, gbs=1555.0)),
]
T_SWEEP, T_QUICK = (2048, 4096, 8192, 16384), (2048, 4096)


def device_peak(name: str) -> dict[str, float] | None:
    """The datasheet peaks of the GPU called ``name`` (TFLOP/s, GB/s), None for one not listed."""
    return next((dict(p) for key, p in PEAKS if key in name), None)


@dataclass
class Op:
    """One op: its Triton module, its shapes, inputs, the minimum work and the references."""

    name: str
    module: str  # the Triton implementation kernels.dispatch looks for
    matmul: bool  # set against the tensor-core peak (else the fp32 CUDA-core peak)
    shape: Callable[[int], dict]  # T -> sizes
    flops_fwd: Callable[[dict], float]
    inputs: Callable[[dict], dict[str, int]]  # per-token input tensors -> elements
    outputs: Callable[[dict], dict[str, int]]
    refs: list[str] = field(default_factory=list)  # the field's kernels, by row name
    goal: str = ""


def min_bytes(op: Op, s: dict, elem: int) -> tuple[float, float]:
    """Minimum HBM bytes of (forward, forward+backward) for ``elem``-byte elements."""
    i, o = sum(op.inputs(s).values()) * elem, sum(op.outputs(s).values()) * elem
    return i + o, 3 * i + 2 * o


def min_flops(op: Op, s: dict) -> tuple[float, float]:
    """Minimum FLOPs of (forward, forward+backward)."""
    f = op.flops_fwd(s)
    return f, 3 * f


def _mamba2_shape(t: int) -> dict:
    from pretrain.config import load_config

    cfg = load_config(ROOT / "configs" / "mamba2_370m.toml", [])
    m = cfg.model.mamba2
    d_inner = m.expand * cfg.model.d_model
    return dict(B=cfg.train.micro_batch_size, T=t, H=d_inner // m.head_dim, P=m.head_dim, G=m.n_groups,
                N=m.d_state, C=m.chunk_size)


def _titans_shape(t: int) -> dict:
    from pretrain.config import load_config

    cfg = load_config(ROOT / "configs" / "titans_mac_170m.toml", [])
    ti = cfg.model.titans
    d = cfg.model.d_model // ti.n_heads
    return dict(B=8, T=t, H=ti.n_heads, D=d, F=d * ti.memory_expand, L=ti.memory_depth, C=ti.chunk_size)


def _titans_flops(s: dict) -> float:
    d, f, c = s["D"], s["F"], s["C"]
    per = 14 * d * f + 4 * c * (d + f) if s["L"] == 2 else 6 * d * d + 4 * c * d
    return s["B"] * s["T"] * s["H"] * per


OPS = {
    "chunk_gla": Op(
        "chunk_gla", "kernels.gla.chunk", True,
        lambda t: dict(B=8, T=t, H=16, K=128, V=128, C=64),
        lambda s: 2 * s["B"] * s["H"] * s["T"] * (s["C"] * s["K"] + s["C"] * s["V"] + 2 * s["K"] * s["V"]),
        lambda s: {n: s["B"] * s["T"] * s["H"] * s[d] for n, d in (("q", "K"), ("k", "K"), ("g", "K"), ("v", "V"))},
        lambda s: {"o": s["B"] * s["T"] * s["H"] * s["V"]},
        ["fla chunk_gla", "flash_attn (causal)"],
        "GLA fwd+bwd <= 1.0x fla's chunk_gla, and faster than FlashAttention-2 from T = 8192",
    ),
    "selective_scan": Op(
        "selective_scan", "kernels.selective_scan.chunk", False,
        lambda t: dict(B=8, T=t, D=2048, N=16),
        lambda s: s["B"] * s["T"] * s["D"] * (7 * s["N"] + 3),
        lambda s: {"x": s["B"] * s["T"] * s["D"], "dt": s["B"] * s["T"] * s["D"],
                   "B": s["B"] * s["T"] * s["N"], "C": s["B"] * s["T"] * s["N"]},
        lambda s: {"y": s["B"] * s["T"] * s["D"]},
        ["mamba_ssm selective_scan_fn"],
        "Mamba-1 scan fwd+bwd >= 10x faster than our PyTorch path at T = 4096",
    ),
    "ssd_chunked": Op(
        "ssd_chunked", "kernels.ssd.chunk", True, _mamba2_shape,
        lambda s: 2 * s["B"] * s["T"] * (s["G"] * s["C"] * s["N"] + s["H"] * s["C"] * s["P"]
                                         + 2 * s["H"] * s["N"] * s["P"]),
        lambda s: {"x": s["B"] * s["T"] * s["H"] * s["P"], "dt": s["B"] * s["T"] * s["H"],
                   "B": s["B"] * s["T"] * s["G"] * s["N"], "C": s["B"] * s["T"] * s["G"] * s["N"]},
        lambda s: {"y": s["B"] * s["T"] * s["H"] * s["P"]},
        ["mamba_ssm mamba_chunk_scan_combined"],
        "SSD fwd+bwd within 1.2x of mamba_ssm's mamba_chunk_scan_combined",
    ),
    "memory_scan": Op(
        "memory_scan", "kernels.titans.chunk", True, _titans_shape, _titans_flops,
        lambda s: {**{n: s["B"] * s["T"] * s["H"] * s["D"] for n in "qkv"},
                   **{n: s["B"] * s["T"] * s["H"] for n in ("theta", "eta", "alpha")}},
        lambda s: {"y": s["B"] * s["T"] * s["H"] * s["D"]},
        [],
        "",
    ),
}


def make_inputs(name: str, s: dict, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    """The inputs of op ``name`` at sizes ``s``: per-token tensors in ``dtype``, parameters (A, D,
    the memory's initial weights) in fp32 as the models keep them; leaves that need a gradient."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, lo=-1.0, hi=1.0, dt=dtype):
        return (torch.rand(*shape, generator=gen) * (hi - lo) + lo).to(device, dt).requires_grad_()

    if name == "chunk_gla":
        b, t, h, k, v = (s[c] for c in "BTHKV")
        # log-sigmoid gates / 16 as the GLA layer makes them: in about [-0.3, 0]
        g = (F.logsigmoid(torch.randn(b, t, h, k, generator=gen)) / 16).to(device, dtype).requires_grad_()
        return dict(q=rand(b, t, h, k), k=rand(b, t, h, k), v=rand(b, t, h, v), g=g)
    if name == "selective_scan":
        b, t, d, n = (s[c] for c in "BTDN")
        return dict(x=rand(b, t, d), dt=rand(b, t, d, lo=1e-3, hi=0.1), A=rand(d, n, lo=-n, hi=-1.0, dt=torch.float32),
                    B=rand(b, t, n), C=rand(b, t, n), D=rand(d, dt=torch.float32))
    if name == "ssd_chunked":
        b, t, h, p, g, n = (s[c] for c in "BTHPGN")
        return dict(x=rand(b, t, h, p), dt=rand(b, t, h, lo=1e-3, hi=0.1),
                    A=rand(h, lo=-8.0, hi=-1.0, dt=torch.float32),
                    B=rand(b, t, g, n), C=rand(b, t, g, n), D=rand(h, dt=torch.float32))
    if name == "memory_scan":
        b, t, h, d, f = (s[c] for c in "BTHDF")
        q, k = (F.normalize(torch.randn(b, t, h, d, generator=gen), dim=-1).to(device, dtype).requires_grad_()
                for _ in range(2))
        sizes = [(d, f), (f, d)] if s["L"] == 2 else [(d, d)]
        init = [rand(h, i, o, lo=-i**-0.5, hi=i**-0.5, dt=torch.float32) for i, o in sizes]
        return dict(q=q, k=k, v=rand(b, t, h, d), theta=rand(b, t, h, lo=0.0, hi=0.1),
                    eta=rand(b, t, h, lo=0.5, hi=1.0), alpha=rand(b, t, h, lo=0.0, hi=0.1), init=init)
    raise ValueError(f"unknown op {name!r}")


def run_ours(name: str, inp: dict, s: dict, backend: str) -> torch.Tensor:
    """The op's main output through our public function with ``backend`` ('triton' | 'torch')."""
    if name == "chunk_gla":
        from kernels.gla import chunk_gla

        return chunk_gla(inp["q"], inp["k"], inp["v"], inp["g"], chunk_size=s["C"], backend=backend)[0]
    if name == "selective_scan":
        from kernels.selective_scan import selective_scan

        return selective_scan(*(inp[n] for n in ("x", "dt", "A", "B", "C", "D")), backend=backend)[0]
    if name == "ssd_chunked":
        from kernels.ssd import ssd_chunked

        return ssd_chunked(*(inp[n] for n in ("x", "dt", "A", "B", "C", "D")), chunk_size=s["C"], backend=backend)[0]
    from kernels.titans import MemoryState, memory_scan

    b, t = s["B"], s["T"]
    positions = torch.arange(t, device=inp["q"].device).expand(b, t)
    return memory_scan(
        inp["q"], inp["k"], inp["v"], inp["theta"], inp["eta"], inp["alpha"], MemoryState.fresh(inp["init"], b),
        inp["init"], positions, s["C"], read="per_token", backend=backend,
    )[0]


def reference(ref: str, inp: dict, s: dict) -> tuple[dict, Callable[[dict], torch.Tensor]]:
    """(inputs in the reference's layout, made once outside the timing; its function). Raises
    ImportError where the package is missing, ValueError where it cannot take ``inp``."""
    leaf = lambda z: z.detach().clone().requires_grad_()  # noqa: E731
    if ref == "fla chunk_gla":
        from fla.ops.gla import chunk_gla as fla_gla

        kw = {"head_first": False} if "head_first" in inspect.signature(fla_gla).parameters else {}
        return inp, lambda a: fla_gla(a["q"], a["k"], a["v"], a["g"], **kw)[0]
    if ref == "flash_attn (causal)":
        from flash_attn import flash_attn_func

        if inp["q"].dtype == torch.float32:
            raise ValueError("needs bf16/fp16")
        return inp, lambda a: flash_attn_func(a["q"], a["k"], a["v"], causal=True)
    if ref == "mamba_ssm selective_scan_fn":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

        time_last = {n: leaf(inp[n].transpose(1, 2).contiguous()) for n in ("x", "dt", "B", "C")}  # [B, *, T]
        a = {**time_last, "A": inp["A"], "D": inp["D"]}
        return a, lambda a: selective_scan_fn(a["x"], a["dt"], a["A"], a["B"], a["C"], a["D"])
    if ref == "mamba_ssm mamba_chunk_scan_combined":
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        return inp, lambda a: mamba_chunk_scan_combined(a["x"], a["dt"], a["A"], a["B"], a["C"], s["C"], D=a["D"])
    raise ValueError(f"unknown reference {ref!r}")


def _leaves(inp: dict) -> list[torch.Tensor]:
    out = []
    for z in inp.values():
        out += z if isinstance(z, list) else [z]
    return [z for z in out if isinstance(z, torch.Tensor) and z.requires_grad]


def cuda_time_ms(fn: Callable[[], object], warmup: int, reps: int) -> float:
    """Median milliseconds of ``fn`` over ``reps`` CUDA-event-timed calls after ``warmup``
    calls; fewer repetitions (3) when one call takes over half a second (the PyTorch paths)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(warmup + reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
            if len(times) >= 3 and statistics.median(times) > 500:
                break
    return statistics.median(times)


def measure(fn: Callable[[dict], torch.Tensor], inp: dict, warmup: int, reps: int) -> tuple[float, float]:
    """(forward ms without autograd, forward+backward ms) of ``fn`` on ``inp``."""
    leaves = _leaves(inp)
    with torch.no_grad():
        fwd = cuda_time_ms(lambda: fn(inp), warmup, reps)
    with torch.no_grad():
        grad_out = torch.randn_like(fn(inp))

    def step():
        for z in leaves:
            z.grad = None
        fn(inp).backward(grad_out)

    return fwd, cuda_time_ms(step, warmup, reps)


def row_work(op: Op, impl: str, s: dict, elem: int) -> tuple[float, float, float, float]:
    """(FLOPs fwd, FLOPs fwd+bwd, bytes fwd, bytes fwd+bwd) credited to row ``impl``: the op's
    minimum, except FlashAttention's own causal count (fwd 2 B H T^2 D, backward 2.5x the
    forward, as its authors count it; bytes q, k, v in and o out)."""
    if impl.startswith("flash_attn"):
        f = 2 * s["B"] * s["H"] * s["T"] ** 2 * s["K"]
        i, o = 3 * s["B"] * s["T"] * s["H"] * s["K"] * elem, s["B"] * s["T"] * s["H"] * s["K"] * elem
        return f, 3.5 * f, i + o, 3 * i + 2 * o
    return (*min_flops(op, s), *min_bytes(op, s, elem))


def flop_peak(op: Op, dtype: torch.dtype, peak: dict | None) -> tuple[float | None, str]:
    """The TFLOP/s bound of ``op`` in ``dtype`` and its name."""
    kind = ("bf16" if dtype == torch.bfloat16 else "tf32") if op.matmul else "fp32"
    label = {"bf16": "bf16 tensor core", "tf32": "TF32 tensor core", "fp32": "fp32 CUDA core"}[kind]
    return (peak[kind] if peak else None), label


def _pct(x: float, bound: float | None) -> str:
    return f"{x:7.1f} ({x / bound:4.0%})" if bound else f"{x:7.1f}       "


def format_table(op: Op, shapes: dict[int, dict], rows: list[dict], dtype: torch.dtype, peak: dict | None,
                 copy_gbs: float | None) -> list[str]:
    """The lines of ``op``'s table. ``rows``: dicts with T, impl, and fwd / fb in ms or a
    ``status`` string ('not installed', 'OOM', ...). Percentages are of the datasheet TFLOP/s
    and of the measured copy bandwidth (the datasheet's when none was measured)."""
    elem = torch.finfo(dtype).bits // 8
    tflops, label = flop_peak(op, dtype, peak)
    gbs = copy_gbs or (peak["gbs"] if peak else None)
    head = f"== {op.name}  {dtype_name(dtype)}  sizes " + " ".join(f"{k}={v}" for k, v in shapes[min(shapes)].items()
                                                               if k != "T")
    bound = f"   bound: {tflops:.0f} TFLOP/s {label}" if tflops else f"   bound: unknown device ({label})"
    bound += f", {gbs:.0f} GB/s " + ("measured copy" if copy_gbs else "datasheet") if gbs else ""
    lines = [head, bound + "; x: time / our Triton kernel's",
             f"{'T':>6}  {'impl':<36}{'fwd ms':>9}{'TFLOP/s':>15}{'GB/s':>15}{'f+b ms':>10}"
             f"{'TFLOP/s':>15}{'GB/s':>15}{'fwd x':>8}{'f+b x':>8}"]
    ours = {r["T"]: r for r in rows if r["impl"] == "ours (triton)" and "status" not in r}
    for r in rows:
        t = r["T"]
        if "status" in r:
            lines.append(f"{t:>6}  {r['impl']:<36}{r['status']}")
            continue
        ff, fb, bf, bb = row_work(op, r["impl"], shapes[t], elem)
        cells = f"{t:>6}  {r['impl']:<36}"
        for width, ms, fl, by in ((9, r["fwd"], ff, bf), (10, r["fb"], fb, bb)):
            cells += f"{ms:>{width}.3f}"
            cells += f"{_pct(fl / ms / 1e9, tflops):>15}{_pct(by / ms / 1e6, gbs):>15}"
        base = ours.get(t)
        if base:
            cells += f"{r['fwd'] / base['fwd']:>8.2f}{r['fb'] / base['fb']:>8.2f}"
        lines.append(cells)
    return lines


def _fb(rows: list[dict], impl: str, t: int) -> float | None:
    return next((r["fb"] for r in rows if r["impl"] == impl and r["T"] == t and "status" not in r), None)


def goal_lines(op: Op, rows: list[dict]) -> list[str]:
    """Issue 9's goal for ``op`` and, per T, the measured ratio and whether it is met."""
    if not op.goal:
        return []
    lines = [f"   goal: {op.goal}"]

    def judge(t: int, ours: str, other: str, ok: Callable[[float], bool], what: str) -> None:
        a, b = _fb(rows, ours, t), _fb(rows, other, t)
        if a is None or b is None:
            lines.append(f"   T={t}: {what}: not measured ({ours if a is None else other} missing)")
        else:
            lines.append(f"   T={t}: {what} {a / b:.2f}x  {'met' if ok(a / b) else 'NOT met'}")

    for t in sorted({r["T"] for r in rows}):
        if op.name == "chunk_gla":
            judge(t, "ours (triton)", "fla chunk_gla", lambda x: x <= 1.0, "f+b time / fla's")
            if t >= 8192:
                judge(t, "ours (triton)", "flash_attn (causal)", lambda x: x < 1.0, "f+b time / FlashAttention-2's")
        elif op.name == "selective_scan" and t == 4096:
            judge(t, "ours (torch)", "ours (triton)", lambda x: x >= 10.0, "speed-up over our PyTorch path")
        elif op.name == "ssd_chunked":
            judge(t, "ours (triton)", "mamba_ssm mamba_chunk_scan_combined", lambda x: x <= 1.2,
                  "f+b time / mamba_ssm's")
    return lines


def dtype_name(dtype: torch.dtype) -> str:
    """'bf16' or 'fp32', as --dtype spells it."""
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def copy_bandwidth_gbs(device: torch.device, gib: float = 1.0) -> float:
    """Measured device copy bandwidth: read + write bytes of ``dst.copy_(src)`` / median time."""
    src = torch.empty(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, reps=10)
    return 2 * src.numel() * 4 / ms / 1e6


def bench_op(op: Op, ts: tuple[int, ...], dtype: torch.dtype, device: torch.device, warmup: int,
             reps: int) -> list[dict]:
    """Rows (:func:`format_table`) of ``op`` at each T: our Triton kernel, our PyTorch path and
    the field's kernels, or why a row has no time."""
    rows = []
    for t in ts:
        s = op.shape(t)
        inp = make_inputs(op.name, s, dtype, device)
        impls = [("ours (triton)", None), ("ours (torch)", None), *((r, r) for r in op.refs)]
        for impl, ref in impls:
            row = {"T": t, "impl": impl}
            try:
                if ref is None:
                    backend = impl[6:-1]
                    args, fn = inp, lambda a, b=backend: run_ours(op.name, a, s, b)
                else:
                    args, fn = reference(ref, inp, s)
                row["fwd"], row["fb"] = measure(fn, args, warmup, reps)
            except ImportError:
                row["status"] = "not installed"
            except torch.cuda.OutOfMemoryError:
                row["status"] = "OOM"
            except Exception as exc:  # noqa: BLE001  (a shape, dtype or version a kernel does not take: report, go on)
                first = (str(exc).splitlines() or [""])[0]
                row["status"] = f"error: {type(exc).__name__}: {first[:80]}"
            torch.cuda.empty_cache()
            rows.append(row)
        del inp
        torch.cuda.empty_cache()
    return rows


def lce_size(args: argparse.Namespace, default: dict) -> dict:
    """The linear + cross-entropy's sizes: ``default`` overridden by the --lce-* flags."""
    given = dict(tokens=args.lce_tokens, vocab=args.lce_vocab, d_model=args.lce_d_model)
    return {k: given[k] or v for k, v in default.items()}


def run_fused(args: argparse.Namespace, dtype: torch.dtype, device: torch.device, copy_gbs: float) -> None:
    """Issue 10's part on CUDA: the linear + cross-entropy, then the memory-bound ops."""
    if not args.no_lce:
        names = ("fused (triton)", "fused (torch)", "liger", "unfused")
        print("\n".join(fk.lce_lines(lce_size(args, fk.LCE_GPU), args.dtype, "cuda", names)), flush=True)
    timer = lambda step: cuda_time_ms(step, args.warmup, args.reps)  # noqa: E731
    for name in args.mem_ops:
        op = fk.MEM_OPS[name]
        rows = fk.bench_mem_op(op, args.mem_tokens, dtype, device, timer)
        if rows and rows[0]["impl"] == "all":
            print(f"== {name} ({op.module}.{op.function}): {rows[0]['status']}", flush=True)
            continue
        print("\n".join(fk.format_mem_table(op, args.mem_tokens, rows, dtype.itemsize, copy_gbs)), flush=True)
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or --check) and return the exit code: 0, or 1 when --check fails."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"T in {T_QUICK} instead of {T_SWEEP}")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--ops", nargs="*", choices=list(OPS), default=list(OPS))
    parser.add_argument("--mem-ops", nargs="*", choices=list(fk.MEM_OPS), default=list(fk.MEM_OPS),
                        help="issue 10's memory-bound ops (GPU)")
    parser.add_argument("--mem-tokens", type=int, default=16384, help="tokens N of the memory-bound ops")
    parser.add_argument("--no-lce", action="store_true", help="skip the linear + cross-entropy")
    parser.add_argument("--lce-tokens", type=int, default=None,
                        help=f"default {fk.LCE_CPU['tokens']} on CPU, {fk.LCE_GPU['tokens']} on CUDA")
    parser.add_argument("--lce-vocab", type=int, default=None)
    parser.add_argument("--lce-d-model", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--check", action="store_true",
                        help="each Triton op once against the torch path, fp32 and bf16 (exit 1 on a failure)")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    if not torch.cuda.is_available():
        if not (args.check or args.no_lce):  # fp32: the CPU's bf16 matmuls would time something else
            print("\n".join(fk.lce_lines(lce_size(args, fk.LCE_CPU), "fp32", "cpu", ("fused", "unfused"))),
                  flush=True)
        print("the rest of bench/kernels.py needs a GPU (CUDA): the Triton kernels' time and GB/s (issue 9's "
              "recurrent cores, issue 10's memory-bound ops); the Triton kernels only run interpreted on a CPU, "
              "and tests/kernels checks them there")
        return 0
    device = torch.device("cuda")
    present = [n for n in args.ops if triton_available(OPS[n].module)]
    missing = [n for n in args.ops if n not in present]
    if missing:
        print("no Triton kernel yet (skipped): " + ", ".join(f"{n} ({OPS[n].module})" for n in missing))
    if args.check:  # both dtypes: a sanity check should not depend on a flag
        from bench.kernel_check import run_check  # noqa: PLC0415  (it imports this module)

        return max(run_check(present, d, device) for d in (torch.float32, torch.bfloat16))
    name = torch.cuda.get_device_name(device)
    peak = device_peak(name)
    copy_gbs = copy_bandwidth_gbs(device)
    import triton  # noqa: PLC0415  (present: triton_available said so)

    print(f"device {name}: " + (", ".join(f"{k} {v:g}" for k, v in peak.items()) if peak else "not in the peak table")
          + f" (TFLOP/s, GB/s); measured copy {copy_gbs:.0f} GB/s; torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    ts = T_QUICK if args.quick else T_SWEEP
    for n in present:
        op = OPS[n]
        rows = bench_op(op, ts, dtype, device, args.warmup, args.reps)
        print("\n".join(format_table(op, {t: op.shape(t) for t in ts}, rows, dtype, peak, copy_gbs)))
        print("\n".join(goal_lines(op, rows)), flush=True)
    run_fused(args, dtype, device, copy_gbs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
