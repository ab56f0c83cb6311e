"""A config error in a multi-rank launch: every rank exits with code 2, and the one-line error
appears once (on the first local rank), not once per rank."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_config_error_printed_once_every_rank_exits_2():
    """Two ranks started with the variables torchrun gives its ranks (as srun starts them too,
    and with no agent that could stop the slower rank before it reports), a bad config field:
    both exit 2, and their stderr holds the error line once, from local rank 0."""
    procs = []
    for rank in range(2):
        env = {
            **os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
            "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",  # never dialled: the config fails first
        }
        cmd = [sys.executable, "-m", "pretrain", "train", "--set", "train.max_steps=-3"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    stderr = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], stderr
    errors = [[line for line in err.splitlines() if line.strip()] for err in stderr]
    assert errors == [["pretrain train: error: train.max_steps: must be > 0"], []], errors
