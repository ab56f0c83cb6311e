"""`pretrain train` with context parallelism from the command line (torchrun, gloo) against one
process, on hybrid_mix shrunk (Mamba, GLA, sliding-window and full attention, GRU-routed MoE),
cp 2 load-balanced (4 segments of 8 tokens): cp 2 x dp 2 (FSDP2 over dp_shard x cp, with
activation checkpointing) and pp 2 x cp 2 on four ranks, and cp 2 with ring attention (with
activation checkpointing) on two, log the single-process losses, validation losses and
gradient norms. Their checkpoints continue in one process (the data
position and weights carry over), score and generate there: CP is a training-time layout."""

from __future__ import annotations

from tests.conftest import run_cli, set_args, tiny_overrides
from tests.distributed.test_pipeline_train import (
    _assert_same_checkpoint, _assert_same_log, _checkpoint, _records, _resumable_copy, _torchrun,
)

CONFIG = "configs/hybrid_mix.toml"


def _overrides(corpus, prepared, run_dir, **extra):
    values = {
        "train.max_steps": 4, "train.global_batch_size": 8, "train.eval_interval": 2, "train.eval_samples": 8,
        "checkpoint.interval": 2,
        "model.n_layers": 4, "model.layer_pattern": "'mamba:moe_gru gla:mlp swa:moe_gru attn:mlp'",
        "model.attention.window": 6,  # a halo of 5 keys: most of an 8-token segment
        "model.moe.n_experts": 4, "model.moe.router_hidden": 8, "model.gla.chunk_size": 4, **extra,
    }
    return tiny_overrides(corpus, prepared, run_dir, **values)


def test_context_parallel_train_resume_and_generate(small_corpus, prepared_dir, tmp_path):
    single = tmp_path / "single"
    result = run_cli(["train", CONFIG, *set_args(_overrides(small_corpus, prepared_dir, single))])
    assert result.returncode == 0, result.stderr[-3000:]
    want = _records(single)
    final = _checkpoint(single / "checkpoints/step-00000004", tmp_path)

    # cp2 x dp2, with activation checkpointing: the recomputed forward repeats the exchanges
    cp_dp = tmp_path / "cp2_dp2"
    result = _torchrun(_overrides(small_corpus, prepared_dir, cp_dp, **{
        "parallel.cp": 2, "parallel.activation_checkpoint": "'full'"}), nproc=4, config=CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "each sequence split over 2 context-parallel ranks" in result.stdout
    worst = _assert_same_log(_records(cp_dp), want, [1, 2, 3, 4], rel=1e-4)  # FSDP's reduction order
    print(f"cp2 x dp2: worst relative difference of loss/val_loss/grad_norm vs one process {worst:.2e}")

    # ring attention (the trainer hands parallel.cp_attention to the split), with activation
    # checkpointing: the recomputed forward runs the ring again inside the backward
    ring = tmp_path / "cp2_ring"
    result = _torchrun(_overrides(small_corpus, prepared_dir, ring, **{
        "parallel.cp": 2, "parallel.cp_attention": "'ring'", "parallel.activation_checkpoint": "'full'"}), config=CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    worst = _assert_same_log(_records(ring), want, [1, 2, 3, 4])
    print(f"cp2 ring: worst relative difference vs one process {worst:.2e}")

    # pp2 x cp2: each pipeline stage on its segments
    pp_cp = tmp_path / "pp2_cp2"
    result = _torchrun(_overrides(small_corpus, prepared_dir, pp_cp, **{
        "parallel.cp": 2, "parallel.pp": 2, "parallel.pp_microbatches": 2}), nproc=4, config=CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    worst = _assert_same_log(_records(pp_cp), want, [1, 2, 3, 4], rel=1e-4)
    print(f"pp2 x cp2: worst relative difference vs one process {worst:.2e}")
    for run in (cp_dp, pp_cp):
        _assert_same_checkpoint(_checkpoint(run / "checkpoints/step-00000004", tmp_path), final, rel=1e-3)

    # the pp2 x cp2 step-2 checkpoint continues in one process
    to_one = tmp_path / "pp2_cp2_to_one"
    _resumable_copy(pp_cp, to_one, 2)
    result = run_cli(["train", CONFIG, *set_args(_overrides(small_corpus, prepared_dir, to_one))])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 2" in result.stdout and "at sample 16 " in result.stdout
    _assert_same_log(_records(to_one), want, [3, 4], rel=1e-4)

    # one process scores the cp2 x dp2 checkpoint as the single-process run's last validation, and
    # decodes from it
    result = run_cli(["eval", "--checkpoint", str(cp_dp)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"validation loss {want[4]['val_loss']:.4f} nats/token" in result.stdout
    result = run_cli(["generate", "--checkpoint", str(cp_dp), "--prompt", "In the beginning",
                      "--max-new-tokens", "8", "--greedy"])
    assert result.returncode == 0 and result.stdout.startswith("In the beginning"), result.stderr[-3000:]
