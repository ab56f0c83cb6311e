"""`pretrain bench`: the benchmarks under ``bench/`` run one after another into one report.

Each benchmark is a script of the repository's ``bench/`` folder that prints markdown tables
with its own side-by-side ratios and bounds (see each script's docstring for what it measures
and how). This runner gives each its arguments (``--quick``: sizes that finish in under 10
minutes on a 2-core CPU), runs it in its own process with the repository first on the path,
echoes its output, and writes ``report.md`` (every table, the time each took, and any failure)
and the PNG plots into ``--out``. A benchmark that fails is reported and the others still run;
the exit code is then 1.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pretrain.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bench:
    name: str
    title: str
    script: str
    args: tuple[str, ...]
    quick: tuple[str, ...]
    plot: str | None = None
    """The script's option that writes a PNG (given ``<out>/<name>.png``), if it has one."""


SUITE = (
    Bench("decode", "Decoding against the memory-traffic bound (SambaY, Transformer, HF Llama)", "decode.py",
          (), ("--quick", "--budget-gib", "2"), plot="--plot"),
    Bench("vs_hf", "Training throughput against Hugging Face", "vs_hf.py",
          (), ("--steps", "2", "--repeats", "2", "--set", "data.seq_len=128")),
    Bench("seq_cost", "Training cost against sequence length", "seq_cost.py",
          (), ("--lengths", "512", "2048", "8192", "--repeats", "1"), plot="--plot"),
    Bench("data_loading", "Data loading at scale", "data_loading.py", (), ("--steps", "6")),
    Bench("pipeline", "Pipeline schedules against one process", "pipeline.py",
          (), ("--steps", "2", "--microbatches", "4")),
    Bench("context_parallel", "Context parallelism: memory, exchanges and speed at cp 2", "context_parallel.py",
          (), ("--quick",)),
    Bench("kernels", "Kernels (GPU; on CPU the fused loss memory)", "kernels.py", (), ("--quick",)),
    Bench("cuda", "On CUDA: training MFU at about 1B and decoding at 32K (skipped without a GPU)", "cuda.py",
          (), ("--quick",)),
)


def run_suite(out: Path, quick: bool = False, only: list[str] | None = None, log=print) -> int:
    """Run the benchmarks named in ``only`` (all of :data:`SUITE` when None) and write
    ``out/report.md``; returns 0, or 1 when one failed. Raises ConfigError for an unknown name
    or a checkout without ``bench/`` (an installed package has no benchmarks)."""
    names = [b.name for b in SUITE]
    unknown = sorted(set(only or ()) - set(names))
    if unknown:
        raise ConfigError(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(names)})")
    if not (ROOT / "bench").is_dir():
        raise ConfigError(f"no bench/ folder beside the package ({ROOT}); run it from a git checkout")
    out.mkdir(parents=True, exist_ok=True)
    sections, failed = [f"# pretrain bench{' --quick' if quick else ''}\n"], []
    for bench in (b for b in SUITE if only is None or b.name in only):
        cmd = [sys.executable, str(ROOT / "bench" / bench.script), *(bench.quick if quick else bench.args)]
        if bench.plot:
            cmd += [bench.plot, str(out / f"{bench.name}.png")]
        log(f"\n== {bench.name}: {bench.title}")
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        text = proc.stdout.strip()
        log(text)
        status = f"{seconds:.0f} s"
        if proc.returncode:
            failed.append(bench.name)
            status += f", FAILED (exit {proc.returncode})"
            text += "\n\n```\n" + proc.stderr.strip()[-3000:] + "\n```"
            log(f"{bench.name} failed (exit {proc.returncode}):\n{proc.stderr.strip()[-3000:]}")
        sections.append(f"\n## {bench.title} (`bench/{bench.script}`, {status})\n\n{text}\n")
        if bench.plot and (out / f"{bench.name}.png").is_file():
            sections.append(f"\n![{bench.name}]({bench.name}.png)\n")
    (out / "report.md").write_text("".join(sections))
    log(f"\nreport: {out / 'report.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
