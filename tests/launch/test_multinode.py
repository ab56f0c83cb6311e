"""Two torchrun "nodes" on localhost train together: `--nnodes=2`, one agent per node with one
process each, meeting at a c10d rendezvous on 127.0.0.1 (as launch/slurm.sbatch's agents meet
on the first node), log the same losses, gradient norms and validation losses as one node with
two processes (`--standalone --nproc-per-node=2`), the same two ranks without a rendezvous."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, kill_tree, set_args, tiny_overrides

TIMEOUT = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def _records(run_dir) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        if "step" in r:
            out.setdefault(r["step"], {}).update(r)
    return out


def _wait_all(procs: list[subprocess.Popen], logs: list, timeout: float) -> list[int]:
    """Exit codes of ``procs``; every process tree killed when one is still running at the end
    (a node left waiting in the rendezvous or a collective must not hang the suite)."""
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                kill_tree(p)
    codes = [p.returncode for p in procs]
    assert time.monotonic() < deadline, f"not done in {timeout}s:\n" + _digest(logs)
    return codes


def _digest(logs: list) -> str:
    """Each log's lines that say why a process failed (a C++ abort, a Python fatal error, a
    traceback's last line) and its last lines, outside torchrun's own wrapper traceback."""
    keys = ("terminate", "Fatal", "Error", "error", "what()", "Signal", "Traceback", "exitcode")
    out = []
    for log in logs:
        lines = log.read_text().splitlines()
        out.append(f"== {log.name} ({len(lines)} lines)")
        out += [ln for ln in lines if any(k in ln for k in keys)][:40]
        out += ["-- last lines:", *lines[-25:]]
    return "\n".join(out)


def test_two_nodes_equal_one_node(small_corpus, prepared_dir, tmp_path):
    steps = {"train.max_steps": 4, "train.eval_interval": 2, "checkpoint.interval": 4}
    train = ["-m", "pretrain", "train", "configs/tiny.toml"]

    one = tmp_path / "one_node"
    log = tmp_path / "one_node.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *train,
             *set_args(tiny_overrides(small_corpus, prepared_dir, one, **steps))],
            cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        assert _wait_all([proc], [log], TIMEOUT) == [0], log.read_text()[-3000:]
    want = _records(one)

    # Node 0 hosts the rendezvous store (is_host=1); node 1 connects to it. Both write the same
    # run folder, as nodes on a shared file system do.
    two = tmp_path / "two_nodes"
    port = _free_port()
    procs, logs = [], []
    for node in (0, 1):
        logs.append(tmp_path / f"node{node}.log")
        with open(logs[-1], "w") as f:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                 "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                 "--rdzv-id=two-nodes", f"--rdzv-conf=is_host={int(node == 0)}", "--local-addr=127.0.0.1",
                 *train, *set_args(tiny_overrides(small_corpus, prepared_dir, two, **steps))],
                cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
    codes = _wait_all(procs, logs, TIMEOUT)
    assert codes == [0, 0], _digest(logs)
    # one world of two ranks, not two single-process runs writing the same folder
    assert "= 2 data-parallel rank(s)" in logs[0].read_text() + logs[1].read_text()
    got = _records(two)

    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    worst = 0.0
    for s in want:
        for key in ("loss", "grad_norm", "val_loss"):
            if key in want[s]:
                assert key in got[s], (s, key)
                worst = max(worst, abs(got[s][key] - want[s][key]) / abs(want[s][key]))
                assert got[s][key] == pytest.approx(want[s][key], rel=1e-6), (s, key)
    print(f"two nodes x 1 process vs one node x 2 processes: worst relative difference {worst:.2e}")
