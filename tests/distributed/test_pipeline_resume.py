"""Exact resumption under pipeline parallelism: a two-rank pp2 torchrun of `pretrain train`
(tied embeddings, so the last stage holds a copy of the embedding) SIGKILLed at an unpredictable
point and resumed with --resume auto logs bitwise the same losses as a pp2 run that never
stopped (tests/e2e/test_resume.py does the same for one process)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT, losses, set_args, tiny_overrides

STEPS = 24


def _torchrun(overrides: list[str], log) -> subprocess.Popen:
    """torchrun in its own session (its ranks get sessions of their own)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pretrain", "train", *set_args(overrides)]
    with open(log, "w") as err:  # stdout and stderr; the children keep their own descriptors
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=err, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _tree(pid: int) -> list[int]:
    """``pid`` and its descendants (from /proc), parents first."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:  # exited meanwhile
                pass
    out = [pid]
    for p in out:
        out += [c for c, pp in parent.items() if pp == p]
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the agent, both ranks and their data workers (torchrun puts each rank in a session
    of its own, so killing the agent's group alone would leave the ranks training)."""
    for pid in reversed(_tree(proc.pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def _wait(proc: subprocess.Popen, log, timeout: float = 300) -> None:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise
    assert rc == 0, log.read_text()[-3000:]


def _kill_after_step(proc: subprocess.Popen, run_dir, step: int, log, timeout: float = 300) -> int:
    """SIGKILL ``proc`` and every process under it as soon as metrics.jsonl shows ``step``;
    the last step logged when it died."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"run ended before step {step}: {log.read_text()[-2000:]}")
            if metrics.is_file() and any(s >= step for s, _ in losses(run_dir)):
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"step {step} not reached in {timeout}s")
    finally:
        _kill_tree(proc)
    return max(s for s, _ in losses(run_dir))


def test_pp2_sigkill_and_resume_is_bitwise_identical(small_corpus, prepared_dir, tmp_path):
    common = {"train.max_steps": STEPS, "checkpoint.interval": 4, "checkpoint.keep_last": 2,
              "model.n_layers": 4, "model.tie_embeddings": "true", "parallel.pp": 2,
              "parallel.pp_schedule": "1f1b", "parallel.pp_microbatches": 2}
    straight = tmp_path / "straight"
    log = tmp_path / "stderr.log"
    _wait(_torchrun(tiny_overrides(small_corpus, prepared_dir, straight, **common), log), log)
    reference = losses(straight)
    assert [s for s, _ in reference] == list(range(1, STEPS + 1))

    killed = tmp_path / "killed"
    overrides = tiny_overrides(small_corpus, prepared_dir, killed, **common)
    # steps take ~30 ms, checkpoints longer: it dies a few steps after 5, perhaps mid-checkpoint
    died_at = _kill_after_step(_torchrun(overrides, log), killed, 5, log)
    assert died_at < STEPS, "the run ended before the kill: nothing was resumed"
    _wait(_torchrun(overrides, log), log)
    assert "resumed from step " in log.read_text()
    print(f"killed after step {died_at}; {log.read_text().splitlines()[3]}")
    assert losses(killed) == reference  # floats compared exactly
