"""Registers and spills of the GLA Triton kernels on a GPU target, measured without a GPU:
each kernel is compiled to PTX for the target and assembled with the ptxas that ships with
Triton (``ptxas -v``), which reports the registers per thread and the bytes spilled to local
memory. Tiles are chosen so that nothing spills at K = V = 128 (kernels/gla/chunk.py).

    TRITON_INTERPRET=0 python -m kernels.gla.spills [--k 128] [--v 128] [--arch 90]

Prints one line per kernel: name, registers, spill stores and loads in bytes. Exits 1 when the
target's ptxas is missing.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

INT_POINTERS = {"reset", "cu_seqlens"}
FLOAT_SCALARS = {"scale"}
INT_SCALARS = {"T", "n_tok", "s_qk", "s_v"}


def _kernels(k_dim: int, v_dim: int) -> list[tuple[str, object, dict]]:
    from kernels.gla import chunk, fused_recurrent  # noqa: PLC0415  (after TRITON_INTERPRET is read)

    bk, bv = chunk.blocks(k_dim, v_dim)
    rk, rv = fused_recurrent._blocks(k_dim, v_dim)
    shape = dict(H=16, K=k_dim, V=v_dim, HAS_RESET=True, IS_VARLEN=False)
    tiles = dict(shape, BT=chunk.CHUNK, BK=bk, BV=bv)
    return [
        ("chunk fwd", chunk._chunk_gla_fwd_kernel, dict(tiles, HAS_H0=True, STORE_HT=True)),
        ("chunk bwd dq", chunk._chunk_gla_bwd_dq_kernel, dict(tiles, HAS_H0=True)),
        ("chunk bwd dk", chunk._chunk_gla_bwd_dkv_kernel, dict(tiles, HAS_DHT=True, STORE_DH0=True, DO_DK=True)),
        ("chunk bwd dv", chunk._chunk_gla_bwd_dkv_kernel, dict(tiles, HAS_DHT=True, STORE_DH0=True, DO_DK=False)),
        ("bwd dg", chunk.gla_bwd_dg_kernel, dict(H=16, K=k_dim, BT=chunk.CHUNK, BK=bk, HAS_RESET=True,
                                                 HAS_DLAST=True, IS_VARLEN=False)),
        ("recurrent fwd", fused_recurrent._fused_recurrent_gla_fwd_kernel,
         dict(shape, BK=rk, BV=rv, HAS_H0=True, STORE_HT=True)),
        ("recurrent bwd", fused_recurrent._fused_recurrent_gla_bwd_kernel,
         dict(shape, BK=rk, BV=rv, HAS_H0=True, HAS_DHT=True, STORE_DH0=True)),
    ]


def _signature(fn, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        elif name in INT_SCALARS:
            sig[name] = "i32"
        else:
            sig[name] = "*i32" if name in INT_POINTERS else "*fp32"
    return sig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=128, help="key head size")
    parser.add_argument("--v", type=int, default=128, help="value head size")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("spills: run with TRITON_INTERPRET=0 (the interpreter compiles nothing)", file=sys.stderr)
        return 1
    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    # the newest bundled ptxas: the PTX Triton emits can be newer than the older one accepts
    candidates = [os.path.join(bin_dir, name) for name in ("ptxas-blackwell", "ptxas")]
    ptxas = next((p for p in candidates if os.path.exists(p)), None)
    if ptxas is None:
        print(f"spills: no ptxas under {bin_dir}", file=sys.stderr)
        return 1
    target = GPUTarget("cuda", args.arch, 32)
    suffix = "a" if args.arch >= 90 else ""
    for name, fn, constexprs in _kernels(args.k, args.v):
        compiled = triton.compile(ASTSource(fn, _signature(fn, constexprs), constexprs), target=target)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "kernel.ptx")
            with open(path, "w") as f:
                f.write(compiled.asm["ptx"])
            out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{args.arch}{suffix}", path, "-o", os.devnull],
                                 capture_output=True, text=True, check=True).stderr
        regs = re.search(r"Used (\d+) registers", out)
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
        print(f"{name:16s} registers {regs.group(1) if regs else '?':>4s}   spill stores "
              f"{spills.group(1) if spills else '?':>5s} B   loads {spills.group(2) if spills else '?':>5s} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
