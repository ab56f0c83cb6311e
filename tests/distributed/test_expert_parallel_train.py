"""`pretrain train` with expert parallelism (two torchrun ranks, gloo, parallel.ep=2 = dp) against
one process, for the tiny RMoE: the logged losses, gradient norms and validation losses of every
step, and the saved weights and AdamW moments (each rank's experts are saved as DTensor shards
of the global [E, ...] tensors), equal the single-process run's. Checkpoints reshard both ways:
ep2 step 1 -> one process to step 4 -> its step 2 -> ep2 to step 4 logs the uninterrupted run's
losses and ends with its weights and optimizer state."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from parallel.dims import ParallelDims
from pretrain.config import ConfigError, load_config
from tests.conftest import ROOT, run_cli, set_args, tiny_overrides
from tests.distributed.test_pipeline_train import (
    _assert_same_checkpoint,
    _assert_same_log,
    _checkpoint,
    _max_differences,
    _records,
    _resumable_copy,
)

CONFIG = "configs/rmoe_tiny.toml"


def _overrides(corpus, prepared, run_dir, **extra):
    # rmoe_tiny's own attn:moe_gru pattern, shrunk: 2 blocks of 8 experts (top-2, GRU router);
    # 4 sequences per step: one micro-batch of 2 per rank
    values = {
        "model.n_layers": 2, "model.attention.n_heads": 2, "model.attention.n_kv_heads": 1,
        "model.moe.router_hidden": 8, "model.moe.expert_hidden": 16, "model.moe.aux_loss_coef": 0.01,
        "train.max_steps": 4, "train.eval_interval": 2, "checkpoint.interval": 1, **extra,
    }
    drop = ("model.layer_pattern", "model.attention.window", "model.mamba.")
    return [o for o in tiny_overrides(corpus, prepared, run_dir, **values) if not o.startswith(drop)]


def _single(overrides):
    # all 4 sequences in one micro-batch: the balance loss of an ep group uses the load of all
    # its ranks' tokens (parallel/expert.py), which one process sees only in a single forward
    result = run_cli(["train", CONFIG, *set_args([*overrides, "train.micro_batch_size=4"])])
    assert result.returncode == 0, result.stderr[-3000:]


def _ep2(overrides, nproc=2):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pretrain", "train", CONFIG, *set_args([*overrides, "parallel.ep=2"])]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_ep2_train_and_resume_equal_single_process(small_corpus, prepared_dir, tmp_path):
    # FSDP2's reduce-scatter of the non-expert gradients sums in another order than one process,
    # which AdamW amplifies in tiny entries: logs to 1e-5, weights and moments after four steps
    # elementwise to 1e-3, as pp2 x FSDP in test_pipeline_train (measured: logs 2e-7; weights
    # 2.1e-6 absolute at most, 5.6e-5 of the largest; 2e-7 on the batches of the earlier order)
    single, ep2 = tmp_path / "single", tmp_path / "ep2"
    _single(_overrides(small_corpus, prepared_dir, single))
    want = _records(single)
    _ep2(_overrides(small_corpus, prepared_dir, ep2))
    worst = _assert_same_log(_records(ep2), want, [1, 2, 3, 4])
    last = "checkpoints/step-00000004"
    reference = _checkpoint(single / last, tmp_path)
    _assert_same_checkpoint(got := _checkpoint(ep2 / last, tmp_path), reference, rel=1e-3)
    print(f"ep2: worst relative difference of loss/val_loss/grad_norm {worst:.1e}; max |weight| / |moment| "
          "difference %.1e / %.1e" % _max_differences(got, reference))

    # ep2 -> one process -> ep2: the experts' DTensor shards reshard to whole tensors and back
    one = tmp_path / "one"
    _resumable_copy(ep2, one, 1)
    _single(_overrides(small_corpus, prepared_dir, one))
    worst = _assert_same_log(_records(one), want, [2, 3, 4])
    back = tmp_path / "back"
    _resumable_copy(one, back, 2)
    _ep2(_overrides(small_corpus, prepared_dir, back))
    worst = max(worst, _assert_same_log(_records(back), want, [3, 4]))
    _assert_same_checkpoint(got := _checkpoint(back / last, tmp_path), reference, rel=1e-3)
    print(f"ep2 -> one -> ep2: worst relative difference of the logs {worst:.1e}; max |weight| / |moment| "
          "difference %.1e / %.1e" % _max_differences(got, reference))


def test_ep2_with_pp2_or_tp2_trains_as_single_process(small_corpus, prepared_dir, tmp_path):
    """pp2 x ep2 (GPipe, one micro-batch per round, so that each ep group's balance loss sees
    the same 4 sequences as one process's micro-batch), tp2 x ep2 (sequence parallel) and cp2 x
    ep2, four ranks each: the logs of two steps and the weights and AdamW moments after them."""
    overrides = {"train.max_steps": 2, "checkpoint.interval": 2, "train.eval_interval": 2, "optim.warmup_steps": 1}
    single = tmp_path / "single"
    _single(_overrides(small_corpus, prepared_dir, single, **overrides))
    want = _records(single)
    reference = _checkpoint(single / "checkpoints/step-00000002", tmp_path)
    layouts = {
        "pp2": {"parallel.pp": 2, "parallel.pp_schedule": "'gpipe'", "parallel.pp_microbatches": 1},
        "tp2": {"parallel.tp": 2},
        # each ep group's ranks hold the same segments of their sequences; the balance loss
        # sums its statistics over the cp ranks too
        "cp2": {"parallel.cp": 2},
    }
    for name, layout in layouts.items():
        run = tmp_path / name
        _ep2(_overrides(small_corpus, prepared_dir, run, **overrides, **layout), nproc=4)
        worst = _assert_same_log(_records(run), want, [1, 2])
        got = _checkpoint(run / "checkpoints/step-00000002", tmp_path)
        _assert_same_checkpoint(got, reference, rel=1e-3)
        print(f"{name} x ep2: worst relative difference of the logs {worst:.1e}; max |weight| / |moment| "
              "difference %.1e / %.1e" % _max_differences(got, reference))


@pytest.mark.parametrize(
    "overrides, world, grid",
    [
        ([], 2, (1, 1, 2)),
        (["parallel.dp_replicate=2"], 4, (2, 1, 2)),  # HSDP: the experts replicated across dp_replicate
        ([], 4, (1, 2, 2)),  # dp_shard=4: two ep groups of 2 ranks
        (["parallel.tp=2"], 4, (1, 1, 2)),  # an ep group per tp coordinate
        (["parallel.pp=2"], 4, (1, 1, 2)),  # an ep group per pipeline stage
        (["parallel.pp=2", "parallel.tp=2"], 16, (1, 2, 2)),  # per stage and tp coordinate
        (["parallel.cp=2"], 8, (1, 2, 2)),  # an ep group per cp coordinate
    ],
)
def test_ep_borrows_dp_shard_ranks(overrides, world, grid):
    dims = ParallelDims.from_config(load_config(CONFIG, ["parallel.ep=2", *overrides]).parallel, world)
    assert (dims.dp_replicate, dims.dp_shard // dims.ep, dims.ep) == grid


@pytest.mark.parametrize(
    "overrides, world, message",
    [
        ([], 1, "2 does not divide parallel.dp_shard=1 (ep borrows its ranks)"),
        (["parallel.dp_replicate=2"], 2, "2 does not divide parallel.dp_shard=1 (ep borrows its ranks)"),
        (["parallel.tp=2"], 2, "2 does not divide parallel.dp_shard=1 (ep borrows its ranks)"),
        (["parallel.dp_backend='deepspeed'"], 2,
         "expert parallelism runs only with parallel.dp_backend='fsdp', got 'deepspeed'"),
    ],
)
def test_ep_layouts_refused(overrides, world, message):
    cfg = load_config(CONFIG, ["parallel.ep=2", *overrides]).parallel
    with pytest.raises(ConfigError) as err:
        ParallelDims.from_config(cfg, world)
    assert str(err.value) == f"parallel.ep: {message}"
