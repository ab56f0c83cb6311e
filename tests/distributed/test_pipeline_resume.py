"""Exact resumption under pipeline parallelism: a two-rank pp2 torchrun of `pretrain train`
(tied embeddings, so the last stage holds a copy of the embedding) SIGKILLed at an unpredictable
point and resumed with --resume auto logs bitwise the same losses as a pp2 run that never
stopped (tests/e2e/test_resume.py does the same for one process)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT, kill_after_step, kill_tree, losses, set_args, tiny_overrides

STEPS = 24


def _torchrun(overrides: list[str], log) -> subprocess.Popen:
    """torchrun in its own session (its ranks get sessions of their own)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "pretrain", "train", *set_args(overrides)]
    with open(log, "w") as err:  # stdout and stderr; the children keep their own descriptors
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=err, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _wait(proc: subprocess.Popen, log, timeout: float = 300) -> None:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise
    assert rc == 0, log.read_text()[-3000:]


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
    died_at = kill_after_step(_torchrun(overrides, log), killed, 5, log)
    assert died_at < STEPS, "the run ended before the kill: nothing was resumed"
    _wait(_torchrun(overrides, log), log)
    assert "resumed from step " in log.read_text()
    print(f"killed after step {died_at}; {log.read_text().splitlines()[3]}")
    assert losses(killed) == reference  # floats compared exactly
