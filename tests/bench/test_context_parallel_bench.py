"""bench/context_parallel.py at a tiny length: it runs, and the bytes it counts at the split's
exchanges equal `pretrain plan`'s formula (parallel.context.cp_traffic) for every layer type,
with full attention all-gathered and as a ring."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_context_parallel_bench_counts_what_the_plan_says(tmp_path):
    result = subprocess.run(
        [sys.executable, "bench/context_parallel.py", "--lengths", "512", "--repeats", "1", "--cp-attention",
         "allgather", "ring", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "context_parallel.md").read_text()
    comm = [line.split("|")[1:-1] for line in report.splitlines() if line.count("|") == 7 and "512" in line]
    layers = {row[0].strip(): set() for row in comm}
    for row in comm:
        layers[row[0].strip()].add(row[2].strip())
    assert layers == {"sambay": {"mamba", "swa", "mamba_mem", "attn_kv"}, "gla": {"gla"},
                      "sambay/ring": {"mamba", "swa", "mamba_mem", "attn_kv", "xattn"}}  # ring: cross layers exchange
    for row in comm:
        assert float(row[3]) == float(row[4]), row  # measured == plan
        assert float(row[3]) < float(row[5])  # less than all-gathering the hidden states
