"""Failures in one process: a NaN step is skipped (the update not applied, its data consumed, the
schedule moved on) and counted, consecutive ones stop the run without a non-finite checkpoint;
loss spikes are logged; a checkpoint write that fails (ENOSPC mid-save, a read-only folder)
raises one line and leaves the older checkpoints loadable and the training state intact; slow ranks are named
(tests/distributed/test_faults_train.py: the same with several ranks, DCP async_save)."""

from __future__ import annotations

import errno
import json
import math
import os

import pytest
import torch

from pretrain.config import load_config
from pretrain.train import checkpoint as ckpt
from pretrain.train.checkpoint import CheckpointWriteError
from pretrain.train.faults import DivergenceError, StepHealth, slow_ranks
from pretrain.train.trainer import Trainer
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6


def _trainer(corpus, prepared, run_dir, log=lambda *_: None, resume="auto", **extra) -> Trainer:
    values = {"train.max_steps": STEPS, "train.eval_interval": 0, "checkpoint.interval": 0, **extra}
    return Trainer(load_config(None, tiny_overrides(corpus, prepared, run_dir, **values)), resume=resume, log=log)


def poison_steps(trainer: Trainer, steps: set[int]) -> None:
    """The embedding's output becomes NaN in the forward of the (1-based) ``steps``."""
    nan = float("nan")
    trainer.model.embed.register_forward_hook(lambda m, i, out: out * nan if trainer.step + 1 in steps else None)


def _records(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r}


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_nan_step_is_skipped_and_counted(small_corpus, prepared_dir, tmp_path):
    lines: list[str] = []
    run = _trainer(small_corpus, prepared_dir, tmp_path / "nan", log=lines.append)
    poison_steps(run, {3})
    run.fit()
    got = _records(tmp_path / "nan")

    # reference: the same steps by hand, step 3's batch drawn and dropped, no update
    ref = _trainer(small_corpus, prepared_dir, tmp_path / "ref")
    want: dict[int, float] = {}
    while ref.step < STEPS:
        if ref.step == 2:
            ref.loader.next_step()
            ref.step += 1
            continue
        step = ref.step + 1
        want[step] = ref.train_step()["loss"].item()
    assert math.isnan(got[3]["loss"])
    assert {s: r["loss"] for s, r in got.items() if s != 3} == want  # bitwise
    assert [got[s]["skipped_steps"] for s in sorted(got)] == [0, 0, 1, 1, 1, 1]
    for name, p in _params(ref.model).items():
        assert torch.equal(dict(run.model.named_parameters())[name], p), name
    assert sum("step 3: non-finite loss; the update was skipped" in line for line in lines) == 1


def test_consecutive_nan_steps_stop_without_a_nonfinite_checkpoint(small_corpus, prepared_dir, tmp_path):
    run = _trainer(small_corpus, prepared_dir, tmp_path / "run", **{"train.max_skipped_steps": 3,
                                                                 "checkpoint.interval": 1})
    poison_steps(run, set(range(3, STEPS + 1)))
    with pytest.raises(DivergenceError) as info:
        run.fit()
    message = str(info.value)
    assert "\n" not in message and message.startswith("step 5: 3 consecutive") and "max_skipped_steps=3" in message
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.complete_steps(root)] == [f"step-0000000{s}" for s in (4, 3, 2, 1)]
    resumed = _trainer(small_corpus, prepared_dir, tmp_path / "run")  # the newest one loads, finite
    assert resumed.step == 4 and resumed.health.skipped == 2
    assert all(torch.isfinite(p).all() for p in resumed.model.parameters())


def test_loss_spike_is_logged_against_the_running_mean():
    losses = [2.0, 2.0, 2.0, 2.0, 6.1, 7.0, 5.9, 16.0, 3.0, 2.0, 30.0]
    window, factor = 4, 3.0
    want = [  # a naive running mean of the previous `window` losses, once there are that many
        step for step, loss in enumerate(losses, 1)
        if step > window and loss > factor * sum(losses[step - 1 - window : step - 1]) / window
    ]
    lines: list[str] = []
    health = StepHealth(max_skipped=5, spike_factor=factor, log=lines.append, window=window)
    for step, loss in enumerate(losses, 1):
        health.applied(step, loss)
    assert want == [5, 8, 11]
    assert [int(line.split(":")[0].removeprefix("step ")) for line in lines] == want
    assert lines[0] == "step 5: loss spike: 6.1 is 3.0x the mean 2 of the last 4 steps (train.loss_spike_factor=3)"
    off = StepHealth(max_skipped=5, spike_factor=0.0, log=lines.append)
    for step, loss in enumerate([1.0] * 20 + [1e6], 1):
        off.applied(step, loss)
    assert len(lines) == 3


def test_slow_ranks_are_those_above_the_factor_times_the_median():
    assert slow_ranks([0.10, 0.11, 0.35, 0.09], 1.5) == [2]
    assert slow_ranks([0.10, 0.14, 0.12], 1.5) == []
    assert slow_ranks([0.10, 0.9], 0.0) == []


def _assert_loadable(step_dir, trainer: Trainer) -> None:
    state = ckpt.load_checkpoint(step_dir, trainer.model, trainer.optimizer)
    assert state["step"] == int(step_dir.name.removeprefix("step-"))


def test_full_disk_mid_save_keeps_older_checkpoints_and_state(small_corpus, prepared_dir, tmp_path, monkeypatch):
    write = ckpt._write_file

    def enospc(path, data):  # the disk fills while rank 0 writes the manifest of step 4
        if "step-00000004" in str(path) and path.name == "manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        write(path, data)

    monkeypatch.setattr(ckpt, "_write_file", enospc)
    run = _trainer(small_corpus, prepared_dir, tmp_path / "full", **{"checkpoint.interval": 2})
    with pytest.raises(CheckpointWriteError) as info:
        run.fit()
    message = str(info.value)
    assert "\n" not in message and "step-00000004: not written ([Errno 28] No space left on device" in message
    root = tmp_path / "full" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-00000002"]  # no partial step 4 left
    after_failure = _params(run.model)
    monkeypatch.setattr(ckpt, "_write_file", write)

    # the state at the failure is that of an uninterrupted run at step 4, and the run resumes
    straight = _trainer(small_corpus, prepared_dir, tmp_path / "straight", **{"checkpoint.interval": 2})
    straight.fit()
    want = _saved(tmp_path / "straight" / "checkpoints" / "step-00000004", tmp_path / "want.pt")["model"]
    assert sorted(want) == sorted(after_failure)
    for name, p in want.items():
        assert torch.equal(after_failure[name], p), name
    resumed = _trainer(small_corpus, prepared_dir, tmp_path / "full", **{"checkpoint.interval": 2})
    assert resumed.step == 2
    resumed.fit()
    assert [(s, r["loss"]) for s, r in _records(tmp_path / "full").items()] == [
        (s, r["loss"]) for s, r in _records(tmp_path / "straight").items()
    ]


def test_unwritable_checkpoint_folder_is_one_line(small_corpus, prepared_dir, tmp_path, monkeypatch):
    run = _trainer(small_corpus, prepared_dir, tmp_path / "ro", **{"checkpoint.interval": 2, "train.max_steps": 4})
    root = tmp_path / "ro" / "checkpoints"
    mkdir = type(root).mkdir

    def read_only(self, *args, **kwargs):  # after step 2: what a read-only folder does, even to root
        if self.parent.parent == root and self.parent.name != "step-00000002.tmp":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        mkdir(self, *args, **kwargs)

    monkeypatch.setattr(type(root), "mkdir", read_only)
    with pytest.raises(CheckpointWriteError, match=r"step-00000004: not written \(\[Errno 13\] Permission denied"):
        run.fit()
    assert [p.name for p in root.iterdir()] == ["step-00000002"]
    _assert_loadable(root / "step-00000002", run)


def _saved(step_dir, out) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(step_dir), str(out))
    return torch.load(out, weights_only=False)
