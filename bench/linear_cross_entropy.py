"""Peak memory and time of the head + cross-entropy, fused in blocks of tokens
(:mod:`kernels.linear_cross_entropy`, what the trainer runs) against the unfused path (the
``[N, V]`` logits materialised, ``F.cross_entropy``, autograd), forward and backward.

    python bench/linear_cross_entropy.py [--tokens 16384 --vocab 32768 --d-model 1024 --dtype fp32]

Each variant runs in a fresh process (so one's freed memory cannot hide the other's peak); the
figure is the growth of the peak resident memory (``getrusage`` ``ru_maxrss``) during forward +
backward, above what the inputs, the weight and their gradients (allocated and touched before)
already hold, on CPU (one call, its time included); on CUDA, ``torch.cuda.max_memory_allocated``
above the same baseline, and the median time of 3 calls after a warm-up call.

Bounds printed beside the figures: the unfused path must hold the fp32 logits ``N V 4`` bytes and
their gradient (the same again; autograd keeps the log-softmax as well); the fused path one block
of ``c V 4`` bytes and its gradient (computed in place) plus the fp32 weight gradient accumulator
``V D 4``. Goal (issue 10): fused peak <= 25 % of unfused at vocab 32k and 16k tokens.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


VARIANTS = ("fused", "fused (torch)", "fused (triton)", "liger", "unfused")
"""'fused': the public op with backend 'auto' (what the trainer runs); 'fused (torch)' / 'fused
(triton)': its block's element-wise part forced to PyTorch / the Triton kernel; 'liger':
Liger-Kernel's LigerFusedLinearCrossEntropyLoss (ImportError where not installed)."""


def loss_function(name: str):
    """``(hidden, weight, labels) -> loss`` of variant ``name`` (:data:`VARIANTS`)."""
    from kernels.linear_cross_entropy import linear_cross_entropy
    from kernels.linear_cross_entropy.naive import naive_linear_cross_entropy

    if name == "unfused":
        return naive_linear_cross_entropy
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        return lambda hidden, weight, labels: liger(weight, hidden, labels)
    backend = {"fused": "auto", "fused (torch)": "torch", "fused (triton)": "triton"}[name]
    return lambda hidden, weight, labels: linear_cross_entropy(hidden, weight, labels, backend=backend)


def _variant(name: str, tokens: int, vocab: int, d_model: int, dtype: str, device: str, out) -> None:
    """One forward + backward of ``name`` (:data:`VARIANTS`); puts a result dict on ``out``
    (``{"name", "error"}`` where the variant cannot run: a missing package)."""
    try:
        fn = loss_function(name)
    except ImportError as exc:
        out.put({"name": name, "error": f"not installed ({exc.name})"})
        return

    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    dt = DTYPES[dtype]
    hidden = torch.randn(tokens, d_model, generator=gen, device=dev, dtype=dt).requires_grad_()
    weight = (torch.randn(vocab, d_model, generator=gen, device=dev, dtype=dt) * d_model**-0.5).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen, device=dev)
    # the gradients' memory belongs to the baseline: both paths must produce them
    hidden.grad, weight.grad = torch.ones_like(hidden), torch.ones_like(weight)
    if dev.type == "cuda":  # a warm-up call first: Triton's compilation and cuBLAS's set-up are not timed
        fn(hidden, weight, labels).backward()
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    base = _peak_bytes(dev)
    times = []
    for _ in range(3 if dev.type == "cuda" else 1):  # CPU: one call (ru_maxrss cannot be reset)
        start = time.perf_counter()
        loss = fn(hidden, weight, labels)
        loss.backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    out.put({"name": name, "peak": _peak_bytes(dev) - base, "seconds": seconds, "loss": loss.item()})


def measure(tokens: int, vocab: int, d_model: int, dtype: str, device: str,
            names: tuple[str, ...] = ("fused", "unfused")) -> dict[str, dict]:
    """{name: {...}} for each variant in ``names``, each measured in its own spawned process."""
    ctx = mp.get_context("spawn")
    results = {}
    for name in names:
        q = ctx.Queue()
        p = ctx.Process(target=_variant, args=(name, tokens, vocab, d_model, dtype, device, q))
        p.start()
        results[name] = q.get()
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"the {name} variant failed with exit code {p.exitcode}")
    return results


def bounds(tokens: int, vocab: int, d_model: int) -> dict[str, int]:
    """The least extra bytes each path must hold (see the module docstring)."""
    from kernels.linear_cross_entropy.chunk_torch import auto_chunk_size

    chunk = auto_chunk_size(tokens, d_model, vocab)
    return {"unfused": 2 * tokens * vocab * 4, "fused": chunk * vocab * 4 + vocab * d_model * 4, "chunk": chunk}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON line")
    args = ap.parse_args(argv)
    res = measure(args.tokens, args.vocab, args.d_model, args.dtype, args.device)
    bound = bounds(args.tokens, args.vocab, args.d_model)
    ratio = res["fused"]["peak"] / max(res["unfused"]["peak"], 1)
    if args.json:
        print(json.dumps({"results": res, "bounds": bound, "ratio": ratio}))
        return 0
    gib = 2**30
    print(f"linear + cross-entropy, N={args.tokens} tokens, V={args.vocab}, D={args.d_model}, "
          f"{args.dtype}, {args.device}; fused blocks of {bound['chunk']} tokens")
    print(f"{'path':>8} {'peak GiB':>9} {'bound GiB':>10} {'time s':>7} {'loss':>9}")
    for name in ("unfused", "fused"):
        r = res[name]
        print(f"{name:>8} {r['peak'] / gib:9.3f} {bound[name] / gib:10.3f} {r['seconds']:7.2f} {r['loss']:9.5f}")
    goal = "meets" if ratio <= 0.25 else "MISSES"
    print(f"fused / unfused peak: {ratio:.3f} ({goal} the goal <= 0.25); "
          f"time {res['fused']['seconds'] / res['unfused']['seconds']:.2f}x; "
          f"loss difference {abs(res['fused']['loss'] - res['unfused']['loss']):.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
