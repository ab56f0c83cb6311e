"""Every model family's tiny config trained for the same number of steps on the built-in
corpus, side by side: parameters, CPU tokens/s and validation loss.

    python bench/families.py [--steps 40] [--set k=v ...] [CONFIG ...]

All train 8 sequences of 256 tokens per step. Each run uses the trainer as `pretrain train` does (its own run directory under a temporary
folder, data prepared once into data.dir). The last column is each family's training
throughput as a ratio of the first config's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, before bench/ (bench/kernels.py)

from pretrain.config import ConfigError, load_config  # noqa: E402
from pretrain.models import count_parameters  # noqa: E402
from pretrain.train.trainer import train  # noqa: E402

FAMILIES = [
    "configs/tiny.toml",
    "configs/llama_tiny.toml",
    "configs/gla_tiny.toml",
    "configs/mamba2_tiny.toml",
    "configs/sambay_tiny.toml",
    "configs/titans_mac_tiny.toml",
    "configs/rmoe_tiny.toml",
]


def run(path: str, steps: int, overrides: list[str], root: Path) -> dict:
    run_dir = root / Path(path).stem
    cfg = load_config(path, [
        f"train.max_steps={steps}", f"run.dir='{run_dir}'", "checkpoint.interval=0",
        "train.eval_interval=0", "logging.wandb=disabled", "logging.progress=off", "logging.plot=false",
        f"train.log_interval={steps}", "train.global_batch_size=8", "train.micro_batch_size=8",
        "data.seq_len=256", *overrides,
    ])
    summary = train(cfg, log=lambda *_: None)
    last = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    params = count_parameters(cfg.with_vocab().model)["total"]
    return {
        "config": path, "params": params, "tokens/s": last["tokens_per_s"],
        "loss": last["loss"], "val_loss": summary.get("val_loss"), "unigram": summary.get("unigram_entropy"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=FAMILIES)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(c, args.steps, args.overrides, Path(tmp)) for c in args.configs]
    base = rows[0]["tokens/s"]
    print(f"{'config':<32}{'params':>12}{'tokens/s':>10}{'loss':>8}{'val_loss':>10}{'unigram':>9}{'vs first':>10}")
    for r in rows:
        print(
            f"{r['config']:<32}{r['params']:>12,}{r['tokens/s']:>10.0f}{r['loss']:>8.3f}"
            f"{r['val_loss']:>10.3f}{r['unigram']:>9.3f}{r['tokens/s'] / base:>10.2f}"
        )


if __name__ == "__main__":
    try:
        main()
    except ConfigError as exc:  # a bad config or --set: one line and exit 2, as `pretrain` does
        print(f"{sys.argv[0]}: error: {exc}", file=sys.stderr)
        sys.exit(2)
