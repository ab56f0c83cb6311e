"""Issue 13's GPU figures: MFU of a training step at about 1B parameters, and decoding at 32K.

    python bench/cuda.py [--quick] [--steps 10] [--micro-batch 4] [--seq-len 4096]

Without a CUDA device it prints that it skipped and exits 0, so `pretrain bench` runs it on any
machine. On a GPU:

1. **Training MFU**: forward + backward + AdamW of one micro-batch (bf16 autocast, fp32 master
   weights, the trainer's fused head + loss; bench/train_step.py) for a Llama-style model of
   Llama 3.2 1B's shapes (width 2048, 16 layers, 32 heads / 8 KV heads of 64, SwiGLU 8192; Phi
   vocabulary) and for configs/sambay_d16.toml (~1.0B non-embedding). MFU is model FLOPs per
   token (6N plus attention, from the layer pattern: ``flops_per_token``) x tokens/s over the
   device's dense bf16 datasheet peak. Goals: >= 40 % for the Llama-style model (torchtitan
   reports 33-39 % in bf16 for Llama 3 8B on H100) and >= 30 % for SambaY d16.
2. **Decoding**: bench/decode.py on the device in bf16 at width 2048 (32 heads / 8 KV heads of
   64), contexts 4K and 32K: per-token latency at batch 1 against the memory-traffic bound (the
   bandwidth probe runs on the device), and tokens/s under a fixed cache budget, SambaY against
   the Transformer against the paper's 10x.

A configuration that runs out of memory is reported in its row (lower ``--micro-batch``) and the
others still run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository, before bench/ (bench/kernels.py)

LLAMA_1B = ["model.d_model=2048", "model.n_layers=16", "model.attention.n_heads=32", "model.attention.n_kv_heads=8",
            "model.attention.head_dim=64", "model.ffn_hidden=8192"]
"""Llama 3.2 1B's shapes over configs/llama_tiny.toml (its vocabulary is set apart, below)."""

MODELS = (  # (name, config, overrides, MFU goal)
    ("Llama-style 1B", "configs/llama_tiny.toml", LLAMA_1B, 0.40),
    ("SambaY d16", "configs/sambay_d16.toml", [], 0.30),
)


def overrides(extra: list[str], micro_batch: int, seq_len: int) -> list[str]:
    """The run's overrides: the device, bf16, the Phi vocabulary, one micro-batch of ``seq_len``."""
    return [*extra, "train.device='cuda'", "train.dtype='bf16'", "model.vocab_size=32064", "data.vocab_size=32064",
            f"data.seq_len={seq_len}", f"train.micro_batch_size={micro_batch}",
            f"train.global_batch_size={micro_batch}"]


def mfu_table(steps: int, micro_batch: int, seq_len: int) -> None:
    import train_step  # bench/train_step.py: bench/ is on the path of a script run from it

    print(f"## Training step MFU ({torch.cuda.get_device_name()}, bf16 autocast, micro-batch {micro_batch} x "
          f"{seq_len} tokens, {steps} timed steps)\n")
    print("| model | parameters | s/step | tokens/s | MFU | goal | met |")
    print("|---|---|---|---|---|---|---|")
    for name, path, extra, goal in MODELS:
        try:
            row = train_step.bench(str(ROOT / path), overrides(extra, micro_batch, seq_len), steps)
        except torch.OutOfMemoryError:
            print(f"| {name} | - | out of memory at micro-batch {micro_batch} | - | - | {goal:.0%} | - |")
        else:
            print(f"| {name} | {row['params'] / 1e9:.2f}B | {row['s/step']:.3f} | {row['tokens/s']:.0f} "
                  f"| {row['mfu']:.1%} | {goal:.0%} | {'yes' if row['mfu'] >= goal else 'no'} |")
        torch.cuda.empty_cache()


def decode_tables(quick: bool) -> int:
    cmd = [sys.executable, str(ROOT / "bench" / "decode.py"), "--device", "cuda", "--dtype", "bfloat16",
           "--d-model", "2048", "--contexts", "4096", "32768", "--budget-gib", "32"]
    if quick:
        cmd.append("--quick")
    print("\n## Decoding on the GPU (bench/decode.py, bf16, width 2048)\n")
    sys.stdout.flush()
    return subprocess.run(cmd, cwd=ROOT).returncode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="3 timed training steps and fewer decoding steps")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("Skipped: no CUDA device here (torch.cuda.is_available() is False). On a GPU this prints the "
              "training MFU of a Llama-style 1B model and SambaY d16, and decoding at 4K and 32K.")
        return
    mfu_table(3 if args.quick else args.steps, args.micro_batch, args.seq_len)
    sys.exit(decode_tables(args.quick))


if __name__ == "__main__":
    from pretrain.config import ConfigError

    try:
        main()
    except ConfigError as exc:  # a bad override: one line and exit 2, as `pretrain` does
        print(f"{sys.argv[0]}: error: {exc}", file=sys.stderr)
        sys.exit(2)
