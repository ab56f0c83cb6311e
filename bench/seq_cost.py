"""Training cost against sequence length, per mixer: time and activation memory per token.

    python bench/seq_cost.py [--lengths 512 2048 8192 16384] [--mixers attn swa mamba mamba2 gla]
                             [--d-model 256] [--repeats 3] [--plot out.png]

Each mixer runs as a two-block model ('<mixer>:mlp' twice; d_model 256, 4 heads, window 128,
vocabulary 4096, fp32, the PyTorch paths) on one sequence of each length: forward + backward
time per token (median of ``--repeats``) and the bytes the forward saves for the backward per
token (each saved tensor's storage counted once, through ``saved_tensors_hooks``: the activation
memory of a step, independent of the allocator). The goal: linear-time mixers stay flat (time
per token at the longest length within 1.3x of the shortest; memory per token flat) while full
attention's time per token grows with T. ``x first`` columns are each length's ratio to the
shortest.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, before bench/ (bench/kernels.py)

from pretrain.config import load_config  # noqa: E402
from pretrain.models import build_model  # noqa: E402

LINEAR = ("swa", "mamba", "mamba2", "gla")


def build(mixer: str, d_model: int, seq: int) -> torch.nn.Module:
    cfg = load_config("configs/tiny.toml", [
        f"model.layer_pattern='{mixer}:mlp'", "model.n_layers=2", f"model.d_model={d_model}",
        "model.attention.n_heads=4", "model.attention.window=128", f"data.seq_len={seq}",
        "model.vocab_size=4096", "data.vocab_size=4096",
    ])
    torch.manual_seed(0)
    return build_model(cfg.model)


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages the forward of ``x`` saves for backward."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x[:, :-1], labels=x[:, 1:])
    del loss
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


def seconds_per_step(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    def step() -> None:
        model(x[:, :-1], labels=x[:, 1:]).backward()
        model.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(mixers: list[str], lengths: list[int], d_model: int, repeats: int) -> dict[str, list[tuple[float, float]]]:
    """mixer -> [(microseconds per token, saved bytes per token)] per length."""
    out: dict[str, list[tuple[float, float]]] = {}
    for mixer in mixers:
        out[mixer] = []
        for seq in lengths:
            model = build(mixer, d_model, seq)
            x = torch.randint(0, 4096, (1, seq + 1), generator=torch.Generator().manual_seed(0))
            us = seconds_per_step(model, x, repeats) / seq * 1e6
            out[mixer].append((us, saved_bytes(model, x) / seq))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    p.add_argument("--mixers", nargs="+", default=["attn", *LINEAR])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--plot", help="write a PNG of time and memory per token against T here")
    args = p.parse_args()
    res = measure(args.mixers, args.lengths, args.d_model, args.repeats)
    print(f"| mixer | {' | '.join(f'T={t} us/tok (x first)' for t in args.lengths)} | KiB/tok at T={args.lengths[0]} "
          f"| KiB/tok at T={args.lengths[-1]} | flat? |")
    print("|---|" + "---|" * (len(args.lengths) + 3))
    for mixer, rows in res.items():
        first = rows[0][0]
        cells = " | ".join(f"{us:.1f} ({us / first:.2f}x)" for us, _ in rows)
        flat = "-" if mixer not in LINEAR else (
            "yes" if rows[-1][0] <= 1.3 * first and rows[-1][1] <= 1.05 * rows[0][1] else "no")
        print(f"| {mixer} | {cells} | {rows[0][1] / 1024:.1f} | {rows[-1][1] / 1024:.1f} | {flat} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
        for mixer, rows in res.items():
            a.plot(args.lengths, [us for us, _ in rows], "o-", label=mixer)
            b.plot(args.lengths, [m / 1024 for _, m in rows], "o-", label=mixer)
        for ax, label in ((a, "fwd+bwd us / token"), (b, "saved KiB / token")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length T")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        a.legend()
        fig.tight_layout()
        fig.savefig(args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
