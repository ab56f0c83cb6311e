"""bench/seq_cost.py runs at its smallest sizes and prints its table (the numbers are the
benchmark's business; this keeps the script from rotting). decode.py and context_parallel.py
have their own smoke tests; vs_hf.py and data_loading.py take a minute even at their smallest
(HF's model build, a data preparation), so only `pretrain bench --quick` runs them."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_seq_cost_prints_every_mixer_and_length():
    out = _run("bench/seq_cost.py", "--lengths", "32", "64", "--mixers", "gla", "swa", "--d-model", "32", "--repeats", "1")
    rows = [line for line in out.splitlines() if line.startswith("| gla ") or line.startswith("| swa ")]
    assert len(rows) == 2
    for row in rows:
        cells = row.split("|")[2:4]  # T=32 and T=64: 'us/tok (x first)'
        assert cells[0].strip().endswith("(1.00x)") and float(cells[1].split()[0]) > 0
