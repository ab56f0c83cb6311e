"""`pretrain bench`: every benchmark's tables land in one report, a failing one is reported
without stopping the others, and unknown names exit 2."""

from __future__ import annotations

import pretrain.bench_suite as suite
from tests.conftest import run_cli


def test_report_collects_tables_and_failures(tmp_path, monkeypatch):
    ok = tmp_path / "ok.py"
    ok.write_text("import sys\nprint('| a | ratio |')\nprint('|---|---|')\nprint('| x | ' + ' '.join(sys.argv[1:]) + ' |')\n")
    bad = tmp_path / "bad.py"
    bad.write_text("import sys\nprint('half a table')\nsys.exit('broken on purpose')\n")
    monkeypatch.setattr(suite, "SUITE", (
        suite.Bench("ok", "A table", str(ok), ("--full",), ("--small",)),
        suite.Bench("bad", "A failure", str(bad), (), ()),
        suite.Bench("later", "Runs after the failure", str(ok), ("--full",), ("--small",)),
    ))
    lines = []
    assert suite.run_suite(tmp_path / "out", quick=True, log=lines.append) == 1
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.count("| x | --small |") == 2 and "--full" not in report
    assert "A failure" in report and "FAILED (exit 1)" in report and "broken on purpose" in report
    assert report.index("A failure") < report.index("Runs after the failure")
    assert suite.run_suite(tmp_path / "only", only=["ok"], log=lines.append) == 0
    assert "| x | --full |" in (tmp_path / "only" / "report.md").read_text()


def test_unknown_benchmark_is_one_line_exit_2(tmp_path):
    result = run_cli(["bench", "--only", "decode", "nope", "--out", str(tmp_path / "b")])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pretrain bench: error: unknown benchmark nope (known: decode, vs_hf, seq_cost, data_loading, pipeline, context_parallel, kernels, cuda)"]
    assert not (tmp_path / "b").exists()
