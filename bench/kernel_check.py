"""``bench/kernels.py --check``: each Triton op once against our PyTorch path on the GPU, at
small awkward sizes (T not a multiple of the chunk), on the output and every input gradient;
the sanity check to run before trusting the timings (and ``model.kernels='auto'``) on a device.
"""

from __future__ import annotations

import math

import torch

from bench import kernels as bk

# --check: small awkward sizes (T not a multiple of the chunk); max error relative to the
# largest reference value, against a bound per dtype (TF32 dots for fp32 inputs on the GPU)
CHECK_SHAPES = {
    "chunk_gla": dict(B=2, T=100, H=2, K=64, V=64, C=64),
    "selective_scan": dict(B=2, T=100, D=64, N=16),
    "ssd_chunked": dict(B=2, T=100, H=4, P=32, G=2, N=16, C=64),
    "memory_scan": dict(B=2, T=100, H=2, D=32, F=64, L=2, C=32),
}
CHECK_TOL = {torch.float32: 5e-3, torch.bfloat16: 5e-2}


def check_op(name: str, dtype: torch.dtype, device: torch.device) -> list[tuple[str, float]]:
    """(tensor, max |triton - torch| / max |torch|) for the output and every input gradient."""
    s = CHECK_SHAPES[name]
    out = {}
    for backend in ("triton", "torch"):
        inp = bk.make_inputs(name, s, dtype, device, seed=1)
        y = bk.run_ours(name, inp, s, backend)
        y.backward(torch.ones_like(y) + torch.linspace(0, 1, y.numel(), device=device).view_as(y).to(y.dtype))
        grads = {}
        for key, z in inp.items():
            for i, leaf in enumerate(z if isinstance(z, list) else [z]):
                grads[f"d{key}" + (f"[{i}]" if isinstance(z, list) else "")] = leaf.grad
        out[backend] = {"out": y.detach(), **grads}
    errs = []
    for key, ref in out["torch"].items():
        got = out["triton"][key]
        if got is None or ref is None:
            errs.append((key, math.inf if (got is None) != (ref is None) else 0.0))
            continue
        ref, got = ref.double(), got.double()
        errs.append((key, ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()))
    return errs


def run_check(names: list[str], dtype: torch.dtype, device: torch.device) -> int:
    """Print each op's errors; 1 when one is over the dtype's bound (or not finite), else 0."""
    tol, failed = CHECK_TOL[dtype], False
    for name in names:
        errs = check_op(name, dtype, device)
        bad = [k for k, e in errs if not e <= tol]
        failed |= bool(bad)
        worst = max(e for _, e in errs)
        print(f"{name:<16}{bk.dtype_name(dtype)}  sizes {CHECK_SHAPES[name]}  max rel error {worst:.2e} "
              f"(bound {tol:.0e})  {'FAIL ' + ', '.join(bad) if bad else 'ok'}")
        print("    " + "  ".join(f"{k} {e:.1e}" for k, e in errs))
    return int(failed)
