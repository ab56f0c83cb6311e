"""The data loader at scale: its start time and memory at 100M samples, and its share of a step.

    python bench/data_loading.py [--samples 100000000] [--config configs/tiny.toml] [--steps 12]

1. **Sample order at scale.** For each per-epoch shuffle of :data:`pretrain.data.blend.ORDERS`,
   a fresh process builds a :class:`~pretrain.data.blend.BlendedSampler` over one dataset of
   ``--samples`` samples and draws the first global batch (512 samples at 4096 tokens is 2M
   tokens) and a batch a billion samples on. Columns: ``start s`` (construction plus the first
   batch), ``us/sample`` (the second batch, per sample), ``RSS MiB`` (peak resident memory
   added, ``getrusage``). Bounds: the stored permutation must hold 8 bytes per sample (its
   int64 index, rebuilt at every start and every epoch); the Feistel order holds six round keys,
   so its bound is 0 MiB beyond the interpreter.
2. **Share of the step.** ``pretrain train CONFIG`` on the built-in corpus for ``--steps`` steps
   (prepared once into a temporary folder); the median of the logged ``data_pct`` (seconds in
   ``PackedLoader.next_step`` over step seconds) after the first step. Goal < 2 %.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository, before bench/ (whose kernels.py shadows the package)
BATCH = 512


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB


def _order_child(order: str, samples: int) -> None:
    """Runs in a fresh interpreter: prints one JSON line of this order's figures."""
    from pretrain.data.blend import BlendedSampler

    base = _rss_mib()
    start = time.perf_counter()
    sampler = BlendedSampler([samples], [1.0], seed=1234, order=order)
    first = [sampler[g] for g in range(BATCH)]
    started = time.perf_counter() - start
    far = 10**9
    t = time.perf_counter()
    later = [sampler[g] for g in range(far, far + BATCH)]
    per_sample = (time.perf_counter() - t) / BATCH
    assert all(0 <= i < samples for _, i in first + later)
    print(json.dumps({"start_s": started, "us_per_sample": per_sample * 1e6, "rss_mib": _rss_mib() - base}))


def sample_orders(samples: int) -> list[dict]:
    from pretrain.data.blend import ORDERS

    rows = []
    for order in ORDERS:
        out = subprocess.run([sys.executable, __file__, "--child-order", order, "--samples", str(samples)],
                             cwd=ROOT, capture_output=True, text=True, check=True)
        rows.append({"order": order, **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


def data_share(config: str, steps: int) -> list[float]:
    """``data_pct`` of each logged step after the first of a short CPU run of ``config``."""
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        sets = [f"run.dir='{run}'", f"data.dir='{Path(tmp) / 'data'}'", f"train.max_steps={steps}",
                "train.log_interval=1", f"optim.warmup_steps={steps // 2}", "train.eval_interval=0", "checkpoint.interval=0",
                "logging.wandb='disabled'", "logging.progress='off'"]
        cmd = [sys.executable, "-m", "pretrain", "train", config]
        for s in sets:
            cmd += ["--set", s]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"bench/data_loading.py: {' '.join(cmd[2:4])} failed: {out.stderr.strip()[-500:]}")
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["data_pct"] for r in records if "data_pct" in r and r.get("step", 0) > 1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=100_000_000)
    p.add_argument("--config", default="configs/tiny.toml")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--child-order", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_order:
        _order_child(args.child_order, args.samples)
        return

    print(f"## Sample order over {args.samples:,} samples (first batch of {BATCH}, then one at sample 1e9)\n")
    print("| order | start s | us/sample | RSS MiB | bound MiB |")
    print("|---|---|---|---|---|")
    for r in sample_orders(args.samples):
        bound = 8 * args.samples / 2**20 if r["order"] == "permutation" else 0.0
        print(f"| {r['order']} | {r['start_s']:.3f} | {r['us_per_sample']:.2f} | {r['rss_mib']:.0f} | {bound:.0f} |")

    shares = data_share(args.config, args.steps)
    print(f"\n## Share of the step spent reading data ({args.config}, {len(shares)} steps after the first)\n")
    print(f"data_pct median {statistics.median(shares):.2f} % (max {max(shares):.2f} %); goal < 2 %")


if __name__ == "__main__":
    main()
