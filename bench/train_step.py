"""Training-step throughput and MFU of configs, side by side.

    python bench/train_step.py configs/tiny.toml configs/llama_tiny.toml [--steps 5] [--set k=v ...]

For each config: forward+backward+AdamW time per step on the configured micro-batch,
tokens/s, model FLOPs per token (from the layer pattern) and MFU against the device's
peak (a GPU table, or a measured fp32 GEMM rate on CPU); the last column is each
config's tokens/s as a ratio of the first config's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, before bench/ (bench/kernels.py)

from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.models import build_model, flops_per_token  # noqa: E402
from pretrain.train.mfu import MFU, peak_flops  # noqa: E402
from pretrain.train.optim import build_optimizer  # noqa: E402
from pretrain.train.trainer import compute_dtype, resolve_device  # noqa: E402


def bench(path: str, overrides: list[str], steps: int) -> dict:
    cfg = load_config(path, overrides).with_vocab()
    device = resolve_device(cfg)
    dtype = compute_dtype(cfg, device)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    opt = build_optimizer(model, cfg.optim, device)
    b, t = cfg.train.micro_batch_size, cfg.data.seq_len
    x = torch.randint(0, cfg.model.vocab_size, (b, t + 1), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(x[:, :-1], labels=x[:, 1:])  # the trainer's fused head + loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, lazy optimizer state, autotuning
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    fpt = flops_per_token(cfg.model, t)["total"]
    tps = b * t / seconds
    return {
        "config": path,
        "params": sum(p.numel() for p in model.parameters()),
        "s/step": seconds,
        "tokens/s": tps,
        "mfu": MFU(*peak_flops(device, cfg.train.peak_flops), fpt, 1, print)(tps),
        "device": str(device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    rows = [bench(c, args.overrides, args.steps) for c in args.configs]
    base = rows[0]["tokens/s"]
    print(f"{'config':<28}{'params':>12}{'s/step':>10}{'tokens/s':>12}{'MFU':>8}{'vs first':>10}  device")
    for r in rows:
        print(
            f"{r['config']:<28}{r['params']:>12,}{r['s/step']:>10.3f}{r['tokens/s']:>12.0f}"
            f"{r['mfu']:>8.1%}{r['tokens/s'] / base:>10.2f}  {r['device']}"
        )


if __name__ == "__main__":
    try:
        main()
    except ConfigError as exc:  # a bad config or --set: one line and exit 2, as `pretrain` does
        print(f"{sys.argv[0]}: error: {exc}", file=sys.stderr)
        sys.exit(2)
