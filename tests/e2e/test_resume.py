"""Exact resumption: a run SIGKILLed (twice, at unpredictable points) and resumed with
--resume auto logs bitwise the same losses as a run that never stopped."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT, kill_after_step, losses, run_cli, set_args, tiny_overrides

STEPS = 12


def _start(args: list[str], log) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    with open(log, "w") as err:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "pretrain", *args], cwd=ROOT, env=env,
            stdout=subprocess.DEVNULL, stderr=err,
        )


def test_sigkill_and_resume_is_bitwise_identical(small_corpus, prepared_dir, tmp_path):
    common = {"train.max_steps": STEPS, "checkpoint.interval": 3, "checkpoint.keep_last": 2}
    straight = tmp_path / "straight"
    done = run_cli(["train", *set_args(tiny_overrides(small_corpus, prepared_dir, straight, **common))])
    assert done.returncode == 0, done.stderr
    reference = losses(straight)
    assert [s for s, _ in reference] == list(range(1, STEPS + 1))

    killed = tmp_path / "killed"
    args = ["train", *set_args(tiny_overrides(small_corpus, prepared_dir, killed, **common))]
    log = tmp_path / "stderr.log"
    kill_after_step(_start(args, log), killed, 4, log)  # between checkpoints 3 and 6
    kill_after_step(_start(args, log), killed, 8, log)  # resumed from 3 or 6, killed again
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stdout
    assert losses(killed) == reference  # floats compared exactly
