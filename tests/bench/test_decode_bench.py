"""bench/decode.py at its smallest: the script runs end to end, and its memory-traffic bound counts
the bytes a step reads (recounted here from the model's shapes)."""

from __future__ import annotations

import importlib.util
import sys

import torch

from tests.conftest import ROOT


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_decode", ROOT / "bench" / "decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_traffic_bound_counts_weights_and_keys():
    bench = load_bench()
    model = bench.build("transformer")
    context = 40
    weights = sum(p.numel() for p in model.parameters()) * 4
    kv = 16 * 2 * context * 64 * 4  # 16 full layers read K and V: one KV head of 64, fp32
    cache = bench.fill_cache(model, 1, context, 0)
    assert bench.traffic_bytes(model, cache, context, 1) == weights + kv
    assert bench.cache_bytes(model, context) == kv // context * (context + 1)  # room for the next token


def test_smallest_run_prints_both_tables(monkeypatch, capsys):
    bench = load_bench()
    monkeypatch.setattr(sys, "argv", ["decode.py", "--contexts", "48", "--steps", "1", "--repeats", "1", "--no-hf",
                                      "--budget-gib", "0.0001", "--bandwidth-mib", "4"])
    try:
        bench.main()
    finally:
        torch.set_grad_enabled(True)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 48 |")]
    assert len(rows) == 2  # batch 1 and the fixed budget
    assert "x bound" not in rows[0] and rows[0].count("x)") >= 2  # measured / bound printed per model
