"""`pretrain train` with tensor parallelism from the command line (torchrun, gloo) against one
process, on hybrid_mix shrunk (Mamba, GLA, sliding-window and full attention, GRU-routed MoE,
tied embeddings): pp2 x tp2 on four ranks logs the single-process losses, and its checkpoint
goes round the layouts — pp2 x tp2 -> dp_shard4 -> tp2 -> one process (`pretrain eval`) — each
leg continuing the single-process run (losses, data position, weights and AdamW moments)."""

from __future__ import annotations

from tests.conftest import run_cli, set_args, tiny_overrides
from tests.distributed.test_pipeline_train import (
    _assert_same_checkpoint, _assert_same_log, _checkpoint, _records, _resumable_copy, _torchrun,
)

CONFIG = "configs/hybrid_mix.toml"


def _overrides(corpus, prepared, run_dir, **extra):
    values = {
        # 8 validation sequences: a multiple of every layout's micro-batch x data-parallel ranks, so
        # that all of them score the same set
        "train.max_steps": 4, "train.global_batch_size": 8, "train.eval_interval": 2, "train.eval_samples": 8,
        "checkpoint.interval": 1,
        "model.n_layers": 4, "model.layer_pattern": "'mamba:moe_gru gla:mlp swa:moe_gru attn:mlp'",
        "model.moe.n_experts": 4, "model.moe.router_hidden": 8, "model.gla.chunk_size": 8, **extra,
    }
    return tiny_overrides(corpus, prepared, run_dir, **values)


def test_tensor_parallel_train_and_reshard(small_corpus, prepared_dir, tmp_path):
    single = tmp_path / "single"
    result = run_cli(["train", CONFIG, *set_args(_overrides(small_corpus, prepared_dir, single))])
    assert result.returncode == 0, result.stderr[-3000:]
    want = _records(single)
    final = _checkpoint(single / "checkpoints/step-00000004", tmp_path)

    # pp2 x tp2: the pipeline's stages split over two tensor-parallel ranks each
    pp_tp = tmp_path / "pp2_tp2"
    result = _torchrun(_overrides(small_corpus, prepared_dir, pp_tp, **{
        "parallel.pp": 2, "parallel.tp": 2, "parallel.pp_microbatches": 2}), nproc=4, config=CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    worst = _assert_same_log(_records(pp_tp), want, list(range(1, 5)))
    print(f"pp2 x tp2: worst relative difference of loss/val_loss/grad_norm vs one process {worst:.2e}")

    # its step-2 checkpoint resumes under dp_shard4 (FSDP2, no TP: the data-parallel degree
    # goes from 1 to 4, the data position carries over) ...
    to_dp = tmp_path / "pp2_tp2_to_dp4"
    _resumable_copy(pp_tp, to_dp, 2)
    result = _torchrun(_overrides(small_corpus, prepared_dir, to_dp), nproc=4, config=CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 2" in result.stdout and "at sample 16 " in result.stdout
    _assert_same_log(_records(to_dp), want, [3, 4], rel=1e-4)  # FSDP's reduction order, as test_fsdp

    # ... whose step-3 checkpoint resumes under tp2 ...
    to_tp = tmp_path / "dp4_to_tp2"
    _resumable_copy(to_dp, to_tp, 3)
    result = _torchrun(_overrides(small_corpus, prepared_dir, to_tp, **{"parallel.tp": 2}), config=CONFIG)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 3" in result.stdout and "at sample 24 " in result.stdout
    _assert_same_log(_records(to_tp), want, [4], rel=1e-4)
    for run in (pp_tp, to_dp, to_tp):
        _assert_same_checkpoint(_checkpoint(run / "checkpoints/step-00000004", tmp_path), final, rel=1e-3)

    # ... and one process scores the tp2 checkpoint as the single-process run's last validation
    result = run_cli(["eval", "--checkpoint", str(to_tp)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"validation loss {want[4]['val_loss']:.4f} nats/token" in result.stdout
